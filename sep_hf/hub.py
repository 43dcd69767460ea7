"""The one place that talks to the Hub: revisions, repos, background uploads, downloads, cards.

Everything goes through ``huggingface_hub`` (``HfApi``), so ``HF_ENDPOINT`` / ``HF_TOKEN`` work as
users expect, including against the loopback test double in ``sep_hf.testing.hub``.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

__all__ = [
    "HubError",
    "dataset_commit_sha",
    "repo_commit_sha",
    "ensure_repo",
    "BackgroundUploader",
    "download_repo",
    "repo_files",
    "upload_folder",
    "load_card",
    "push_card",
]

logger = logging.getLogger(__name__)


class HubError(RuntimeError):
    """A Hub operation failed; the message says which repo and what to check."""


def _api() -> HfApi:
    return HfApi()


def repo_commit_sha(repo_id: str, repo_type: str = "model", revision: str | None = None) -> str:
    try:
        return _api().repo_info(repo_id, repo_type=repo_type, revision=revision).sha
    except RepositoryNotFoundError as err:
        raise HubError(f"{repo_type.capitalize()} repo '{repo_id}' not found (or not visible with your token).") from err
    except RevisionNotFoundError as err:
        raise HubError(f"Revision '{revision}' not found in {repo_type} repo '{repo_id}'.") from err


def dataset_commit_sha(repo_id: str, revision: str | None = None) -> str:
    return repo_commit_sha(repo_id, "dataset", revision)


def repo_exists(repo_id: str, repo_type: str = "model") -> bool:
    return _api().repo_exists(repo_id, repo_type=repo_type)


def ensure_repo(repo_id: str, repo_type: str = "model", private: bool = True) -> str:
    """Create ``repo_id`` if needed (private by default) and check that we may write to it."""
    if "/" not in repo_id:
        raise HubError(f"Repo id '{repo_id}' needs a namespace, e.g. 'my-org/{repo_id}'.")
    try:
        return str(_api().create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True))
    except HfHubHTTPError as err:
        raise HubError(
            f"Cannot create or write {repo_type} repo '{repo_id}': {err}. "
            "Check that your token (HF_TOKEN or `hf auth login`) has write access to that namespace."
        ) from err


def download_repo(
    repo_id: str,
    repo_type: str = "model",
    revision: str | None = None,
    allow_patterns: list[str] | str | None = None,
    local_dir: str | Path | None = None,
) -> Path:
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
    return info.oid


def load_card(repo_id: str, repo_type: str = "dataset"):
    from huggingface_hub import DatasetCard, ModelCard

    cls = DatasetCard if repo_type == "dataset" else ModelCard
    try:
        return cls.load(repo_id, repo_type=repo_type)
    except HfHubHTTPError as err:
        raise HubError(f"Cannot read the card of {repo_type} repo '{repo_id}': {err}") from err


def push_card(card, repo_id: str, repo_type: str = "dataset", message: str = "Update card") -> None:
    try:
        card.push_to_hub(repo_id, repo_type=repo_type, commit_message=message)
    except HfHubHTTPError as err:
        raise HubError(f"Cannot update the card of {repo_type} repo '{repo_id}' (write access?): {err}") from err


def repo_files(repo_id: str, repo_type: str = "model", revision: str | None = None) -> list[str]:
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

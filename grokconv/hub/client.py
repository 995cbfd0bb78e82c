"""Hub calls and their errors: the environment's settings, the files of a repository at a commit
(``HfApi``), and every huggingface_hub or network exception as one :class:`DownloadError` with a hint."""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass

from .. import __version__
from ..errors import DownloadError
from ..units import format_bytes as _format_bytes

__all__ = ["format_bytes", "hub_settings", "RemoteFile", "HubClient", "hub_error"]


def format_bytes(n: float) -> str:
    """Decimal units, as the hub shows sizes: ``318.24 GB``."""
    return _format_bytes(n, decimal=True)


def hub_settings() -> tuple[str, str | None, bool]:
    """(endpoint, token, offline) from the environment now; huggingface_hub reads them at import."""
    endpoint = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or "https://huggingface.co"
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None
    offline = any(os.environ.get(k, "").strip().upper() in ("1", "ON", "YES", "TRUE")
                  for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return endpoint, token, offline


@dataclass(frozen=True)
class RemoteFile:
    path: str               # path in the repository, and under DIR
    repo: str
    commit: str
    size: int
    sha256: str | None      # the hub's LFS sha256; None for a file kept in git
    blob_id: str = ""       # git blob sha1, checked when there is no LFS sha256

    @property
    def oid(self) -> str:
        return self.sha256 or self.blob_id


class HubClient:
    """HfApi calls, with huggingface_hub's errors turned into one-line DownloadErrors."""

    def __init__(self, endpoint: str, token: str | None):
        from huggingface_hub import HfApi
        self.endpoint, self.token = endpoint, token
        self.api = HfApi(endpoint=endpoint, token=token, library_name="grokconv", library_version=__version__)

    def resolve(self, repo: str, revision: str) -> str:
        try:
            return self.api.repo_info(repo, revision=revision).sha
        except Exception as e:
            raise hub_error(e, repo, revision, self.endpoint, self.token) from None

    def list_files(self, repo: str, commit: str, folder: str | None = None) -> dict[str, RemoteFile]:
        from huggingface_hub.hf_api import RepoFile
        try:
            entries = list(self.api.list_repo_tree(repo, path_in_repo=folder, revision=commit))
        except Exception as e:
            raise hub_error(e, repo, commit, self.endpoint, self.token, path=folder) from None
        return {e.path: RemoteFile(e.path, repo, commit, e.size, e.lfs.sha256 if e.lfs else None, e.blob_id)
                for e in entries if isinstance(e, RepoFile)}


def _transport_errors() -> tuple[type[BaseException], ...]:
    # huggingface_hub 1.x talks through httpx, 2.x through httpx2: take whichever it loaded.
    mods = (sys.modules.get(name) for name in ("httpx2", "httpx"))
    return (ConnectionError, TimeoutError, *(m.TransportError for m in mods if m is not None))


def hub_error(e: Exception, repo: str, revision: str, endpoint: str, token: str | None,
               path: str | None = None) -> Exception:
    """The DownloadError a huggingface_hub or network exception means; other exceptions unchanged."""
    from huggingface_hub import errors as hfe
    where = f"{repo}@{revision[:12] if re.fullmatch(r'[0-9a-f]{40}', revision) else revision}"
    if isinstance(e, hfe.GatedRepoError):
        msg = (f"{repo} is gated and the token in HF_TOKEN has no access to it" if token else
               f"{repo} is gated: downloading it needs a Hugging Face token")
        return DownloadError(msg, hint=f"accept the terms at {endpoint}/{repo}, then export HF_TOKEN=<a token "
                                       "of that account>")
    if isinstance(e, hfe.RepositoryNotFoundError):
        return DownloadError(f"repository {repo} not found on {endpoint}",
                             hint="check --repo" + ("" if token else "; a private repository also needs HF_TOKEN"))
    if isinstance(e, hfe.RevisionNotFoundError):
        return DownloadError(f"revision {revision!r} not found in {repo}",
                             hint="use a branch, a tag or a 40-hex commit of the repository")
    if isinstance(e, hfe.EntryNotFoundError):
        return DownloadError(f"{path or 'a file'} not found in {where}")
    if isinstance(e, hfe.HfHubHTTPError):
        status = e.response.status_code if getattr(e, "response", None) is not None else "?"
        return DownloadError(f"the hub answered HTTP {status} for {where}" + (f" ({path})" if path else ""),
                             hint="retry later; finished files are kept and a re-run resumes")
    if isinstance(e, (hfe.LocalEntryNotFoundError, *_transport_errors())):   # hf_hub_download: no connection
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        return DownloadError(f"cannot reach {endpoint}: {detail}",
                             hint="check the network or HF_ENDPOINT; a re-run resumes where this one stopped, "
                                  "and with HF_HUB_OFFLINE=1 grokconv checks what the directory already holds")
    return e

"""Fetch Grok-1 from the Hugging Face hub into the layout grokconv reads (``DIR/ckpt-0/tensorNNNNN_000``).

Metadata comes from ``HfApi`` (the commit a revision names, each file's size and LFS sha256); bytes
come through ``huggingface_hub.hf_hub_download`` (public API: Xet storage through ``hf_xet`` when the
hub serves it, its retries, auth and proxies, as ``hf download`` has them), pinned to the commit, into
``DIR/.grokconv/staging`` (its ``local_dir``). What grokconv adds on top:

- **The layer plan**: only the files a slice of layers needs (``--layers``), listed with ``--dry-run``.
- **Content verification.** Every fetched file is hashed and compared with the hub's LFS sha256 (the
  git blob sha1 for files not in LFS) before it is fsync'd and renamed to its final name: a file
  under its final name is always whole and verified. A file that fails is fetched once more
  (``force_download``), then the run stops with an error naming it.
- **Resume by file.** Files finished and verified earlier are listed in ``DIR/.grokconv/verified.jsonl``
  (path, size, mtime, hash) and are neither read nor fetched again. A file cut by a kill starts over:
  huggingface_hub >= 2 writes each transfer to a temporary name unique to the process and deletes it
  on failure, so there is no cross-run byte resume (see README).

``DIR/.grokconv/manifest.json`` (path, size, sha256, repo, commit of every file) is written when the
plan is made, marked complete at the end, and is what ``grokconv verify`` checks later (``hub/``).
HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE are read when a function is called, not at import.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path


from . import __version__
from .config import CONFIG_FILE, GrokConfig, load_preset
from .errors import DownloadError
from .formats.atomic import atomic_write, atomic_write_text, disk_full, durable_replace
from .formats.outputs import guard_output, make_fingerprint
from .hub.manifest import MANIFEST, MANIFEST_VERSION, STATE_DIR, is_sha256, read_manifest, safe_relpath
from .hub.progress import Progress
from .hub.verify import VerifyReport, verify_dir
from .schema import files_for_layers, param_specs
from .units import format_bytes as _format_bytes

__all__ = ["DEFAULT_REPO", "DEFAULT_TOKENIZER_REPO", "TOKENIZER_FILE", "ORIGINAL_TOKENIZER_SHA256", "MANIFEST",
           "RemoteFile", "DownloadPlan", "DownloadResult", "VerifyReport", "hub_settings", "plan_download",
           "download", "read_manifest", "verify_dir", "format_bytes"]

DEFAULT_REPO = "xai-org/grok-1"
# The hub's xai-org/grok-1 has no tokenizer.model (it is in the GitHub repository). keyfan/grok-1-hf
# carries it byte for byte (LFS sha256 below); Xenova/grok-1-tokenizer and hpcai-tech/grok-1 carry
# only a converted tokenizer.json.
DEFAULT_TOKENIZER_REPO = "keyfan/grok-1-hf"
TOKENIZER_FILE = "tokenizer.model"
ORIGINAL_TOKENIZER_SHA256 = "5c69d7cbad192fa2c9d14e2a77fbfdc11597c68907b043ddb0260e3d28eddd7f"  # 2,229,219 bytes

CKPT_DIR = "ckpt-0"
_LEDGER = f"{STATE_DIR}/verified.jsonl"
_STAGING = f"{STATE_DIR}/staging"      # hf_hub_download's local_dir: files land here before their check
_READ_CHUNK = 8 << 20
_CKPT_FILE_RE = re.compile(r"tensor\d{5}_\d{3}")


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


# --------------------------------------------------------------------------------------------- plan

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


@dataclass
class DownloadPlan:
    repo: str
    revision: str
    commit: str
    endpoint: str
    layers: list[int] | None            # None: every layer
    files: list[RemoteFile]
    tokenizer: str | None = None        # where tokenizer.model comes from, in words
    tokenizer_path: Path | None = None  # a local tokenizer.model to copy in

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


class _Hub:
    """HfApi calls, with huggingface_hub's errors turned into one-line DownloadErrors."""

    def __init__(self, endpoint: str, token: str | None):
        from huggingface_hub import HfApi
        self.endpoint, self.token = endpoint, token
        self.api = HfApi(endpoint=endpoint, token=token, library_name="grokconv", library_version=__version__)

    def resolve(self, repo: str, revision: str) -> str:
        try:
            return self.api.repo_info(repo, revision=revision).sha
        except Exception as e:
            raise _hub_error(e, repo, revision, self.endpoint, self.token) from None

    def list_files(self, repo: str, commit: str, folder: str | None = None) -> dict[str, RemoteFile]:
        from huggingface_hub.hf_api import RepoFile
        try:
            entries = list(self.api.list_repo_tree(repo, path_in_repo=folder, revision=commit))
        except Exception as e:
            raise _hub_error(e, repo, commit, self.endpoint, self.token, path=folder) from None
        return {e.path: RemoteFile(e.path, repo, commit, e.size, e.lfs.sha256 if e.lfs else None, e.blob_id)
                for e in entries if isinstance(e, RepoFile)}


def _transport_errors() -> tuple[type[BaseException], ...]:
    # huggingface_hub 1.x talks through httpx, 2.x through httpx2: take whichever it loaded.
    mods = (sys.modules.get(name) for name in ("httpx2", "httpx"))
    return (ConnectionError, TimeoutError, *(m.TransportError for m in mods if m is not None))


def _hub_error(e: Exception, repo: str, revision: str, endpoint: str, token: str | None,
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


def _tokenizer_note(sha256: str | None) -> str:
    if sha256 == ORIGINAL_TOKENIZER_SHA256:
        return "byte-identical to the original in github.com/xai-org/grok-1"
    return "NOT the file of github.com/xai-org/grok-1 (sha256 differs)"


def plan_download(cfg: GrokConfig, *, repo: str = DEFAULT_REPO, revision: str = "main", layers=None,
                  tokenizer_repo: str | None = DEFAULT_TOKENIZER_REPO, endpoint: str | None = None,
                  token: str | None = None) -> DownloadPlan:
    """Every file to fetch, with size and hash, from the hub's metadata (no file content is read).

    ``layers``: decoder layers to take (the embeddings and final norm always come); None for all.
    """
    env_endpoint, env_token, _ = hub_settings()
    endpoint, token = endpoint or env_endpoint, token or env_token
    hub = _Hub(endpoint, token)
    commit = hub.resolve(repo, revision)
    tree = hub.list_files(repo, commit, CKPT_DIR)
    on_hub = [p for p in tree if _CKPT_FILE_RE.fullmatch(p.rsplit("/", 1)[-1])]
    n_expected = len(param_specs(cfg))
    if len(on_hub) != n_expected:
        raise DownloadError(f"{repo}@{revision} has {len(on_hub)} checkpoint files under {CKPT_DIR}/; a "
                            f"{cfg.num_layers}-layer config expects {n_expected}",
                            hint="pass the --preset the repository's checkpoint was made with")
    specs = param_specs(cfg) if layers is None else files_for_layers(cfg, layers)
    files = []
    for spec in specs:
        path = f"{CKPT_DIR}/{spec.file}"
        if path not in tree:
            raise DownloadError(f"{path} ({spec.name}) is not in {repo}@{revision}")
        files.append(tree[path])
    plan = DownloadPlan(repo, revision, commit, endpoint, None if layers is None else sorted(layers), files)
    if tokenizer_repo:
        tok_commit = hub.resolve(tokenizer_repo, "main")
        root = hub.list_files(tokenizer_repo, tok_commit)
        if TOKENIZER_FILE not in root:
            has = ", ".join(sorted(root)[:6]) or "no files"
            raise DownloadError(f"{tokenizer_repo} has no {TOKENIZER_FILE} (it has {has})",
                                hint=f"use --tokenizer-repo {DEFAULT_TOKENIZER_REPO}, --tokenizer PATH (the file from "
                                     "github.com/xai-org/grok-1), or --no-tokenizer")
        tok = root[TOKENIZER_FILE]
        plan.files.append(tok)
        plan.tokenizer = f"{tokenizer_repo}@{tok_commit[:12]}, {_tokenizer_note(tok.sha256)}"
    return plan


# ------------------------------------------------------------------------------------ local state

class _Ledger:
    """``verified.jsonl``: files checked against their hash, so a re-run trusts them without re-reading."""

    def __init__(self, directory: Path):
        self.path = directory / _LEDGER
        self.entries: dict[str, dict] = {}
        self._lock = threading.Lock()
        if self.path.exists():
            for line in self.path.read_bytes().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line torn by a kill
                if isinstance(rec, dict) and safe_relpath(rec.get("path")):
                    self.entries[rec["path"]] = rec   # only trusted when size, mtime and oid all match

    def is_verified(self, f: RemoteFile, final: Path) -> bool:
        rec = self.entries.get(f.path)
        if rec is None or rec.get("oid") != f.oid:
            return False
        try:
            st = final.stat()
        except FileNotFoundError:
            return False
        return rec.get("size") == st.st_size == f.size and rec.get("mtime_ns") == st.st_mtime_ns

    def record(self, f: RemoteFile, final: Path, sha256: str) -> None:
        """``final`` (or the staged file about to be renamed to it: the rename keeps size and mtime)."""
        st = final.stat()
        rec = {"path": f.path, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "oid": f.oid, "sha256": sha256}
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            self.entries[f.path] = rec


class _Digest:
    """sha256 of what is written, and the git blob sha1 when the hub gives no LFS sha256."""

    def __init__(self, f: RemoteFile):
        self.f = f
        self.reset()

    def reset(self) -> None:
        self.sha = hashlib.sha256()
        self.git = None if self.f.sha256 else hashlib.sha1(b"blob %d\0" % self.f.size)

    def update(self, data) -> None:
        self.sha.update(data)
        if self.git is not None:
            self.git.update(data)

    def feed_file(self, path: Path, limit: int | None = None) -> None:
        left = path.stat().st_size if limit is None else limit
        with open(path, "rb") as fh:
            while left > 0:
                chunk = fh.read(min(_READ_CHUNK, left))
                if not chunk:
                    break
                self.update(chunk)
                left -= len(chunk)

    def problem(self, size: int) -> str | None:
        """None when the content is the file the hub declares, else what differs."""
        if size != self.f.size:
            return f"size {size:,} bytes, expected {self.f.size:,}"
        if self.f.sha256 is not None:
            got = self.sha.hexdigest()
            return None if got == self.f.sha256 else f"sha256 {got}, expected {self.f.sha256} (the hub's LFS metadata)"
        got = self.git.hexdigest()
        return None if got == self.f.blob_id else f"git blob sha1 {got}, expected {self.f.blob_id}"


def _check_present(f: RemoteFile, final: Path, ledger: _Ledger) -> bool:
    """Is ``final`` the file ``f``? Trusts the ledger; hashes (and records) a file it does not list."""
    if ledger.is_verified(f, final):
        return True
    if not final.is_file() or final.stat().st_size != f.size:
        return False
    digest = _Digest(f)
    digest.feed_file(final)
    if digest.problem(f.size) is not None:
        return False
    ledger.record(f, final, digest.sha.hexdigest())
    return True


def _write_manifest(directory: Path, plan: DownloadPlan, ledger: _Ledger, complete: bool) -> None:
    """Merge this plan into the directory's manifest (earlier layer slices stay listed)."""
    old = read_manifest(directory) or {}
    entries = {e["path"]: e for e in old.get("files", [])}
    for f in plan.files:
        rec = ledger.entries.get(f.path)
        sha = f.sha256 or (rec.get("sha256") if rec and rec.get("oid") == f.oid and is_sha256(rec.get("sha256"))
                           else None)
        entries[f.path] = {"path": f.path, "size": f.size, "sha256": sha, "repo": f.repo, "commit": f.commit}
    if plan.tokenizer_path is not None:
        rec = ledger.entries.get(TOKENIZER_FILE)
        if rec and is_sha256(rec.get("sha256")) and type(rec.get("size")) is int:
            entries[TOKENIZER_FILE] = {"path": TOKENIZER_FILE, "size": rec["size"], "sha256": rec["sha256"],
                                       "source": str(plan.tokenizer_path)}
    had_all = "layers" in old and old["layers"] is None
    layers = None if had_all or plan.layers is None else sorted(set(old.get("layers") or []) | set(plan.layers))
    manifest = {
        "grokconv_manifest": MANIFEST_VERSION, "repo": plan.repo, "revision": plan.revision,
        "commit": plan.commit, "endpoint": plan.endpoint, "layers": layers,
        "tokenizer": plan.tokenizer or old.get("tokenizer"), "complete": complete,
        "files": sorted(entries.values(), key=lambda e: e["path"]),
    }
    (directory / STATE_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=1) + "\n")


# ------------------------------------------------------------------------------------------ fetch

class _SilentBar:
    """Stands in for huggingface_hub's per-file bar (``tqdm_class``): the run has one bar of its own."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        pass

    def close(self):
        pass

    def set_description(self, *args, **kwargs):
        pass


class _Fetcher:
    """Each file through ``huggingface_hub.hf_hub_download`` into ``DIR/.grokconv/staging`` (its
    ``local_dir``), then hashed against the hub's LFS sha256 (or git blob sha1) and renamed to its final
    name; a file that fails is fetched once more (``force_download``), then the run stops."""

    def __init__(self, directory: Path, plan: DownloadPlan, token: str | None, ledger: _Ledger, workers: int,
                 progress: bool | None):
        self.dir, self.plan, self.token, self.ledger = directory, plan, token, ledger
        self.workers, self.progress = workers, progress
        self.staging = directory / _STAGING
        self.lock = threading.Lock()
        self.fetched_bytes = 0
        self.fetched_files = 0
        self.retried: list[str] = []
        self.bar = None

    def run(self, files: list[RemoteFile]) -> None:
        self.staging.mkdir(parents=True, exist_ok=True)
        for f in files:
            (self.dir / f.path).parent.mkdir(parents=True, exist_ok=True)
        maybe_present = sum(f.size for f in files if (self.dir / f.path).is_file())
        need = sum(f.size for f in files) - maybe_present
        free = shutil.disk_usage(self.dir).free
        if need > free:
            raise DownloadError(f"not enough disk space in {self.dir}: {format_bytes(need)} to fetch, "
                                f"{format_bytes(free)} free", hint="free space or choose another --dir; "
                                "finished files are kept and a re-run resumes")
        self.bar = Progress(sum(f.size for f in files), "download", self.progress)
        try:
            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                futures = [pool.submit(self._fetch_one, f) for f in sorted(files, key=lambda f: -f.size)]
                try:
                    for done, fut in enumerate(as_completed(futures), 1):
                        fut.result()
                        self.bar.note(f"{done}/{len(files)} files")
                except BaseException:
                    for fut in futures:
                        fut.cancel()
                    raise
        finally:
            self.bar.close()

    def _fetch_one(self, f: RemoteFile) -> None:
        final = self.dir / f.path
        if _check_present(f, final, self.ledger):  # there already (an earlier tool, or a killed rename)
            self.bar.update(f.size)
            return
        try:
            for attempt in (1, 2):
                staged = self._transfer(f, force=attempt > 1)
                digest = _Digest(f)
                digest.feed_file(staged)
                problem = digest.problem(staged.stat().st_size)
                if problem is None:
                    with open(staged, "rb") as fh:
                        os.fsync(fh.fileno())
                    # listed first, renamed second: a kill in between leaves no final file, so no
                    # file sits under its final name unlisted (a re-run would count it neither way)
                    self.ledger.record(f, staged, digest.sha.hexdigest())
                    durable_replace(staged, final)
                    with self.lock:
                        self.fetched_files += 1
                    self.bar.update(f.size)
                    return
                staged.unlink()
                if attempt == 1:
                    with self.lock:
                        self.retried.append(f.path)
            raise DownloadError(f"{f.path} from {f.repo}@{f.commit[:12]} failed verification twice: {problem}",
                                hint="the bytes served differ from what the hub's metadata declares (a proxy or "
                                     "mirror?); nothing unverified was kept")
        except DownloadError:
            raise
        except OSError as e:
            if disk_full(e) is not None:
                raise DownloadError(f"disk full while writing {f.path} in {self.dir}",
                                    hint="free space and re-run the same command: it resumes") from None
            raise _hub_error(e, f.repo, f.commit, self.plan.endpoint, self.token, path=f.path) from None
        except Exception as e:
            if disk_full(e) is not None:
                raise DownloadError(f"disk full while writing {f.path} in {self.dir}",
                                    hint="free space and re-run the same command: it resumes") from None
            raise _hub_error(e, f.repo, f.commit, self.plan.endpoint, self.token, path=f.path) from None

    def _transfer(self, f: RemoteFile, force: bool) -> Path:
        """The file as ``hf_hub_download`` leaves it in the staging folder (Xet, retries, auth, proxies as
        ``hf download`` has them); bytes counted as they arrive on disk."""
        path = Path(hf_hub_download(f.repo, f.path, revision=f.commit, local_dir=self.staging,
                                    endpoint=self.plan.endpoint or None, token=self.token, force_download=force,
                                    library_name="grokconv", library_version=__version__, tqdm_class=_SilentBar))
        with self.lock:
            self.fetched_bytes += path.stat().st_size
        return path


def hf_hub_download(*args, **kwargs) -> str:
    """``huggingface_hub.hf_hub_download``, imported when called (its settings are read at import)."""
    from huggingface_hub import hf_hub_download as get
    return get(*args, **kwargs)


# ----------------------------------------------------------------------------------------- driver

@dataclass
class DownloadResult:
    plan: DownloadPlan
    directory: Path
    present: list[str] = field(default_factory=list)    # verified before this run started
    fetched_files: int = 0
    fetched_bytes: int = 0                               # transferred by this run
    seconds: float = 0.0
    retried: list[str] = field(default_factory=list)    # fetched again after a failed check
    dry_run: bool = False
    offline: bool = False                                # HF_HUB_OFFLINE: checked, nothing fetched

    @property
    def rate(self) -> float:
        return self.fetched_bytes / self.seconds if self.seconds > 0 else 0.0


def _plan_offline(directory: Path, cfg: GrokConfig, repo: str, revision: str, layers, want_tokenizer: bool,
                  tokenizer_path: Path | None) -> DownloadPlan:
    """The plan an earlier online run recorded, for HF_HUB_OFFLINE: nothing is fetched, everything checked."""
    m = read_manifest(directory)
    hint = "unset HF_HUB_OFFLINE to fetch"
    if m is None:
        raise DownloadError(f"HF_HUB_OFFLINE is set and {directory} holds no earlier download ({MANIFEST})",
                            hint=hint)
    if m.get("repo") != repo or revision not in (m.get("revision"), m.get("commit")):
        raise DownloadError(f"HF_HUB_OFFLINE is set and {directory} holds {m.get('repo')}@{m.get('revision')}, "
                            f"not {repo}@{revision} (its {MANIFEST})", hint=hint)
    entries = {e["path"]: e for e in m["files"]}
    specs = param_specs(cfg) if layers is None else files_for_layers(cfg, layers)
    paths = [f"{CKPT_DIR}/{s.file}" for s in specs]
    if want_tokenizer and tokenizer_path is None:
        paths.append(TOKENIZER_FILE)
    files, unknown = [], []
    for p in paths:
        e = entries.get(p)
        if e is None or not e.get("sha256"):
            unknown.append(p)
        else:
            files.append(RemoteFile(p, e.get("repo", ""), e.get("commit", ""), e["size"], e["sha256"]))
    if unknown:
        raise DownloadError(f"HF_HUB_OFFLINE is set and {len(unknown)} requested file(s) were never fetched into "
                            f"{directory} (first: {unknown[0]}, which it lists with no sha256)", hint=hint,
                            path=directory / MANIFEST)
    return DownloadPlan(repo, revision, m["commit"], m.get("endpoint", ""),
                        None if layers is None else sorted(layers), files, tokenizer=m.get("tokenizer"))


def _install_tokenizer(src: Path, directory: Path, ledger: _Ledger) -> str:
    """Copy a local tokenizer.model in (temp name, then rename); its description for the summary."""
    digest = hashlib.sha256()
    with open(src, "rb") as fin, atomic_write(directory / TOKENIZER_FILE) as fout:
        while chunk := fin.read(_READ_CHUNK):
            digest.update(chunk)
            fout.write(chunk)
    sha = digest.hexdigest()
    ledger.record(RemoteFile(TOKENIZER_FILE, "", "", src.stat().st_size, sha), directory / TOKENIZER_FILE, sha)
    return f"{src} (local file), {_tokenizer_note(sha)}"


def download(directory, cfg: GrokConfig, *, repo: str = DEFAULT_REPO, revision: str = "main", layers=None,
             tokenizer_repo: str | None = DEFAULT_TOKENIZER_REPO, tokenizer_path=None, workers: int = 8,
             dry_run: bool = False, progress: bool | None = None, on_plan=None) -> DownloadResult:
    """Fetch ``repo``'s ``ckpt-0`` files (all, or those of ``layers``) and a tokenizer into ``directory``.

    Resumable and verified (see the module docstring). ``tokenizer_path``: copy this local
    tokenizer.model instead of fetching one; ``tokenizer_repo=None``: no tokenizer. With
    HF_HUB_OFFLINE set nothing is fetched: the files an earlier run recorded are checked.
    ``dry_run``: plan only (and say what is already present); nothing is written. ``on_plan``: called
    with the result (plan and files present) once the plan is made, before anything is written.
    """
    directory = Path(directory)
    tokenizer_path = None if tokenizer_path is None else Path(tokenizer_path)
    endpoint, token, offline = hub_settings()
    if offline:
        plan = _plan_offline(directory, cfg, repo, revision, layers, bool(tokenizer_repo), tokenizer_path)
    else:
        plan = plan_download(cfg, repo=repo, revision=revision, layers=layers,
                             tokenizer_repo=None if tokenizer_path else tokenizer_repo,
                             endpoint=endpoint, token=token)
    if tokenizer_path is not None:
        plan.tokenizer_path = tokenizer_path.resolve()
    ledger = _Ledger(directory)
    result = DownloadResult(plan, directory, dry_run=dry_run, offline=offline)
    result.present = [f.path for f in plan.files if ledger.is_verified(f, directory / f.path)]
    if on_plan is not None:
        on_plan(result)
    if dry_run:
        return result
    old = read_manifest(directory)
    if old is not None and old.get("repo") != plan.repo:
        raise DownloadError(f"{directory} already holds a download of {old.get('repo')} (its {MANIFEST})",
                            hint="choose another --dir for a different repository")
    started = time.monotonic()
    # one run at a time per directory (formats/outputs.py); layer slices of one repository accumulate
    guard = guard_output(directory, make_fingerprint("download", None, repo=plan.repo), key="download")
    try:
        _fetch_into(directory, cfg, plan, ledger, result, token, workers, progress, tokenizer_path, offline)
        guard.finish()
    finally:
        guard.close()
    result.seconds = time.monotonic() - started
    return result


def _fetch_into(directory: Path, cfg: GrokConfig, plan: DownloadPlan, ledger: _Ledger, result: DownloadResult,
                token, workers, progress, tokenizer_path, offline) -> None:
    if cfg != load_preset("grok-1"):
        cfg.save(directory / CONFIG_FILE)  # readers take grok-1 when there is none
    present = set(result.present)
    todo = [f for f in plan.files if f.path not in present]
    if offline:
        missing = [f.path for f in todo if not _check_present(f, directory / f.path, ledger)]
        if missing:
            raise DownloadError(f"HF_HUB_OFFLINE is set and {len(missing)} of {len(plan.files)} files are not "
                                f"(whole) in {directory} yet (first: {missing[0]}: not the size and sha256 "
                                f"{MANIFEST} records)", hint="unset HF_HUB_OFFLINE to fetch them")
    else:
        _write_manifest(directory, plan, ledger, complete=False)
        fetcher = _Fetcher(directory, plan, token, ledger, workers, progress)
        try:
            fetcher.run(todo)
        finally:
            result.fetched_files, result.fetched_bytes = fetcher.fetched_files, fetcher.fetched_bytes
            result.retried = fetcher.retried
    if tokenizer_path is not None:
        plan.tokenizer = _install_tokenizer(tokenizer_path, directory, ledger)
    if not offline:
        _write_manifest(directory, plan, ledger, complete=True)
        # hf_hub_download's own state (.cache/huggingface) and what a killed run of it left
        shutil.rmtree(directory / _STAGING, ignore_errors=True)

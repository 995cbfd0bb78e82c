"""Fetching: each planned file through ``huggingface_hub.hf_hub_download`` into a staging folder, hashed
against the hub's metadata, fsync'd and renamed into place; the ledger of files verified earlier."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from .. import __version__
from ..errors import DownloadError
from ..formats.atomic import disk_full, durable_replace
from .client import RemoteFile, format_bytes, hub_error
from .manifest import STATE_DIR, safe_relpath
from .progress import Progress

__all__ = ["LEDGER", "STAGING", "Ledger", "Digest", "check_present", "Fetcher", "hf_hub_download"]

LEDGER = f"{STATE_DIR}/verified.jsonl"
STAGING = f"{STATE_DIR}/staging"      # hf_hub_download's local_dir: files land here before their check
_READ_CHUNK = 8 << 20


class Ledger:
    """``verified.jsonl``: files checked against their hash, so a re-run trusts them without re-reading."""

    def __init__(self, directory: Path):
        self.path = directory / LEDGER
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


class Digest:
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


def check_present(f: RemoteFile, final: Path, ledger: Ledger) -> bool:
    """Is ``final`` the file ``f``? Trusts the ledger; hashes (and records) a file it does not list."""
    if ledger.is_verified(f, final):
        return True
    if not final.is_file() or final.stat().st_size != f.size:
        return False
    digest = Digest(f)
    digest.feed_file(final)
    if digest.problem(f.size) is not None:
        return False
    ledger.record(f, final, digest.sha.hexdigest())
    return True


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


class Fetcher:
    """Each file through ``huggingface_hub.hf_hub_download`` into ``DIR/.grokconv/staging`` (its
    ``local_dir``), then hashed against the hub's LFS sha256 (or git blob sha1) and renamed to its final
    name; a file that fails is fetched once more (``force_download``), then the run stops."""

    def __init__(self, directory: Path, plan, token: str | None, ledger: Ledger, workers: int,
                 progress: bool | None):
        self.dir, self.plan, self.token, self.ledger = directory, plan, token, ledger
        self.workers, self.progress = workers, progress
        self.staging = directory / STAGING
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
        if check_present(f, final, self.ledger):  # there already (an earlier tool, or a killed rename)
            self.bar.update(f.size)
            return
        try:
            for attempt in (1, 2):
                staged = self._transfer(f, force=attempt > 1)
                digest = Digest(f)
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
            raise hub_error(e, f.repo, f.commit, self.plan.endpoint, self.token, path=f.path) from None
        except Exception as e:
            if disk_full(e) is not None:
                raise DownloadError(f"disk full while writing {f.path} in {self.dir}",
                                    hint="free space and re-run the same command: it resumes") from None
            raise hub_error(e, f.repo, f.commit, self.plan.endpoint, self.token, path=f.path) from None

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

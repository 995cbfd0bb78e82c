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
plan is made, marked complete at the end, and is what ``grokconv verify`` checks later. This module
is the plan and the driver; hub calls and errors, fetching, the manifest and verify are in ``hub/``.
HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE are read when a function is called, not at import.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import CONFIG_FILE, GrokConfig, load_preset
from .errors import DownloadError
from .formats.atomic import atomic_write, atomic_write_text
from .formats.outputs import guard_output, make_fingerprint
from .hub.client import HubClient, RemoteFile, format_bytes, hub_settings
from .hub.fetch import STAGING, Fetcher, Ledger, check_present
from .hub.manifest import MANIFEST, MANIFEST_VERSION, STATE_DIR, is_sha256, read_manifest
from .hub.verify import VerifyReport, verify_dir
from .schema import files_for_layers, param_specs

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
_READ_CHUNK = 8 << 20
_CKPT_FILE_RE = re.compile(r"tensor\d{5}_\d{3}")


# --------------------------------------------------------------------------------------------- plan

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
    hub = HubClient(endpoint, token)
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

def _write_manifest(directory: Path, plan: DownloadPlan, ledger: Ledger, complete: bool) -> None:
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


def _install_tokenizer(src: Path, directory: Path, ledger: Ledger) -> str:
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
    ledger = Ledger(directory)
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


def _fetch_into(directory: Path, cfg: GrokConfig, plan: DownloadPlan, ledger: Ledger, result: DownloadResult,
                token, workers, progress, tokenizer_path, offline) -> None:
    if cfg != load_preset("grok-1"):
        cfg.save(directory / CONFIG_FILE)  # readers take grok-1 when there is none
    present = set(result.present)
    todo = [f for f in plan.files if f.path not in present]
    if offline:
        missing = [f.path for f in todo if not check_present(f, directory / f.path, ledger)]
        if missing:
            raise DownloadError(f"HF_HUB_OFFLINE is set and {len(missing)} of {len(plan.files)} files are not "
                                f"(whole) in {directory} yet (first: {missing[0]}: not the size and sha256 "
                                f"{MANIFEST} records)", hint="unset HF_HUB_OFFLINE to fetch them")
    else:
        _write_manifest(directory, plan, ledger, complete=False)
        fetcher = Fetcher(directory, plan, token, ledger, workers, progress)
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
        shutil.rmtree(directory / STAGING, ignore_errors=True)

"""A grokconv download's manifest, ``DIR/.grokconv/manifest.json``: path, size, sha256, repo and commit
of every file, written when a download is planned and marked complete at its end. Reading it checks
every field, so a damaged manifest is one error naming it."""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import CheckpointFormatError

__all__ = ["STATE_DIR", "MANIFEST", "MANIFEST_VERSION", "read_manifest", "manifest_problem", "is_sha256",
           "safe_relpath"]

STATE_DIR = ".grokconv"
MANIFEST = f"{STATE_DIR}/manifest.json"
MANIFEST_VERSION = 1


def read_manifest(directory) -> dict | None:
    """The directory's manifest, every field checked (None when there is none)."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        m = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:    # JSONDecodeError, UnicodeDecodeError, absurd nesting
        detail = str(e).splitlines()[0] if isinstance(e, ValueError) and str(e) else type(e).__name__
        raise CheckpointFormatError(f"not a grokconv download manifest: {detail}", path=path) from None
    problem = manifest_problem(m)
    if problem:
        raise CheckpointFormatError(f"not a grokconv download manifest: {problem}", path=path,
                                    hint="delete it and re-run `grokconv download` with the same options: "
                                         "files present are hashed, not fetched again")
    return m


def is_sha256(v) -> bool:
    return isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None


def _is_str(v) -> bool:
    return isinstance(v, str) and len(v) <= 4096


def safe_relpath(p) -> bool:
    """A path inside the download directory: relative, no '..', no empty or dot parts."""
    return (_is_str(p) and p != "" and not p.startswith("/") and "\\" not in p and "\0" not in p
            and all(part not in ("", ".", "..") for part in p.split("/")))


def manifest_problem(m) -> str | None:
    """What is wrong with a parsed manifest, or None."""
    if not isinstance(m, dict):
        return "not a JSON object"
    if m.get("grokconv_manifest") != MANIFEST_VERSION or type(m.get("grokconv_manifest")) is not int:
        return f"grokconv_manifest is {str(m.get('grokconv_manifest'))[:20]}, expected {MANIFEST_VERSION}"
    for key in ("repo", "revision", "commit"):
        if not _is_str(m.get(key)) or not m.get(key):
            return f"{key} is not a string"
    if not re.fullmatch(r"[0-9a-f]{40}", m["commit"]):
        return f"commit {m['commit'][:50]!r} is not 40 hex digits"
    for key in ("endpoint", "tokenizer"):
        if m.get(key) is not None and not _is_str(m.get(key)):
            return f"{key} is not a string"
    if not isinstance(m.get("complete"), bool):
        return "complete is not true or false"
    layers = m.get("layers")
    if layers is not None and not (isinstance(layers, list) and all(type(x) is int and x >= 0 for x in layers)):
        return "layers is neither null nor a list of layer numbers"
    files = m.get("files")
    if not isinstance(files, list) or not files:
        return "no file list"                # a download always lists its files: an empty list would verify nothing
    seen = set()
    for i, e in enumerate(files):
        if not isinstance(e, dict):
            return f"files[{i}] is not an object"
        unknown = sorted(set(e) - {"path", "size", "sha256", "repo", "commit", "source"})
        lacking = sorted({"path", "size", "sha256"} - set(e))
        if unknown or lacking:
            return f"files[{i}] has an unknown field {unknown[0][:40]!r}" if unknown else \
                f"files[{i}] lacks {lacking[0]!r}"
        p = e.get("path")
        if not safe_relpath(p):
            return f"files[{i}].path {str(p)[:60]!r} is not a relative path inside the directory"
        if p in seen:
            return f"{p} is listed twice"
        seen.add(p)
        if type(e.get("size")) is not int or e["size"] < 0:
            return f"{p}: size {str(e.get('size'))[:20]} is not a byte count"
        sha = e.get("sha256")
        if sha is not None and not is_sha256(sha):
            return f"{p}: sha256 {str(sha)[:70]!r} is not 64 hex digits"
        for key in ("repo", "commit", "source"):
            if key in e and not (e[key] is None or _is_str(e[key])):
                return f"{p}: {key} is not a string"
        if e.get("commit") and not re.fullmatch(r"[0-9a-f]{40}", e["commit"]):
            return f"{p}: commit {e['commit'][:50]!r} is not 40 hex digits"
    return None

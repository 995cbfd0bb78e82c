"""``grokconv verify DIR``: a grokconv download against its manifest (size and sha256 of every file), or a
safetensors directory through the safetensors reader's own checks (its index reader, every shard's
header, the index against the headers). Every problem is listed; nothing raises but a missing directory
or a manifest that is not one (one error naming it)."""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointFormatError
from .manifest import MANIFEST, read_manifest
from .progress import Progress

__all__ = ["VerifyReport", "verify_dir"]

_READ_CHUNK = 8 << 20


@dataclass
class VerifyReport:
    kind: str                  # "manifest" or "safetensors"
    source: str                # what was checked against, in words
    files: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)


def verify_dir(directory, *, workers: int = 4, progress: bool | None = None) -> VerifyReport:
    """Check a directory after the fact.

    A grokconv download: every file of its manifest, size and sha256. Otherwise a safetensors
    checkpoint: every shard its index names exists, its header parses and tiles the file, and holds
    the tensors the index assigns it (without an index, every ``*.safetensors`` file's header).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory")
    m = read_manifest(directory)
    if m is not None:
        return _verify_manifest(directory, m, workers, progress)
    if any(directory.glob("*.safetensors")) or any(directory.glob("*.safetensors.index.json")):
        return _verify_safetensors(directory)
    raise CheckpointFormatError(f"nothing to verify: no {MANIFEST} and no *.safetensors files", path=directory,
                                hint="a download without a manifest is checked by re-running "
                                     "`grokconv download --dir DIR` (finished files are hashed, not fetched)")


def _verify_manifest(directory: Path, m: dict, workers: int, progress: bool | None) -> VerifyReport:
    report = VerifyReport("manifest", f"{m.get('repo')}@{m.get('revision')} ({str(m.get('commit'))[:12]})")
    entries = m["files"]
    report.files = len(entries)
    report.bytes = sum(e["size"] for e in entries)
    bar = Progress(report.bytes, "verify", progress)

    def check(e: dict) -> str | None:
        path = directory / e["path"]
        if not path.is_file():
            return f"{e['path']}: missing (listed in {MANIFEST})"
        size = path.stat().st_size
        if size != e["size"]:
            bar.update(e["size"])
            return f"{e['path']}: size {size:,} bytes, expected {e['size']:,} ({MANIFEST})"
        if not e.get("sha256"):
            bar.update(size)
            return f"{e['path']}: no sha256 recorded in {MANIFEST} (its download never finished)"
        sha = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(_READ_CHUNK):
                sha.update(chunk)
                bar.update(len(chunk))
        got = sha.hexdigest()
        return None if got == e["sha256"] else f"{e['path']}: sha256 {got}, expected {e['sha256']} ({MANIFEST})"

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            report.problems = [p for p in pool.map(check, entries) if p]
    finally:
        bar.close()
    return report


def _verify_safetensors(directory: Path) -> VerifyReport:
    """Every shard the index names (every ``*.safetensors`` without one) through the reader's checks."""
    from ..formats.safetensors import index_mismatches, read_index
    from ..formats.safetensors_io import read_header
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    report = VerifyReport("safetensors", ", ".join(p.name for p in indexes) or "shard headers (no index)")
    by_shard: dict[str, list[str]] = {}        # shard -> its problems, reported in shard order
    weight_map: dict[str, str] = {}
    for index in indexes:
        try:
            part = read_index(index)           # the reader's rules: a non-empty map of names to shard files
        except CheckpointFormatError as e:
            report.problems.append(str(e))
            continue
        weight_map.update(part)
    shards = sorted(set(weight_map.values())) if indexes else sorted(p.name for p in directory.glob("*.safetensors"))
    where: dict[str, str] = {}
    readable = set()
    for shard in shards:
        path = directory / shard
        if not path.is_file():
            n = sum(1 for s in weight_map.values() if s == shard)
            by_shard.setdefault(shard, []).append(f"{shard}: missing ({n} tensors of the index are in it)")
            continue
        report.files += 1
        report.bytes += path.stat().st_size
        try:
            tensors = read_header(path)[0]     # every format rule, reads no tensor data
        except CheckpointFormatError as e:
            by_shard.setdefault(shard, []).append(str(e))
            continue
        readable.add(shard)
        for name in tensors:
            where.setdefault(name, shard)
    if indexes and weight_map:
        missing, extra = index_mismatches(weight_map, where)
        lacks: dict[str, list[str]] = {}
        for name in missing:
            if weight_map[name] in readable:
                lacks.setdefault(weight_map[name], []).append(name)
        holds: dict[str, list[str]] = {}
        for name in extra:
            holds.setdefault(where[name], []).append(name)
        for shard, names in lacks.items():
            by_shard.setdefault(shard, []).append(f"{shard}: lacks {len(names)} tensor(s) the index puts there, "
                                                  f"first {sorted(names)[0]}")
        for shard, names in holds.items():
            by_shard.setdefault(shard, []).append(f"{shard}: holds {len(names)} tensor(s) the index does not list, "
                                                  f"first {sorted(names)[0]}")
    for shard in sorted(by_shard):
        report.problems += by_shard[shard]
    return report

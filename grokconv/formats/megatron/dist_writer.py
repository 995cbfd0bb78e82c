"""The torch_dist checkpoint (Megatron-LM's default ``--ckpt-format torch_dist``), written streamed.

    DST/release/__0_0.distcp     every chunk as ``torch.save(chunk)`` appended, and every ``_extra_state``
                                 object as ``torch.save([None])`` (what PyTorch DCP's FileSystemWriter writes)
    DST/release/.metadata        a pickled ``torch.distributed.checkpoint.metadata.Metadata``
    DST/release/common.pt        {"args", "checkpoint_version": 3.0, "iteration": 0, "content_metadata"}
    DST/release/metadata.json    Megatron-Core's marker of a distributed checkpoint, written last

One chunk in memory at a time (:mod:`.dist_plan` sizes them), so memory does not grow with the model.
Hand-written rather than through ``torch.distributed.checkpoint.save``: each file is written under a
temporary name and renamed when whole, and every byte is a function of the source and the options
(DCP's writer names its files in place and stamps a random save id into ``.metadata``), which is
what a killed run and its rerun need. Before ``.metadata`` is written, the chunks recorded are checked
to tile every tensor exactly (:func:`.dist_plan.check_tiling`), since the loader does not check it.
"""
from __future__ import annotations

import argparse
import json
import pickle
import time
from pathlib import Path

import torch
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _StorageInfo
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, TensorProperties, TensorStorageMetadata)

from ..atomic import TMP_SUFFIX, atomic_write
from .checkpoint_dir import DIST_MARKER
from .dist_plan import DistPlan, check_tiling
from .plan import CHECKPOINT_VERSION

__all__ = ["write_dist", "dist_complete", "common_state", "DATA_FILE", "MARKER_JSON"]

DATA_FILE = "__0_0.distcp"
COMMON_FILE = "common.pt"
METADATA_FILE = ".metadata"
# exactly what Megatron-Core writes (read as CheckpointingConfig(**json): no other keys)
MARKER_JSON = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
               "common_backend_version": 1}


def common_state(args: argparse.Namespace) -> dict:
    """``common.pt`` as Megatron-LM's ``save_checkpoint`` writes it for a release checkpoint."""
    return {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0,
            "content_metadata": {"singleton_local_shards": False}}


def dist_complete(iter_dir: Path, args: argparse.Namespace, guard=None) -> bool:
    """The one "is this checkpoint already done" decision: the marker is there (written last), a run of
    this fingerprint made every file durable (``guard``: :class:`grokconv.formats.outputs.OutputGuard`),
    and ``common.pt`` holds the same args."""
    if not (iter_dir / DIST_MARKER).is_file():
        return False
    if guard is not None and not all(guard.is_complete(iter_dir / n)
                                     for n in (DATA_FILE, METADATA_FILE, COMMON_FILE, DIST_MARKER)):
        return False
    try:
        from .rankfile import load_rank_file
        old = load_rank_file(iter_dir / COMMON_FILE)
    except Exception:
        return False
    return isinstance(old.get("args"), argparse.Namespace) and vars(old["args"]) == vars(args)


def write_dist(reader, plan: DistPlan, args: argparse.Namespace, iter_dir: Path, summary, bar, guard=None) -> None:
    def durable(name):
        return None if guard is None else (lambda n: guard.done(iter_dir / name, n))

    if dist_complete(iter_dir, args, guard):
        summary.shards_skipped += 1
        bar.update(plan.total_bytes)
        return
    stray = sorted(p.name for p in iter_dir.iterdir() if p.name.startswith("mp_rank_"))
    if stray:
        from ...errors import LayoutError
        raise LayoutError(f"{iter_dir} already holds legacy rank directories ({', '.join(stray[:4])}); write to an "
                          "empty directory", path=iter_dir.parent)
    (iter_dir / DIST_MARKER).unlink(missing_ok=True)         # the marker goes last
    for p in iter_dir.iterdir():
        if p.name.endswith(TMP_SUFFIX) or p.name.endswith(".distcp"):
            p.unlink()
    md: dict = {}
    storage: dict = {}
    phases = summary.phases
    recorded: dict = {}
    with atomic_write(iter_dir / DATA_FILE, durable=durable(DATA_FILE)) as f:
        def put(fqn: str, offsets, value) -> None:
            start = f.tell()
            torch.save(value, f)
            storage[MetadataIndex(fqn, offsets)] = _StorageInfo(DATA_FILE, start, f.tell() - start)

        for key in plan.objects:
            put(key, None, [None])
            md[key] = BytesStorageMetadata()
        for t in plan.tensors:
            chunks = recorded.setdefault(t.key, [])
            for c in t.chunks:
                t0 = time.perf_counter()
                value = plan.build(reader, t, c).contiguous()
                t1 = time.perf_counter()
                put(t.key, c.offsets, value)
                phases["build"] = phases.get("build", 0.0) + t1 - t0
                phases["write"] = phases.get("write", 0.0) + time.perf_counter() - t1
                chunks.append((c.offsets, c.sizes))
                bar.update(value.numel() * value.element_size())
                del value
            md[t.key] = TensorStorageMetadata(TensorProperties(dtype=t.dtype), torch.Size(t.shape),
                                              [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in chunks])
        f.flush()
    summary.tensors += len(plan.tensors)
    for t in plan.tensors:                                   # what was written, not what was meant
        check_tiling(t.key, t.shape, recorded[t.key])
    meta = Metadata(state_dict_metadata=md, planner_data=None, storage_data=storage, storage_meta=None,
                    version=CURRENT_DCP_VERSION)
    with atomic_write(iter_dir / METADATA_FILE, durable=durable(METADATA_FILE)) as f:
        pickle.dump(meta, f, protocol=pickle.HIGHEST_PROTOCOL)
    with atomic_write(iter_dir / COMMON_FILE, durable=durable(COMMON_FILE)) as f:
        torch.save(common_state(args), f)
    summary.shards_written += 1
    summary.bytes_written += sum((iter_dir / n).stat().st_size for n in (DATA_FILE, METADATA_FILE, COMMON_FILE))
    with atomic_write(iter_dir / DIST_MARKER, "w", durable=durable(DIST_MARKER)) as f:
        f.write(json.dumps(MARKER_JSON))

"""Megatron-Core legacy torch checkpoints (``--ckpt-format torch``) read back as canonical Grok-1 tensors.

``DIR/latest_checkpointed_iteration.txt`` names ``release`` or an iteration; its directory holds
``mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]/model_optim_rng.pt``. Rank files are opened with
``torch.load(weights_only=True, mmap=True)`` (:mod:`.rankfile`): nothing is executed, and tensors stay
on disk until a slice is used, so memory is bounded by the few rank files one parameter spans (its TP ranks).

A parameter is reassembled by running the mapping objects (:mod:`.layout`) backwards: TP shards
merged, QKV de-interleaved, fc1 split into gate and up, experts found on their EP rank, layers on
their pipeline stage and virtual chunk, vocab padding dropped.
"""
from __future__ import annotations

import argparse
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from ...errors import CheckpointFormatError, MissingTensorError, ShapeMismatchError
from ...sharding import checkpoint_dir_name, expert_owner, layer_location
from ...tensor import from_torch
from ..base import CheckpointReader, StoredTensor
from .args_read import check_args, parallel_from_args, resolve_config, transformer_impl
from .checkpoint_dir import RANK_DIR, has_rank_dirs
from .layout import load_megatron_layout
from .plan import RANK_FILE, plan_megatron
from .rankfile import load_rank_file

__all__ = ["MegatronCheckpoint"]


class MegatronCheckpoint(CheckpointReader):
    format = "megatron"

    def __init__(self, root: Path, iter_dir: Path, *, layers=None, strict: bool = True,
                 cache_files: int | None = None):
        self.iter_dir = iter_dir
        if not has_rank_dirs(self.iter_dir):
            raise MissingTensorError("no mp_rank_* rank directories", path=self.iter_dir)
        first = sorted(c.name for c in self.iter_dir.iterdir() if RANK_DIR.match(c.name))[0]
        head = load_rank_file(self.iter_dir / first / RANK_FILE)
        args = head.get("args")
        if not isinstance(args, argparse.Namespace):
            raise CheckpointFormatError("rank file has no args Namespace", path=self.iter_dir / first)
        self.args = args
        self._first = self.iter_dir / first / RANK_FILE
        self.par = parallel_from_args(args, self._first)
        missing = [d for d in self._rank_dirs() if not (self.iter_dir / d / RANK_FILE).exists()]
        if missing:
            raise MissingTensorError(f"{len(missing)} rank file(s) missing for tp={self.par.tp} pp={self.par.pp} "
                                     f"ep={self.par.ep}, first {missing[0]}/{RANK_FILE}", path=self.iter_dir)
        cfg, self.config_source = resolve_config(root, args, self._first)
        pad = getattr(args, "grokconv_vocab_padding", "replicate")
        if pad not in ("replicate", "zero"):
            raise CheckpointFormatError(f"args grokconv_vocab_padding {str(pad)[:20]!r} is neither replicate nor "
                                        "zero", path=self._first)
        model = head.get("model", head.get("model0"))
        self.impl = transformer_impl(model.keys() if isinstance(model, dict) else (), args)
        self.layout = load_megatron_layout(pad, self.impl)
        check_args(self.args, cfg, self.par, self.config_source, self._first)
        self._files: OrderedDict = OrderedDict()
        self._lock = threading.Lock()          # to_safetensors reads from worker threads
        # one pipeline stage's files (every TP x EP rank a layer spans) plus the first/last-stage globals;
        # mapped, not read: only the pages of the slices used are touched
        self._cache = cache_files or self.par.tp * self.par.ep + 2 * self.par.tp + 2
        super().__init__(root, cfg, list(range(cfg.num_layers)))
        if strict:
            self.require_layers(layers, root)
            # every rank file's names, shapes and dtypes against the plan, now (pickles only, the
            # tensors stay mapped): a damaged rank file is refused before a conversion writes anything
            for problem, where in self._rank_problems():
                raise CheckpointFormatError(problem, path=where)

    # -- rank files ----------------------------------------------------------------------------
    def _rank_dirs(self) -> list[str]:
        return [checkpoint_dir_name(t, p, e, self.par.pp, self.par.ep) for t, p, e in self.par.ranks()]

    def _rank(self, tp: int, pp: int, ep: int) -> dict:
        d = checkpoint_dir_name(tp, pp, ep, self.par.pp, self.par.ep)
        with self._lock:
            if d in self._files:
                self._files.move_to_end(d)
                return self._files[d]
            obj = load_rank_file(self.iter_dir / d / RANK_FILE)   # mmapped: pages load on use
            self._files[d] = obj
            while len(self._files) > self._cache:
                self._files.popitem(last=False)
            return obj

    def _model(self, tp: int, pp: int, ep: int, chunk: int) -> dict:
        obj = self._rank(tp, pp, ep)
        key = "model" if self.par.vp is None else f"model{chunk}"
        sd = obj.get(key)
        if not isinstance(sd, dict):
            d = checkpoint_dir_name(tp, pp, ep, self.par.pp, self.par.ep)
            raise MissingTensorError(f"rank file has no {key!r} state dict (keys: {sorted(obj)[:6]})",
                                     path=self.iter_dir / d / RANK_FILE)
        return sd

    def _tensor(self, mapping, key: str, tp: int, pp: int, ep: int, chunk: int) -> torch.Tensor:
        sd = self._model(tp, pp, ep, chunk)
        d = checkpoint_dir_name(tp, pp, ep, self.par.pp, self.par.ep)
        where = f"{d}/{RANK_FILE}" + (f" model{chunk}" if self.par.vp is not None else "")
        if key not in sd:
            raise MissingTensorError(f"{where}: no tensor {key}", path=self.iter_dir)
        t = sd[key]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            what = f"a {t.dtype} tensor" if isinstance(t, torch.Tensor) else f"a {type(t).__name__}"
            raise CheckpointFormatError(f"{where}: {key} is {what}, not a floating-point tensor", path=self.iter_dir)
        shape = mapping.rank_shape(self.config, self.par)
        if tuple(t.shape) != tuple(shape):
            raise ShapeMismatchError(f"{where}: {key} has shape {tuple(t.shape)}, expected {tuple(shape)}",
                                     path=self.iter_dir, expected=tuple(shape), got=tuple(t.shape))
        return t

    def _locate(self, mapping, layer: int | None):
        """(pp rank, chunk, local layer) of a per-layer tensor, or of a first/last-stage global."""
        if layer is not None:
            return layer_location(layer, self.config.num_layers, self.par.pp, self.par.vp)
        if mapping.stage == "last":
            return self.par.pp - 1, self.par.chunks - 1, None
        return 0, 0, None

    def _parts(self, mapping, layer: int | None, expert: int | None) -> list[torch.Tensor]:
        """Every TP rank's tensor (mapped from disk, not copied)."""
        pp, chunk, local = self._locate(mapping, layer)
        ep, local_e = (0, None) if expert is None else expert_owner(expert, self.config.num_experts, self.par.ep)
        key = mapping.key(local, local_e)
        return [self._tensor(mapping, key, t, pp, ep, chunk) for t in range(self.par.tp)]

    # -- canonical -----------------------------------------------------------------------------
    def load(self, name: str, index: int | None = None):
        spec = self.spec(name)
        mapping, part, layer = self.layout.find(name)
        if mapping.experts:
            if index is None:
                return np.stack([self.load(name, e) for e in range(spec.shape[0])])
            if not 0 <= index < spec.shape[0]:
                raise MissingTensorError(f"{name}: expert {index} out of range 0..{spec.shape[0] - 1}")
            value = mapping.merge(self._parts(mapping, layer, index), self.config, self.par, part)
        else:
            parts = self._parts(mapping, layer, None)
            if mapping.role == "embedding" and mapping.stage == "first" and self.layout.output_layer is not None:
                self._check_output_layer(parts)
            value = mapping.merge(parts, self.config, self.par, part)
            if index is not None:
                value = value[index]
        return from_torch(value.contiguous())

    def _check_output_layer(self, emb_parts: list[torch.Tensor]) -> None:
        """Grok-1 ties input and output embeddings; an output layer that differs cannot be carried back.
        Compared TP shard by TP shard, on the mapped files (no copy of the table)."""
        if not (self.par.untie or self.par.pp > 1):
            return
        V = self.config.vocab_size
        rows = emb_parts[0].shape[0]
        diff = 0
        for t, (a, b) in enumerate(zip(emb_parts, self._parts(self.layout.output_layer, None, None))):
            real = max(0, min(rows, V - t * rows))              # padding rows are not compared
            if not torch.equal(a[:real], b[:real].to(a.dtype)):
                diff += int((a[:real] != b[:real].to(a.dtype)).any(dim=-1).sum())
        if diff:
            raise CheckpointFormatError(
                f"output_layer.weight differs from embedding.word_embeddings.weight in {diff} of {V} vocab rows; "
                "Grok-1 ties them, so this model cannot be written in a Grok-1 layout without losing its output "
                "layer", path=self.iter_dir)

    def stored(self) -> list[StoredTensor]:
        out = []
        for t, p, e in self.par.ranks():
            d = checkpoint_dir_name(t, p, e, self.par.pp, self.par.ep)
            obj = self._rank(t, p, e)
            for mk in (["model"] if self.par.vp is None else [f"model{c}" for c in range(self.par.vp)]):
                for k, v in (obj.get(mk) or {}).items():
                    if isinstance(v, torch.Tensor):
                        name = f"{d}/{mk}/{k}"
                        out.append(StoredTensor(name, tuple(v.shape), str(v.dtype).replace("torch.", ""),
                                                v.numel() * v.element_size(), str(self.iter_dir / d / RANK_FILE)))
        return out

    def _rank_problems(self):
        """(problem, rank file) for every rank file whose state dicts do not hold what the plan puts there."""
        pad = getattr(self.args, "grokconv_vocab_padding", "replicate")
        plan = plan_megatron(self.config, self.par, pad, self.impl)
        keys = plan.model_keys()
        for rp in plan.ranks:
            path = self.iter_dir / rp.dirname / RANK_FILE
            obj = self._rank(rp.tp, rp.pp, rp.ep)
            if not isinstance(obj.get("args"), argparse.Namespace):
                yield "rank file has no args Namespace", path
                continue
            for c, mk in enumerate(keys):
                sd = obj.get(mk)
                if not isinstance(sd, dict):
                    yield f"no {mk!r} state dict (keys: {sorted(map(str, obj))[:6]})", path
                    continue
                want = {t.key: t for t in rp.tensors if t.chunk == c}
                have = {k for k in sd if not (isinstance(k, str) and k.endswith("_extra_state"))}
                for k in sorted(set(want) - have)[:3]:
                    yield f"{mk}: missing {k} (config: {self.config_source})", path
                for k in sorted(map(str, have - set(want)))[:3]:
                    yield f"{mk}: unexpected {k[:80]} (config: {self.config_source})", path
                for k in sorted(set(want) & have):
                    v, t = sd[k], want[k]
                    if not isinstance(v, torch.Tensor):
                        yield f"{mk}: {k} is a {type(v).__name__}, not a tensor", path
                    elif tuple(v.shape) != tuple(t.shape) or not v.is_floating_point():
                        # any float dtype: Megatron itself may save norms and routers in bf16
                        yield (f"{mk}: {k} is {str(v.dtype).replace('torch.', '')}{list(v.shape)}, expected a "
                               f"float tensor of shape {list(t.shape)} (config: {self.config_source})"), path

    def problems(self) -> list[str]:
        probs = []
        for problem, where in self._rank_problems():
            probs.append(f"{where.parent.name} {problem}")
            if len(probs) > 10:
                break
        return probs

    def close(self) -> None:
        self._files.clear()

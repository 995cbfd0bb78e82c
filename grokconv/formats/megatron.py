"""Megatron-Core legacy torch checkpoints (``--ckpt-format torch``) read back as canonical Grok-1 tensors.

``DIR/latest_checkpointed_iteration.txt`` names ``release`` or an iteration; its directory holds
``mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]/model_optim_rng.pt``. Rank files are opened with
``torch.load(weights_only=True, mmap=True)``: nothing is executed, and tensors stay on disk until a
slice is used, so memory is bounded by the few rank files one parameter spans (its TP ranks). Globals
outside torch's allow-list are accepted only as inert stand-ins, and only from Megatron's own config
modules (enums in ``args``); anything else is refused.

A parameter is reassembled by running the mapping objects of ``grokconv/megatron.py`` backwards:
TP shards merged, QKV de-interleaved, fc1 split into gate and up, experts found on their EP rank,
layers on their pipeline stage and virtual chunk, vocab padding dropped.
"""
from __future__ import annotations

import argparse
import re
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from ..config import CONFIG_FILE, GrokConfig, load_preset
from ..errors import CheckpointFormatError, LayoutError, MissingTensorError, ShapeMismatchError, UnsafePickleError
from ..sharding import Parallel, checkpoint_dir_name, expert_owner, layer_location, validate_parallel
from ..tensor import from_torch
from .base import CheckpointReader, StoredTensor, register_format

__all__ = ["MegatronCheckpoint", "load_rank_file", "STUB_MODULES"]

TRACKER_FILE = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"^mp_rank_\d{2}(_\d{3}){0,2}$")
_ITER_DIR = re.compile(r"^iter_\d{7}$")
# Real Megatron args carry enums and small config classes from these packages; they load as inert
# stand-ins (their code is never imported or run).
STUB_MODULES = ("megatron.", "transformer_engine.", "nemo.", "modelopt.")


# ----------------------------------------------------------------------------------------------------
# Safe loading
# ----------------------------------------------------------------------------------------------------
class _Opaque:
    """Stand-in for a global of Megatron's config modules: records what it was built with, runs nothing."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<{type(self).__qualname__} {self.args!r}>"


def load_rank_file(path, *, mmap: bool = True) -> dict:
    """``torch.load`` of one rank file with ``weights_only=True``: tensors, containers, dtypes and
    ``argparse.Namespace``; Megatron config globals as inert stand-ins; anything else refused."""
    path = Path(path)
    from torch.serialization import get_unsafe_globals_in_checkpoint, safe_globals
    try:
        unknown = get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:
        raise CheckpointFormatError(f"not a torch checkpoint: {e}", path=path) from None
    stubs = []
    for g in unknown:
        if g == "argparse.Namespace":
            continue
        if not g.startswith(STUB_MODULES):
            raise UnsafePickleError(f"the pickle names the global {g}, which is neither a tensor type nor a "
                                    "Megatron config type; refusing to load it", path=path, global_name=g)
        stubs.append((type(g.rsplit(".", 1)[-1], (_Opaque,), {"__qualname__": g}), g))
    try:
        with safe_globals([argparse.Namespace, *stubs]):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as e:
        if mmap and "mmap" in str(e):        # a legacy (non-zip) torch file cannot be mapped
            return load_rank_file(path, mmap=False)
        raise CheckpointFormatError(f"cannot load rank file: {e}", path=path) from None
    except Exception as e:
        raise CheckpointFormatError(f"cannot load rank file safely: {str(e).splitlines()[-1] if str(e) else e}",
                                    path=path) from None
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"a rank file holds a {type(obj).__name__}, not a dict", path=path)
    return obj


# ----------------------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------------------
def _root(path: Path) -> Path:
    """The checkpoint root, also from ``ROOT/release`` or ``ROOT/iter_NNNNNNN``."""
    p = Path(path)
    if p.is_dir() and (p.name == "release" or _ITER_DIR.match(p.name)) and not (p / TRACKER_FILE).exists():
        return p.parent
    return p


def _has_rank_dirs(d: Path) -> bool:
    return d.is_dir() and any(c.is_dir() and _RANK_DIR.match(c.name) for c in d.iterdir())


def _detect(path) -> bool:
    p = Path(path)
    if not p.is_dir():
        return False
    if (p / TRACKER_FILE).exists() or _has_rank_dirs(p / "release"):
        return True
    return (p.name == "release" or bool(_ITER_DIR.match(p.name))) and _has_rank_dirs(p)


def _iteration_dir(root: Path) -> Path:
    tracker = root / TRACKER_FILE
    if tracker.exists():
        try:
            text = tracker.read_bytes()[:64].decode("ascii").strip()
        except UnicodeDecodeError:
            raise CheckpointFormatError("tracker file is not text ('release' or an iteration number)",
                                        path=tracker) from None
        if text == "release":
            return root / "release"
        try:
            if not text.isdigit():
                raise ValueError(text)
            return root / f"iter_{int(text):07d}"
        except ValueError:
            raise CheckpointFormatError(f"tracker file holds {text!r}, neither 'release' nor an iteration",
                                        path=tracker) from None
    if (root / "release").is_dir():
        return root / "release"
    raise MissingTensorError(f"no {TRACKER_FILE} and no release/ directory", path=root)


# ----------------------------------------------------------------------------------------------------
# The reader
# ----------------------------------------------------------------------------------------------------
class MegatronCheckpoint(CheckpointReader):
    format = "megatron"

    def __init__(self, path, *, layers=None, strict: bool = True, cache_files: int | None = None):
        from ..megatron import load_megatron_layout
        root = _root(Path(path))
        self.iter_dir = _iteration_dir(root)
        if not _has_rank_dirs(self.iter_dir):
            if (self.iter_dir / ".metadata").exists() or (self.iter_dir / "common.pt").exists():
                raise CheckpointFormatError(
                    "a torch_dist (distributed) checkpoint; grokconv reads the legacy torch format",
                    path=self.iter_dir,
                    hint="convert it with Megatron first (--ckpt-convert-format torch, or tools/checkpoint "
                         "with --ckpt-format torch)")
            raise MissingTensorError("no mp_rank_* rank directories", path=self.iter_dir)
        first = sorted(c.name for c in self.iter_dir.iterdir() if _RANK_DIR.match(c.name))[0]
        head = load_rank_file(self.iter_dir / first / RANK_FILE)
        args = head.get("args")
        if not isinstance(args, argparse.Namespace):
            raise CheckpointFormatError("rank file has no args Namespace", path=self.iter_dir / first)
        self.args = args
        self._first = self.iter_dir / first / RANK_FILE
        vp = _size_arg(args, "virtual_pipeline_model_parallel_size", None, self._first)
        self.par = Parallel(_size_arg(args, "tensor_model_parallel_size", 1, self._first),
                            _size_arg(args, "pipeline_model_parallel_size", 1, self._first),
                            _size_arg(args, "expert_model_parallel_size", 1, self._first),
                            vp if vp not in (None, 1) else None,
                            bool(getattr(args, "untie_embeddings_and_output_weights", False)),
                            _size_arg(args, "make_vocab_size_divisible_by", 128, self._first))
        missing = [d for d in self._rank_dirs() if not (self.iter_dir / d / RANK_FILE).exists()]
        if missing:
            raise MissingTensorError(f"{len(missing)} rank file(s) missing for tp={self.par.tp} pp={self.par.pp} "
                                     f"ep={self.par.ep}, first {missing[0]}/{RANK_FILE}", path=self.iter_dir)
        cfg = self._config(root)
        pad = getattr(args, "grokconv_vocab_padding", "replicate")
        if pad not in ("replicate", "zero"):
            raise CheckpointFormatError(f"args grokconv_vocab_padding {str(pad)[:20]!r} is neither replicate nor "
                                        "zero", path=self._first)
        self.impl = _transformer_impl(head, args)
        self.layout = load_megatron_layout(pad, self.impl)
        self._check_args(cfg)
        self._files: OrderedDict = OrderedDict()
        self._lock = threading.Lock()          # to_safetensors reads from worker threads
        # one pipeline stage's files (every TP x EP rank a layer spans) plus the first/last-stage globals;
        # mapped, not read: only the pages of the slices used are touched
        self._cache = cache_files or self.par.tp * self.par.ep + 2 * self.par.tp + 2
        super().__init__(root, cfg, list(range(cfg.num_layers)))
        if layers is not None and strict:
            bad = sorted(set(layers) - set(self.layers))
            if bad:
                raise MissingTensorError(f"layers {bad} are not in this checkpoint ({cfg.num_layers} layers)",
                                         path=root)
        if strict:
            # every rank file's names, shapes and dtypes against the plan, now (pickles only, the
            # tensors stay mapped): a damaged rank file is refused before a conversion writes anything
            for problem, where in self._rank_problems():
                raise CheckpointFormatError(problem, path=where)

    # -- config --------------------------------------------------------------------------------
    def _config(self, root: Path) -> GrokConfig:
        if (root / CONFIG_FILE).exists():
            self.config_source = str(root / CONFIG_FILE)
            return GrokConfig.load(root / CONFIG_FILE)
        self.config_source = f"the args of {self._first}"
        stored = getattr(self.args, "grokconv_config", None)
        if stored is not None:
            return GrokConfig.from_dict(stored, path=self._first)
        return _config_from_args(self.args, self._first)

    def _check_args(self, cfg: GrokConfig) -> None:
        a = self.args
        want = {"num_layers": cfg.num_layers, "hidden_size": cfg.emb_size, "num_attention_heads": cfg.num_q_heads,
                "num_query_groups": cfg.num_kv_heads, "num_experts": cfg.num_experts}
        for k, v in want.items():
            got = getattr(a, k, None)
            if got is not None and got != v:
                raise ShapeMismatchError(f"checkpoint args {k}={str(got)[:20]}, but the Grok config says {v} "
                                         f"(config: {self.config_source})",
                                         path=self._first, expected=v, got=got)
        try:
            validate_parallel(cfg, self.par)
        except LayoutError as e:
            raise CheckpointFormatError(f"args hold a parallel layout the config cannot have: {e}",
                                        path=self._first) from None

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
        from ..megatron import plan_megatron
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


def _transformer_impl(head: dict, args: argparse.Namespace) -> str:
    """The layer spec a checkpoint is named for: by its input-norm keys (the only names that differ),
    else ``args.transformer_impl``."""
    model = head.get("model", head.get("model0"))
    keys = model.keys() if isinstance(model, dict) else ()
    if any(k.endswith(".input_layernorm.weight") for k in keys):
        return "local"
    if any(k.endswith(".self_attention.linear_qkv.layer_norm_weight") for k in keys):
        return "transformer_engine"
    impl = getattr(args, "transformer_impl", None)
    return impl if impl in ("local", "transformer_engine") else "local"


def _size_arg(args, name: str, default, where) -> int | None:
    """A parallel size from args: a positive integer (or absent)."""
    v = getattr(args, name, None)
    if v is None or v == 0 and default is not None:
        return default
    if type(v) is not int or not 1 <= v <= 1 << 16:
        raise CheckpointFormatError(f"args {name} = {str(v)[:20]} is not a positive integer", path=where)
    return v


def _config_from_args(a: argparse.Namespace, where) -> GrokConfig:
    """A GrokConfig from Megatron args alone (a checkpoint written by something other than grokconv)."""
    base = load_preset("grok-1")
    try:
        fields = dict(vocab_size=int(getattr(a, "vocab_size", None) or a.padded_vocab_size),
                      emb_size=int(a.hidden_size), key_size=int(a.kv_channels), num_q_heads=int(a.num_attention_heads),
                      num_kv_heads=int(a.num_query_groups or a.num_attention_heads), num_layers=int(a.num_layers),
                      num_experts=int(a.num_experts), num_selected_experts=int(a.moe_router_topk),
                      sequence_len=int(a.max_position_embeddings))
    except (AttributeError, TypeError, ValueError) as e:
        raise CheckpointFormatError(f"args lack what a Grok-1 config needs ({e}); add {CONFIG_FILE} beside "
                                    "latest_checkpointed_iteration.txt", path=where) from None
    for src, dst in (("softmax_scale", "attn_output_multiplier"), ("grokconv_attn_logit_cap", "max_attn_value"),
                     ("grokconv_embedding_multiplier", "embedding_multiplier_scale"),
                     ("grokconv_output_multiplier", "output_multiplier_scale"), ("rotary_base", "rope_base"),
                     ("layernorm_epsilon", "rms_norm_eps")):
        v = getattr(a, src, None)
        if v is not None:
            fields[dst] = v
    d = {**{k: v for k, v in base.to_dict().items() if k != "ffn_size"}, **fields}
    cfg = GrokConfig.from_dict(d, path=where)
    F = getattr(a, "moe_ffn_hidden_size", None) or getattr(a, "ffn_hidden_size", None)
    if type(F) is not int or not 0 < F <= 1 << 20:
        raise CheckpointFormatError(f"args ffn_hidden_size {str(F)[:20]} is not a size", path=where)
    if F != cfg.ffn_size:
        cfg = GrokConfig.from_dict({**d, "widening_factor": F * 3 / (2 * cfg.emb_size)}, path=where)
        if cfg.ffn_size != F:
            raise CheckpointFormatError(f"ffn_hidden_size {F} cannot be derived as Grok-1 derives it", path=where)
    return cfg

register_format("megatron", _detect,
                lambda p, layers=None, strict=True: MegatronCheckpoint(p, layers=layers, strict=strict))

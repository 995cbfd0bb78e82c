"""llama.cpp GGUF files of architecture ``grok`` (one file, or ``-00001-of-0000N.gguf`` parts), read back
as canonical Grok-1 tensors through ``mappings/gguf.json`` and gguf-py's reader (memory-mapped).

F32 / F16 / BF16 tensors are handed out as zero-copy views; Q8_0 ones are dequantized with
``gguf.quants`` (one expert at a time when an expert is asked for). The model config comes from the
``grok.*`` keys; float32 keys are matched back to a preset's float64 value when they round to the same
float32 (so ``78.38367176906169`` comes back as itself), else to their shortest decimal.
"""
from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np

from ..config import PRESETS, GrokConfig, ffn_size, load_preset
from ..errors import CheckpointFormatError, GrokconvError, MissingTensorError, ShapeMismatchError
from ..mapping import load_layout
from ..tensor import BF16
from .base import CheckpointReader, StoredTensor, register_format
from .safetensors_io import madvise_dontneed

_CONFIGS = Path(__file__).resolve().parents[1] / "configs"

__all__ = ["GGUFCheckpoint", "gguf_parts", "require_gguf"]

_PART_RE = re.compile(r"^(?P<stem>.+)-(?P<k>\d{5})-of-(?P<n>\d{5})\.gguf$")


# what gguf-py's GGUFReader raises on a damaged header (it parses without validating)
_PARSE_ERRORS = (ValueError, OSError, IndexError, KeyError, OverflowError, TypeError, struct.error, MemoryError)


def require_gguf():
    """llama.cpp's gguf-py, or the error that says how to install it."""
    try:
        import gguf
    except ImportError:
        raise GrokconvError("GGUF needs the gguf package (llama.cpp's gguf-py), which is not installed",
                            hint="pip install 'grokconv[gguf]'") from None
    return gguf


def _detect(path: Path) -> bool:
    p = Path(path)
    return (p.is_file() and p.suffix == ".gguf") or (p.is_dir() and any(p.glob("*.gguf")))


def gguf_parts(path: Path) -> list[Path]:
    """The files of one GGUF model: ``path`` itself, or every part of its split set (any part given)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.gguf"))
        stems = {(_PART_RE.match(f.name).group("stem") if _PART_RE.match(f.name) else f.stem) for f in files}
        if len(stems) != 1:
            raise CheckpointFormatError(f"{len(stems)} GGUF models in this directory ({', '.join(sorted(stems))}); "
                                        "name the file", path=path)
        path = files[0]
    m = _PART_RE.match(path.name)
    if not m:
        return [path]
    n = int(m.group("n"))
    parts = [path.with_name(f"{m.group('stem')}-{k:05d}-of-{n:05d}.gguf") for k in range(1, n + 1)]
    missing = [p.name for p in parts if not p.exists()]
    if missing:
        raise MissingTensorError(f"split GGUF is missing part(s) {', '.join(missing)}", path=path.parent)
    return parts


def _f64(value, field: str):
    """A float32 metadata value as the float64 a preset (a synthetic or the trained one: every config in
    ``grokconv/configs``) has for ``field`` if it rounds to it."""
    from ..synth import TRAINED_PRESETS   # here: synth imports the formats package
    v32 = np.float32(value)
    for cfg in [load_preset(p) for p in PRESETS] + [GrokConfig.load(_CONFIGS / f"{p}.json") for p in TRAINED_PRESETS]:
        cand = getattr(cfg, field)
        if np.float32(cand) == v32:
            return cand
    return float(str(v32))


class GGUFCheckpoint(CheckpointReader):
    format = "gguf"

    def __init__(self, path, *, layers=None, strict: bool = True):
        gguf = require_gguf()
        self.parts = gguf_parts(Path(path))
        self.readers = []
        for p in self.parts:
            try:   # gguf-py parses the header; a damaged one surfaces as any of these
                self.readers.append(gguf.GGUFReader(p))
            except _PARSE_ERRORS as e:
                raise CheckpointFormatError(f"not a readable GGUF file: {type(e).__name__}: {str(e)[:200]}",
                                            path=p) from None
        self.layout = load_layout("gguf")
        try:
            self.kv = {k: f.contents() for k, f in self.readers[0].fields.items()
                       if not k.startswith("tokenizer.ggml.") or k.endswith("_id") or k.endswith(".model")}
        except _PARSE_ERRORS as e:
            raise CheckpointFormatError(f"unreadable GGUF metadata: {type(e).__name__}: {str(e)[:200]}",
                                        path=self.parts[0]) from None
        arch = self.kv.get("general.architecture")
        if arch != "grok":
            raise CheckpointFormatError(f"architecture {arch!r}; grokconv reads GGUF of llama.cpp's 'grok' only",
                                        path=self.parts[0])
        self.tensors = {}         # gguf name -> (reader index, ReaderTensor)
        for i, r in enumerate(self.readers):
            for t in r.tensors:
                self.tensors[t.name] = (i, t)
        self._canon: dict[str, str] = {}
        self._unmapped: list[str] = []
        for name in self.tensors:
            parsed = self.layout.parse(name)
            if parsed:
                self._canon[parsed[1]] = name
            else:
                self._unmapped.append(name)
        try:
            cfg = self._config()
        except (TypeError, ValueError, OverflowError) as e:
            if isinstance(e, CheckpointFormatError):
                raise
            raise CheckpointFormatError(f"GGUF metadata does not describe a Grok-1 model ({e})",
                                        path=self.parts[0]) from None
        present = sorted({int(c.split("/")[1].rsplit("_", 1)[1]) for c in self._canon if c.startswith("transformer/")})
        super().__init__(self.parts[0], cfg, present)
        self._check_tensors()
        if strict:
            self.require_layers(layers)

    def _check_tensors(self) -> None:
        """Every tensor the plan names for the present layers has its planned shape and a type we read."""
        import gguf
        allowed = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16,
                   gguf.GGMLQuantizationType.Q8_0}
        for target in self.layout.plan(self.config, self.layers):
            found = self.tensors.get(target.name)
            if found is None:
                continue            # problems() lists what is missing; load() names it
            i, t = found
            shape = tuple(int(x) for x in reversed(t.shape.tolist()))
            if shape != tuple(target.shape):
                raise ShapeMismatchError(f"tensor {target.name}: shape {list(shape)}, the config says "
                                         f"{list(target.shape)}", path=self.parts[i],
                                         expected=tuple(target.shape), got=shape)
            if t.tensor_type not in allowed:
                raise CheckpointFormatError(f"tensor {target.name}: type {t.tensor_type.name} is not one grokconv "
                                            "reads (F32, F16, BF16, Q8_0)", path=self.parts[i])

    def _key(self, name: str, default=None):
        return self.kv.get(f"grok.{name}", default)

    def _config(self) -> GrokConfig:
        emb = self.tensors.get("token_embd.weight")
        if emb is None:
            raise MissingTensorError("no token_embd.weight tensor", path=self.parts[0])
        base = load_preset("grok-1")
        d, heads = int(self._key("embedding_length")), int(self._key("attention.head_count"))
        ffn = int(self._key("feed_forward_length"))
        if d <= 0 or heads <= 0:
            raise CheckpointFormatError(f"embedding_length {d} and attention.head_count {heads} must be positive",
                                        path=self.parts[0])
        wf = ffn * 3 / (2 * d)
        if ffn_size(d, wf) != ffn:
            raise CheckpointFormatError(f"feed_forward_length {ffn} cannot be derived as Grok-1 derives it",
                                        path=self.parts[0])
        vals = dict(
            vocab_size=int(emb[1].shape[1]), emb_size=d, widening_factor=wf,
            key_size=int(self._key("attention.key_length", d // heads)), num_q_heads=heads,
            num_kv_heads=int(self._key("attention.head_count_kv", heads)), num_layers=int(self._key("block_count")),
            num_experts=int(self._key("expert_count")), num_selected_experts=int(self._key("expert_used_count")),
            sequence_len=int(self._key("context_length", base.sequence_len)),
            pad_token=int(self.kv.get("tokenizer.ggml.padding_token_id", base.pad_token)),
            eos_token=int(self.kv.get("tokenizer.ggml.eos_token_id", base.eos_token)),
            bos_token=int(self.kv.get("tokenizer.ggml.bos_token_id", base.bos_token)))
        for field, key in (("attn_output_multiplier", "attention.output_scale"),
                           ("embedding_multiplier_scale", "embedding_scale"), ("output_multiplier_scale", "logit_scale"),
                           ("max_attn_value", "attn_logit_softcapping"), ("rope_base", "rope.freq_base"),
                           ("rms_norm_eps", "attention.layer_norm_rms_epsilon")):
            if self._key(key) is not None:
                vals[field] = _f64(self._key(key), field)
        return base.replace(**vals).validate()

    # -- canonical -----------------------------------------------------------------------------
    def _tensor(self, name: str):
        gname = self._canon.get(name)
        if gname is None:
            raise MissingTensorError(f"no GGUF tensor for {name}", path=self.path)
        return self.tensors[gname]

    def load(self, name: str, index: int | None = None):
        import gguf
        spec = self.spec(name)
        entry, _ = self.layout.entry_for(name)
        _, t = self._tensor(name)
        qt = t.tensor_type
        arr = t.data
        if index is not None and len(spec.shape) > 2:
            arr = arr[index]
        if qt == gguf.GGMLQuantizationType.BF16:
            arr = arr.view(np.uint16).view(BF16)
        elif qt not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            arr = gguf.quants.dequantize(np.asarray(arr), qt)
        if entry.transpose:
            arr = np.swapaxes(arr, -1, -2)
        return arr

    def release(self, name: str, index: int | None = None, rows=None) -> None:
        """Drop the mapped pages behind one parameter (or one expert of it) from this process."""
        gname = self._canon.get(name)
        if gname is None:
            return
        i, t = self.tensors[gname]
        start, length = t.data_offset, t.n_bytes
        if index is not None and len(t.data.shape) == 3:
            length //= t.data.shape[0]
            start += index * length
        mm = getattr(self.readers[i].data, "_mmap", None)
        if mm is not None:
            madvise_dontneed(mm, start, length)

    def stored(self) -> list[StoredTensor]:
        out = []
        for name, (i, t) in self.tensors.items():
            shape = tuple(int(x) for x in reversed(t.shape.tolist()))
            qt = t.tensor_type.name
            quant = {"scheme": "q8_0"} if qt == "Q8_0" else {"scheme": qt.lower()} if qt not in ("F32", "F16", "BF16") \
                else {}
            out.append(StoredTensor(name, shape, qt, int(t.n_bytes), str(self.parts[i]), quant))
        return out

    def problems(self) -> list[str]:
        expected = {t.name for t in self.layout.plan(self.config, self.layers)}
        probs = [f"missing tensor {n}" for n in sorted(expected - set(self.tensors))[:5]]
        probs += [f"unexpected tensor {n}" for n in sorted(set(self.tensors) - expected)[:5]]
        return probs

    def close(self) -> None:
        self.readers = []
        self.tensors = {}


register_format("gguf", _detect, lambda p, layers=None, strict=True: GGUFCheckpoint(p, layers=layers, strict=strict))

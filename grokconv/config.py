"""Model configuration with the original code's field names (``model.py`` / ``run.py``).

A checkpoint directory carries ``grokconv-config.json`` beside ``ckpt-0/``; a directory without one
(the real release) is read with the ``grok-1`` preset. Presets live as JSON in ``grokconv/configs``.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointFormatError

__all__ = ["GrokConfig", "ffn_size", "load_preset", "PRESETS", "CONFIG_FILE", "find_config", "find_config_path"]

CONFIG_FILE = "grokconv-config.json"
_PRESET_DIR = Path(__file__).parent / "configs"
PRESETS = ("grok-1", "tiny", "full-width")


def ffn_size(emb_size: int, widening_factor: float) -> int:
    """Expert hidden size exactly as ``model.py: ffn_size`` derives it."""
    size = int(widening_factor * emb_size) * 2 // 3
    return size + (8 - size) % 8


@dataclass(frozen=True)
class GrokConfig:
    vocab_size: int = 131072
    emb_size: int = 6144
    widening_factor: float = 8
    key_size: int = 128
    num_q_heads: int = 48
    num_kv_heads: int = 8
    num_layers: int = 64
    num_experts: int = 8
    num_selected_experts: int = 2
    attn_output_multiplier: float = 0.08838834764831845
    embedding_multiplier_scale: float = 78.38367176906169
    output_multiplier_scale: float = 0.5773502691896257
    max_attn_value: float = 30.0
    sequence_len: int = 8192
    rope_base: float = 10000.0
    rms_norm_eps: float = 1e-5
    pad_token: int = 0
    eos_token: int = 2
    bos_token: int = 1
    # Scales of the row-parallel weights come in one block per device of the model axis.
    model_axis: int = 8

    @property
    def ffn_size(self) -> int:
        return ffn_size(self.emb_size, self.widening_factor)

    @property
    def q_size(self) -> int:
        return self.num_q_heads * self.key_size

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.key_size

    def replace(self, **kw) -> "GrokConfig":
        return dataclasses.replace(self, **kw)

    def validate(self) -> "GrokConfig":
        problems = []
        if self.num_q_heads % self.num_kv_heads:
            problems.append("num_q_heads must be a multiple of num_kv_heads")
        if self.key_size % 2:
            problems.append("key_size must be even (rotary embedding)")
        for name, size in (("emb_size", self.emb_size), ("q heads * key_size", self.q_size),
                           ("ffn_size", self.ffn_size)):
            if size % self.model_axis:
                problems.append(f"{name}={size} is not divisible by model_axis={self.model_axis} "
                                "(row-blocked scales need it)")
        if not 1 <= self.num_selected_experts <= self.num_experts:
            problems.append("num_selected_experts must be in 1..num_experts")
        if problems:
            raise CheckpointFormatError("invalid config: " + "; ".join(problems))
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ffn_size"] = self.ffn_size  # derived, written for readers of the file
        return d

    @classmethod
    def from_dict(cls, d: dict, *, path=None) -> "GrokConfig":
        """A config from a JSON object, every field checked (type, range) before anything uses it."""
        if not isinstance(d, dict):
            raise CheckpointFormatError(f"a config must be a JSON object, not {type(d).__name__}", path=path)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(fields) - {"ffn_size", "preset", "comment"}
        if unknown:
            raise CheckpointFormatError(f"unknown config fields: {sorted(unknown)[:5]}", path=path)
        for k, v in d.items():
            if k not in fields and k != "ffn_size":
                continue
            lo, hi = _LIMITS.get(k, (0, math.inf))
            is_int = k == "ffn_size" or fields[k].type in ("int", int)
            ok_type = type(v) is int if is_int else (type(v) in (int, float) and math.isfinite(v))
            if not ok_type:
                raise CheckpointFormatError(f"config field {k} = {_show(v)}: expected "
                                            f"{'an integer' if is_int else 'a finite number'}", path=path)
            if not lo <= v <= hi:
                raise CheckpointFormatError(f"config field {k} = {v} is out of range [{lo}, {hi}]", path=path)
        cfg = cls(**{k: v for k, v in d.items() if k in fields})
        if "ffn_size" in d and d["ffn_size"] != cfg.ffn_size:
            raise CheckpointFormatError(
                f"ffn_size {d['ffn_size']} disagrees with widening_factor (derives {cfg.ffn_size})", path=path)
        try:
            return cfg.validate()
        except CheckpointFormatError as e:
            if path is None:
                raise
            raise CheckpointFormatError(str(e), path=path) from None

    def save(self, path: Path) -> None:
        from .formats.atomic import atomic_write_text
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "GrokConfig":
        try:
            raw = Path(path).read_bytes()
            obj = json.loads(raw)
        except ValueError as e:          # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise CheckpointFormatError(f"not a valid config: {type(e).__name__}: {_first_line(e)}",
                                        path=path) from None
        return cls.from_dict(obj, path=path)


# Bounds a config must be within before shapes are derived from it: beyond them a file is damaged or
# hostile (Grok-1 itself: 64 layers, 8 experts, 6144 wide, 131072 tokens).
_LIMITS = {
    "vocab_size": (1, 1 << 24), "emb_size": (1, 1 << 17), "widening_factor": (1e-3, 1e3), "key_size": (2, 1 << 12),
    "num_q_heads": (1, 1 << 12), "num_kv_heads": (1, 1 << 12), "num_layers": (1, 1 << 12),
    "num_experts": (1, 1 << 12), "num_selected_experts": (1, 1 << 12), "sequence_len": (1, 1 << 24),
    "model_axis": (1, 1 << 12), "ffn_size": (1, 1 << 20), "pad_token": (0, 1 << 24), "eos_token": (0, 1 << 24),
    "bos_token": (0, 1 << 24), "rms_norm_eps": (0, 1.0), "rope_base": (1e-6, 1e12),
    "attn_output_multiplier": (-1e6, 1e6), "embedding_multiplier_scale": (-1e6, 1e6),
    "output_multiplier_scale": (-1e6, 1e6), "max_attn_value": (-1e6, 1e6),
}


def _show(v) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def load_preset(name: str, **overrides) -> GrokConfig:
    path = _PRESET_DIR / f"{name}.json"
    if not path.exists() or name not in PRESETS:
        raise CheckpointFormatError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = GrokConfig.load(path)
    return cfg.replace(**overrides).validate() if overrides else cfg


def find_config_path(directory: Path) -> Path | None:
    """The ``grokconv-config.json`` stored with a checkpoint (in it or beside it), or None."""
    directory = Path(directory)
    for cand in (directory / CONFIG_FILE, directory.parent / CONFIG_FILE):
        if cand.exists():
            return cand
    return None


def find_config(directory: Path) -> GrokConfig:
    """The config stored with a checkpoint, else the real Grok-1 config."""
    path = find_config_path(directory)
    return GrokConfig.load(path) if path is not None else load_preset("grok-1")

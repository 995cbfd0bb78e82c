"""Model configuration with the original code's field names (``model.py`` / ``run.py``).

A checkpoint directory carries ``grokconv-config.json`` beside ``ckpt-0/``; a directory without one
(the real release) is read with the ``grok-1`` preset. Presets live as JSON in ``grokconv/configs``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointFormatError

__all__ = ["GrokConfig", "ffn_size", "load_preset", "PRESETS", "CONFIG_FILE", "find_config"]

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
    def from_dict(cls, d: dict) -> "GrokConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names - {"ffn_size", "preset", "comment"}
        if unknown:
            raise CheckpointFormatError(f"unknown config fields: {sorted(unknown)}")
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        if "ffn_size" in d and d["ffn_size"] != cfg.ffn_size:
            raise CheckpointFormatError(
                f"ffn_size {d['ffn_size']} disagrees with widening_factor (derives {cfg.ffn_size})")
        return cfg.validate()

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "GrokConfig":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise CheckpointFormatError(f"not a valid config: {e}", path=path) from None


def load_preset(name: str, **overrides) -> GrokConfig:
    path = _PRESET_DIR / f"{name}.json"
    if not path.exists():
        raise CheckpointFormatError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = GrokConfig.load(path)
    return cfg.replace(**overrides).validate() if overrides else cfg


def find_config(directory: Path) -> GrokConfig:
    """The config stored with a checkpoint, else the real Grok-1 config."""
    directory = Path(directory)
    for cand in (directory / CONFIG_FILE, directory.parent / CONFIG_FILE):
        if cand.exists():
            return GrokConfig.load(cand)
    return load_preset("grok-1")

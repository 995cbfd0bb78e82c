"""The canonical vocabulary: every Grok-1 parameter, its shape, storage kind and file position.

Canonical names are the original Haiku paths (``transformer/decoder_layer_3/moe/linear/w``).
File ``tensor{i:05d}_000`` holds the i-th leaf of the parameter tree in JAX's flatten order: dict keys
sorted as strings, so layers come 0, 1, 10, 11, ..., 19, 2, 20, ...
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .config import GrokConfig

__all__ = ["ParamSpec", "param_specs", "layer_of", "file_name", "files_for_layers", "parse_layers",
           "LAYER_SLOTS", "GLOBAL_PARAMS"]

LAYER_PREFIX = "transformer/decoder_layer_"

# module (under decoder_layer_N), param name, kind, row-blocked scales.
# kind: "qw8" = int8 weight + bf16 scales (*lead, G, out); "f32" = plain float32 array.
LAYER_SLOTS = (
    ("moe/linear", "w", "qw8", False),              # expert gate branch (gelu), (E, D, F)
    ("moe/linear_1", "w", "qw8", True),             # expert down projection, (E, F, D), 8 row blocks
    ("moe/linear_v", "w", "qw8", False),            # expert up (linear) branch, (E, D, F)
    ("multi_head_attention/key", "w", "qw8", False),
    ("multi_head_attention/linear", "w", "qw8", True),  # attention output projection, 8 row blocks
    ("multi_head_attention/query", "w", "qw8", False),
    ("multi_head_attention/value", "w", "qw8", False),
    ("rms_norm", "scale", "f32", False),            # pre-attention
    ("rms_norm_1", "scale", "f32", False),          # post-attention (on the branch output)
    ("rms_norm_2", "scale", "f32", False),          # pre-MoE
    ("rms_norm_3", "scale", "f32", False),          # post-MoE
    ("router", "w", "f32", False),
)
GLOBAL_PARAMS = (
    ("language_model/in_out_embed", "embeddings"),
    ("language_model/rms_norm", "scale"),
)


@dataclass(frozen=True)
class ParamSpec:
    index: int            # file position
    name: str             # canonical path, e.g. transformer/decoder_layer_0/moe/linear/w
    shape: tuple          # logical shape, [.., in, out] for weights
    kind: str             # "qw8" or "f32"
    layer: int | None     # decoder layer, None for embeddings / final norm
    slot: str             # module path below the layer ("moe/linear") or the global module
    scale_groups: int = 0  # G of the scales (0 for f32 tensors)

    @property
    def file(self) -> str:
        return file_name(self.index)

    @property
    def scale_shape(self) -> tuple:
        return (*self.shape[:-2], self.scale_groups, self.shape[-1]) if self.kind == "qw8" else ()

    @property
    def lead(self) -> int:
        """Number of stacked 2-D matrices (experts), 1 for plain weights."""
        n = 1
        for d in self.shape[:-2]:
            n *= d
        return n


def file_name(index: int, host: int = 0) -> str:
    return f"tensor{index:05d}_{host:03d}"


def _slot_shape(cfg: GrokConfig, slot: str) -> tuple:
    D, F, E = cfg.emb_size, cfg.ffn_size, cfg.num_experts
    return {
        "moe/linear": (E, D, F), "moe/linear_1": (E, F, D), "moe/linear_v": (E, D, F),
        "multi_head_attention/key": (D, cfg.kv_size), "multi_head_attention/linear": (cfg.q_size, D),
        "multi_head_attention/query": (D, cfg.q_size), "multi_head_attention/value": (D, cfg.kv_size),
        "rms_norm": (D,), "rms_norm_1": (D,), "rms_norm_2": (D,), "rms_norm_3": (D,),
        "router": (D, E),
    }[slot]


@lru_cache(maxsize=32)
def param_specs(cfg: GrokConfig) -> tuple[ParamSpec, ...]:
    """All parameters in file order, computed the way JAX flattens the Haiku dict (sorted keys)."""
    leaves = []  # (module path, param name, spec fields)
    for module, pname in GLOBAL_PARAMS:
        shape = (cfg.vocab_size, cfg.emb_size) if pname == "embeddings" else (cfg.emb_size,)
        leaves.append((module, pname, shape, "f32", None, module, False))
    for layer in range(cfg.num_layers):
        for slot, pname, kind, row_blocked in LAYER_SLOTS:
            leaves.append((f"{LAYER_PREFIX}{layer}/{slot}", pname, _slot_shape(cfg, slot), kind, layer,
                           slot, row_blocked))
    leaves.sort(key=lambda t: (t[0], t[1]))
    specs = []
    for i, (module, pname, shape, kind, layer, slot, row_blocked) in enumerate(leaves):
        groups = (cfg.model_axis if row_blocked else 1) if kind == "qw8" else 0
        specs.append(ParamSpec(i, f"{module}/{pname}", shape, kind, layer, slot, groups))
    return tuple(specs)


def spec_by_name(cfg: GrokConfig) -> dict[str, ParamSpec]:
    return {s.name: s for s in param_specs(cfg)}


def layer_of(name: str) -> int | None:
    if not name.startswith(LAYER_PREFIX):
        return None
    return int(name[len(LAYER_PREFIX):].split("/", 1)[0])


def parse_layers(text: str | None, num_layers: int) -> list[int]:
    """``"0-1,63"`` -> [0, 1, 63]; ``"all"`` or None -> every layer. Numeric order, no duplicates."""
    if text is None or str(text).strip().lower() == "all":
        return list(range(num_layers))
    out: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                if b < a:
                    raise ValueError
                out.update(range(a, b + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise ValueError(f"bad layer range {part!r}: use forms like 0-3,7 or 'all'") from None
    bad = [x for x in out if not 0 <= x < num_layers]
    if bad:
        raise ValueError(f"layers {sorted(bad)} out of range: the model has {num_layers} layers (0-{num_layers - 1})")
    return sorted(out)


def files_for_layers(cfg: GrokConfig, layers) -> list[ParamSpec]:
    """The specs (and so files) a slice needs: embeddings, final norm, and every file of those layers."""
    wanted = set(layers)
    return [s for s in param_specs(cfg) if s.layer is None or s.layer in wanted]

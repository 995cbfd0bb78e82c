"""Layouts as data: ``mappings/<layout>.json`` names each canonical parameter's target(s).

An entry is ``{"from": canonical template, "to": target template, "role": ..., "transpose": bool,
"experts": "split" | "stack"}`` with ``{L}`` for the layer and ``{E}`` for the expert (``stack`` keeps
the experts as one 3-D target ``[E, ...]``, transposed per expert, as GGUF's ``ffn_*_exps``). The same entries run
backwards: target names are parsed with the compiled templates. An entry with ``"copy": true`` writes a
second target from a parameter another entry already maps (SGLang's untied ``lm_head.weight``, a copy
of the embedding); readers skip it. The layout's ``config`` block is the ``config.json`` its consumer
reads, with ``"{field}"`` strings filled from :class:`GrokConfig` (a config with ``auto_map`` names the
transformers code grokconv ships, ``grokconv/hf_code``, which has each layout's names written in it).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .config import GrokConfig
from .errors import LayoutError
from .schema import ParamSpec, param_specs

__all__ = ["Layout", "Target", "load_layout", "layout_names", "MAPPINGS_DIR", "detect_layout", "check_head_size"]



def _mappings_dir() -> Path:
    """The layout files: the installed ``grokconv.mappings`` package data (a wheel ships the top-level
    ``mappings/`` folder as that package, see pyproject.toml), else ``mappings/`` of the source tree
    (a checkout run in place). Found through the import system, so a zip or namespace install works too."""
    import importlib.util
    try:
        spec = importlib.util.find_spec("grokconv.mappings")
    except ModuleNotFoundError:
        spec = None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if any(Path(loc).glob("*.json")):
            return Path(loc)
    return Path(__file__).resolve().parent.parent / "mappings"


MAPPINGS_DIR = _mappings_dir()
ROLES = ("embedding", "norm", "router", "linear", "output")


@dataclass(frozen=True)
class Entry:
    source: str          # canonical template
    target: str          # target template
    role: str
    transpose: bool
    split_experts: bool
    stack_experts: bool = False
    copy: bool = False   # a second target of a parameter another entry maps (readers skip it)

    @property
    def regex(self) -> re.Pattern:
        return _compile(self.target)


@dataclass(frozen=True)
class Target:
    """One target tensor of one canonical parameter."""
    name: str
    source: str          # canonical name
    index: int | None    # expert index along the canonical lead axis
    role: str
    transpose: bool
    shape: tuple         # target shape

    @property
    def module(self) -> str:
        return self.name[: -len(".weight")] if self.name.endswith(".weight") else self.name


@lru_cache(maxsize=None)
def _compile(template: str) -> re.Pattern:
    pat = re.escape(template).replace(r"\{L\}", r"(?P<L>\d+)").replace(r"\{E\}", r"(?P<E>\d+)")
    return re.compile(f"^{pat}$")


class Layout:
    def __init__(self, data: dict, path: Path | None = None):
        self.name = data["layout"]
        self.description = data.get("description", "")
        self.config_template = data.get("config", {})
        self.requires = dict(data.get("requires", {}))   # file -> why the consumer needs it
        # why the consumer needs the tensors without a layer in a shard of their own, first (keyfan)
        self.non_layer_shard_first = data.get("non_layer_shard_first")
        # why the consumer takes the head size as d_model / heads whatever the config says (None: it reads it)
        self.derives_head_size = data.get("derives_head_size")
        self.entries = []
        for e in data["tensors"]:
            if e.get("role") not in ROLES:
                raise LayoutError(f"entry {e.get('from')!r} has role {e.get('role')!r}; roles: {ROLES}", path=path)
            self.entries.append(Entry(e["from"], e["to"], e["role"], bool(e.get("transpose")),
                                      e.get("experts") == "split", e.get("experts") == "stack",
                                      bool(e.get("copy"))))
        self._by_source = {_compile(e.source): e for e in self.entries if not e.copy}
        self._copies = [e for e in self.entries if e.copy]
        for e in self._copies:
            if _compile(e.source) not in self._by_source or e.split_experts or "{L}" in e.source:
                raise LayoutError(f"copy entry {e.target!r} must copy a whole non-layer parameter that another "
                                  f"entry maps ({e.source!r})", path=path)

    # -- forward -------------------------------------------------------------------------------
    def entry_for(self, canonical: str) -> tuple[Entry, dict]:
        for rx, e in self._by_source.items():
            m = rx.match(canonical)
            if m:
                return e, m.groupdict()
        raise LayoutError(f"layout {self.name!r} has no entry for {canonical!r}")

    def targets(self, spec: ParamSpec) -> list[Target]:
        e, groups = self.entry_for(spec.name)
        return self._targets(e, groups, spec) + [self._targets(c, {}, spec)[0] for c in self._copies
                                                 if c.source == spec.name]

    def _targets(self, e: Entry, groups: dict, spec: ParamSpec) -> list[Target]:
        shape2 = spec.shape[-2:] if len(spec.shape) >= 2 else spec.shape
        shape = tuple(reversed(shape2)) if e.transpose else tuple(shape2)
        if e.split_experts:
            return [Target(e.target.format(E=i, **groups), spec.name, i, e.role, e.transpose, shape)
                    for i in range(spec.shape[0])]
        if len(spec.shape) > 2:
            if e.stack_experts:
                return [Target(e.target.format(**groups), spec.name, None, e.role, e.transpose,
                               (*spec.shape[:-2], *shape))]
            raise LayoutError(f"{spec.name}: stacked tensor needs experts: split or stack in layout {self.name!r}")
        return [Target(e.target.format(**groups), spec.name, None, e.role, e.transpose, shape)]

    def plan(self, cfg: GrokConfig, layers=None) -> list[Target]:
        """Every target, in output order: embeddings, layers in numeric order, final norm.

        Checks coverage: every canonical parameter maps, and no two map to one name.
        """
        wanted = None if layers is None else set(layers)
        specs = [s for s in param_specs(cfg) if wanted is None or s.layer is None or s.layer in wanted]
        order = {"language_model/in_out_embed/embeddings": (-1, 0)}
        specs.sort(key=lambda s: order.get(s.name, (s.layer if s.layer is not None else 1 << 30, s.index)))
        out, seen = [], {}
        for s in specs:
            for t in self.targets(s):
                if t.name in seen:
                    raise LayoutError(f"layout {self.name!r} maps both {seen[t.name]} and {s.name} to {t.name}")
                seen[t.name] = s.name
                out.append(t)
        return out

    # -- backward ------------------------------------------------------------------------------
    def parse(self, name: str) -> tuple[Entry, str, int | None] | None:
        """Target name -> (entry, canonical name, expert index) or None."""
        for e in self.entries:
            m = e.regex.match(name)
            if m:
                g = m.groupdict()
                canonical = e.source.format(L=g["L"]) if "L" in g else e.source
                return e, canonical, int(g["E"]) if "E" in g else None
        return None

    def hf_config(self, cfg: GrokConfig) -> dict:
        values = cfg.to_dict()

        def fill(v):
            if isinstance(v, str) and v.startswith("{") and v.endswith("}") and v[1:-1] in values:
                return values[v[1:-1]]
            if isinstance(v, dict):
                return {k: fill(x) for k, x in v.items()}
            if isinstance(v, list):
                return [fill(x) for x in v]
            return v
        return fill(self.config_template)


def check_head_size(layout: Layout, cfg: GrokConfig, force: bool = False, path=None) -> str | None:
    """Refuse a layout whose consumer derives the head size as d_model / heads when the config's differs.

    Raises :class:`LayoutError` with a hint, or with ``force`` returns the warning text instead; None
    when the consumer reads the head size or the two agree."""
    if not layout.derives_head_size or cfg.num_q_heads * cfg.key_size == cfg.emb_size:
        return None
    what = (f"this model has {cfg.num_q_heads} heads of {cfg.key_size} in d_model {cfg.emb_size} "
            f"({cfg.num_q_heads * cfg.key_size} != {cfg.emb_size}), and {layout.derives_head_size}: it would "
            f"misread or refuse a {layout.name!r} export (Grok-1 itself has 48 x 128 = 6144)")
    if force:
        return what
    raise LayoutError(what, path=path, hint="--force writes it anyway (grokconv reads it back); a layout whose "
                                            "consumer reads head_dim (sglang) or a model whose heads fill d_model runs")


def layout_names(container: str = "safetensors") -> list[str]:
    """Layouts of one container format (a mapping file's ``container``; safetensors when absent)."""
    return sorted(p.stem for p in MAPPINGS_DIR.glob("*.json")
                  if json.loads(p.read_text()).get("container", "safetensors") == container)


@lru_cache(maxsize=None)
def load_layout(name: str) -> Layout:
    path = MAPPINGS_DIR / f"{name}.json"
    if not path.exists():
        raise LayoutError(f"unknown layout {name!r}; available: {', '.join(layout_names())}")
    try:
        return Layout(json.loads(path.read_text()), path)
    except (KeyError, json.JSONDecodeError) as e:
        raise LayoutError(f"malformed mapping file: {e}", path=path) from None


def detect_layout(names, candidates=None) -> Layout:
    """The layout whose templates parse every one of ``names`` (module names, ``.weight`` form)."""
    best, best_hits = None, -1
    for ln in candidates or layout_names():
        lay = load_layout(ln)
        hits = sum(1 for n in names if lay.parse(n) is not None)
        if hits == len(names) and hits > 0:
            return lay
        if hits > best_hits:
            best, best_hits = lay, hits
    unknown = [n for n in names if best is None or best.parse(n) is None][:3]
    raise LayoutError(f"no layout in mappings/ names every tensor; e.g. {unknown} "
                      f"(closest: {best.name if best else None}, {best_hits}/{len(names)} names)")

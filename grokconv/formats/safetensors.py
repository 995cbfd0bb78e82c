"""Hugging Face safetensors checkpoints in any layout of ``mappings/``, read back as canonical tensors.

The layout is recognised from the tensor names; the encoding from ``config.json``'s
``quantization_config`` and the tensors present: plain bf16/f32, compressed-tensors int8
(``pack-quantized``, turned back into the original int8 and row-block scales when they fit), and
fp8 (compressed-tensors ``float-quantized`` or DeepSeek ``weight_scale_inv``), dequantized to f32.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..config import CONFIG_FILE, GrokConfig, load_preset
from ..errors import CheckpointFormatError, LayoutError, MissingTensorError, ShapeMismatchError
from ..mapping import Layout, detect_layout
from ..tensor import QInt8, dequantize, from_torch, to_torch
from .base import CheckpointReader, StoredTensor, register_format
from .safetensors_io import SafetensorsFile, _clip

__all__ = ["SafetensorsCheckpoint", "INDEX", "read_index", "index_mismatches"]

INDEX = "model.safetensors.index.json"
_SUFFIXES = ("weight_packed", "weight_scale_inv", "weight_scale", "weight_shape", "input_scale")


def _detect(path: Path) -> bool:
    p = Path(path)
    return p.suffix == ".safetensors" or (p.is_dir() and ((p / INDEX).exists() or any(p.glob("*.safetensors"))))


def _module_name(name: str) -> tuple[str, str]:
    """``X.weight_packed`` -> (``X.weight``, ``weight_packed``); other names map to themselves."""
    for suf in _SUFFIXES:
        if name.endswith("." + suf):
            return name[: -len(suf)] + "weight", suf
    return name, ""


class SafetensorsCheckpoint(CheckpointReader):
    format = "safetensors"

    def __init__(self, path, *, layers=None, strict: bool = True):
        path = Path(path)
        root = path.parent if path.is_file() else path
        self._problems: list[str] = []
        index = root / INDEX
        if index.exists():
            weight_map = read_index(index)
            files = sorted(set(weight_map.values()))
        else:
            weight_map = None
            files = [path.name] if path.is_file() else sorted(p.name for p in root.glob("*.safetensors"))
        if not files:
            raise MissingTensorError("no *.safetensors files", path=root)
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        for fn in files:
            if not (root / fn).is_file():
                raise MissingTensorError(f"shard {fn} named by the index is missing", path=index)
            sf = SafetensorsFile(root / fn)
            self.files[fn] = sf
            for n in sf.tensors:
                if n in self.where:
                    raise CheckpointFormatError(f"tensor {_clip(n)} is also in {self.where[n]}", path=root / fn)
                self.where[n] = fn
        if weight_map is not None:
            _check_index(index, weight_map, self.where, root)
        self.hf_config = _read_json_object(root / "config.json") if (root / "config.json").exists() else {}
        self.qconfig = self.hf_config.get("quantization_config") or {}
        if not isinstance(self.qconfig, dict):
            raise CheckpointFormatError("quantization_config is not a JSON object", path=root / "config.json")
        block = self.qconfig.get("weight_block_size") or _ct_block(self.qconfig) or [128, 128]
        if not (isinstance(block, list) and len(block) == 2 and all(type(b) is int and b > 0 for b in block)):
            raise CheckpointFormatError(f"fp8 block size {str(block)[:40]} is not two positive integers",
                                        path=root / "config.json")
        self.block = tuple(block)
        modules = sorted({_module_name(n)[0] for n in self.where})
        self.layout: Layout = self._detect_layout(modules, root)
        self._canon: dict[tuple[str, int | None], str] = {}
        for m in modules:
            parsed = self.layout.parse(m)
            if parsed and not parsed[0].copy:   # a copy (SGLang's lm_head) is written, never read back
                self._canon[(parsed[1], parsed[2])] = m
        if (root / CONFIG_FILE).exists():
            cfg, self.config_source = GrokConfig.load(root / CONFIG_FILE), str(root / CONFIG_FILE)
        else:
            cfg, self.config_source = self._config_from_hf(root), str(root / "config.json")
        present = sorted({int(c.split("/")[1].rsplit("_", 1)[1]) for c, _ in self._canon
                          if c.startswith("transformer/")})
        super().__init__(root, cfg, [x for x in present if x < cfg.num_layers])
        for x in present:
            if x >= cfg.num_layers:
                m = next(m for (c, _), m in self._canon.items() if c.startswith(f"transformer/decoder_layer_{x}/"))
                raise ShapeMismatchError(f"tensor {_clip(m)} is of layer {x}, but the config has {cfg.num_layers} "
                                         f"layers (config: {self.config_source})", path=root / self._shard_of(m))
        if strict:
            self.require_layers(layers, root)
        for problem, where in self._check_tensors():
            if strict:
                raise ShapeMismatchError(problem, path=where)
            self._problems.append(f"{where}: {problem}")
        if strict:
            for problem, where in self._name_problems():
                raise MissingTensorError(problem, path=where)

    def _shard_of(self, module: str) -> str:
        """The shard holding a module (``X.weight``) in any of its encodings."""
        base = module[: -len("weight")] if module.endswith(".weight") else None
        for n in [module] + ([base + suf for suf in _SUFFIXES] if base else []):
            if n in self.where:
                return self.where[n]
        return next(iter(self.files))

    def _detect_layout(self, modules, root: Path) -> Layout:
        try:
            return detect_layout(modules)
        except LayoutError:
            from ..mapping import layout_names, load_layout
            best = max((load_layout(n) for n in layout_names()),
                       key=lambda lay: sum(lay.parse(m) is not None for m in modules))
            odd = next((m for m in modules if best.parse(m) is None), modules[0])
            raise CheckpointFormatError(f"tensor {_clip(odd)} is not a name of any layout in mappings/ "
                                        f"(closest: {best.name})", path=root / self._shard_of(odd)) from None

    def _check_tensors(self):
        """(problem, file) for every stored tensor whose name, shape or dtype does not fit the config.

        Headers only, plus the two integers of each ``weight_shape``: a damaged shard is refused
        before a conversion writes anything."""
        block = self.block
        planned = self.layout.plan(self.config, self.layers)
        for t in planned:
            base = t.name[: -len("weight")] if t.name.endswith(".weight") else None
            names = {"": t.name} if t.name in self.where else {}
            if base:
                names.update({suf: base + suf for suf in _SUFFIXES if base + suf in self.where})
            if not names:
                continue                                # reported by _name_problems
            for suf, n in names.items():
                info = self.files[self.where[n]].tensors[n]
                where = self.path / self.where[n]
                shapes, dtypes = _expected(suf, t, names, block)
                if info.dtype not in dtypes:
                    yield f"tensor {_clip(n)}: dtype {info.dtype}, expected {' or '.join(dtypes)}", where
                elif shapes is not None and tuple(info.shape) not in shapes:
                    yield (f"tensor {_clip(n)}: shape {list(info.shape)}, the config expects "
                           f"{' or '.join(str(list(x)) for x in sorted(shapes)[:4])} (config: {self.config_source})"), where
                elif suf == "weight_shape":
                    got = [int(x) for x in self.files[self.where[n]].array(n)]
                    if got != list(t.shape):
                        yield (f"tensor {_clip(n)}: holds {got}, the config expects {list(t.shape)} "
                               f"(config: {self.config_source})"), where

    def _config_from_hf(self, root: Path) -> GrokConfig:
        """A GrokConfig from config.json, through the layout's own config template (run backwards)."""
        where = root / "config.json"
        d = load_preset("grok-1").to_dict()
        d.pop("ffn_size")
        ffn = None
        for key, tmpl in self.layout.config_template.items():
            if isinstance(tmpl, str) and tmpl.startswith("{") and tmpl.endswith("}") and key in self.hf_config:
                field = tmpl[1:-1]
                if field == "ffn_size":
                    ffn = self.hf_config[key]
                elif field in d:
                    d[field] = self.hf_config[key]
        cfg = GrokConfig.from_dict(d, path=where)
        if ffn is not None and ffn != cfg.ffn_size:
            if type(ffn) is not int or not 0 < ffn <= 1 << 20:
                raise CheckpointFormatError(f"intermediate_size {str(ffn)[:20]} is not a size", path=where)
            cfg = GrokConfig.from_dict({**d, "widening_factor": ffn * 3 / (2 * cfg.emb_size)}, path=where)
            if cfg.ffn_size != ffn:
                raise CheckpointFormatError(f"intermediate_size {ffn} cannot be derived as Grok-1 derives it",
                                            path=where)
        return cfg

    # -- raw access ----------------------------------------------------------------------------
    def _array(self, name: str) -> np.ndarray:
        if name not in self.where:
            raise MissingTensorError(f"tensor {name} is not in the checkpoint", path=self.path)
        return self.files[self.where[name]].array(name)

    def _has(self, name: str) -> bool:
        return name in self.where

    # -- canonical -----------------------------------------------------------------------------
    def load(self, name: str, index: int | None = None):
        spec = self.spec(name)
        entry, _ = self.layout.entry_for(name)
        if entry.split_experts and index is None:
            parts = [self.load(name, e) for e in range(spec.shape[0])]
            if all(isinstance(p, QInt8) for p in parts):
                return QInt8(np.stack([p.weight for p in parts]), np.stack([p.scales for p in parts]))
            return np.stack([from_torch(dequantize(p, "f32")) if isinstance(p, QInt8) else np.asarray(p)
                             for p in parts])
        key = (name, index if entry.split_experts else None)
        module = self._canon.get(key)
        if module is None:
            raise MissingTensorError(f"no tensor for {name}" + (f" expert {index}" if index is not None else ""),
                                     path=self.path)
        base = module[: -len("weight")] if module.endswith(".weight") else None
        groups = spec.scale_groups or 1
        if base and self._has(base + "weight_packed"):
            value = self._unpack_int8(base, groups)
        elif base and (self._has(base + "weight_scale") or self._has(base + "weight_scale_inv")) \
                and self._array(module).dtype.name.startswith("float8"):
            value = self._dequant_fp8(base)
        else:
            value = self._array(module)
        if entry.transpose:
            value = value.T if isinstance(value, np.ndarray) else value
        if not entry.split_experts and index is not None:
            value = value[index]
        return value

    def _unpack_int8(self, base: str, groups: int):
        from ..quant.int8 import unpack_int8
        shape = [int(x) for x in self._array(base + "weight_shape")]
        q = unpack_int8(to_torch(self._array(base + "weight_packed")), shape[1])   # [out, in]
        scale = self._array(base + "weight_scale")                                 # [out, in/gs]
        out, inn = shape
        ng = scale.shape[1]
        if ng % groups == 0:
            blocks = scale.reshape(out, groups, ng // groups)
            if np.array_equal(blocks.view(np.uint16), np.repeat(blocks[:, :, :1], ng // groups, 2).view(np.uint16)):
                # every group of a row block carries the block's scale: exactly the original format
                # (returned already in canonical [in, out]; load() transposes only float arrays)
                return QInt8(from_torch(q).T, np.ascontiguousarray(blocks[:, :, 0].T))
        gs = inn // ng
        w = q.float().view(out, ng, gs) * to_torch(scale).float().view(out, ng, 1)
        return from_torch(w.view(out, inn))     # [out, in], like every stored float tensor

    def _dequant_fp8(self, base: str) -> np.ndarray:
        from ..quant.fp8 import dequantize_fp8
        q = to_torch(self._array(base + "weight"))
        scheme, scale_name = self._fp8_scheme(base)
        s = self._array(base + scale_name)
        block = self.block
        s_t = to_torch(s).float()
        return from_torch(dequantize_fp8(q, s_t.reshape(1) if scheme == "tensor" else s_t, scheme, block))

    def _fp8_scheme(self, base: str) -> tuple[str, str]:
        """(scheme, scale tensor suffix) of an fp8 module, from the scale's header shape alone."""
        if self._has(base + "weight_scale_inv"):
            return "block", "weight_scale_inv"
        if not self._has(base + "weight_scale"):
            return "unknown", ""
        shape = self.files[self.where[base + "weight_scale"]].tensors[base + "weight_scale"].shape
        rows = self.files[self.where[base + "weight"]].tensors[base + "weight"].shape[0]
        # one scale per output row is channel; a [out blocks, 1] grid (in_features <= the block) is block
        scheme = "tensor" if math.prod(shape) == 1 else \
            "channel" if len(shape) == 2 and shape[1] == 1 and shape[0] == rows else "block"
        return scheme, "weight_scale"

    def release(self, name: str, index: int | None = None, rows=None) -> None:
        """Drop the mapped pages of every stored tensor behind one canonical parameter (or expert)."""
        entry, _ = self.layout.entry_for(name)
        keys = [(name, index)] if entry.split_experts and index is not None else \
            [k for k in self._canon if k[0] == name]
        for key in keys:
            module = self._canon.get(key)
            if module is None:
                continue
            base = module[: -len("weight")] if module.endswith(".weight") else module
            for n in [module] + [base + suf for suf in _SUFFIXES]:
                if n in self.where:
                    self.files[self.where[n]].release(n)

    def stored(self) -> list[StoredTensor]:
        out = []
        for n in sorted(self.where):
            t = self.files[self.where[n]].tensors[n]
            mod, suf = _module_name(n)
            quant = {}
            if suf in ("weight_packed",):
                quant = {"scheme": "int8 (compressed-tensors pack-quantized)"}
            elif t.dtype.startswith("F8"):
                quant = {"scheme": "fp8-" + self._fp8_scheme(mod[: -len("weight")])[0]}
            elif suf:
                quant = {"part": suf}
            out.append(StoredTensor(n, t.shape, t.dtype, t.nbytes, str(self.path / self.where[n]), quant))
        return out

    def _name_problems(self):
        """(problem, file) for tensors the layout and config expect but are absent, and the reverse."""
        expected = {t.module + ".weight" if t.name.endswith(".weight") else t.name
                    for t in self.layout.plan(self.config, self.layers)}
        have = {_module_name(n)[0] for n in self.where}
        for n in sorted(have - expected)[:5]:
            yield f"unexpected tensor {n} (config: {self.config_source})", self.path / self._shard_of(n)
        for n in sorted(expected - have)[:5]:
            yield f"missing tensor {n} (config: {self.config_source})", self.path

    def problems(self) -> list[str]:
        return [p for p, _ in self._name_problems()] + list(self._problems)


def _ct_block(qc: dict):
    groups = qc.get("config_groups")
    for g in (groups.values() if isinstance(groups, dict) else ()):
        w = g.get("weights") if isinstance(g, dict) else None
        b = w.get("block_structure") if isinstance(w, dict) else None
        if b:
            return b
    return None


_FLOATS = ("F32", "BF16", "F16", "F64")
_FP8 = ("F8_E4M3", "F8_E5M2")


def _expected(suf: str, t, names: dict, block) -> tuple[set | None, tuple]:
    """(allowed shapes, or None for any; allowed dtypes) of one stored tensor of target ``t``."""
    if suf == "":
        if "weight_packed" in names:
            return None, ()                             # packed: no plain weight beside it
        fp8 = "weight_scale" in names or "weight_scale_inv" in names
        return {tuple(t.shape)}, (_FP8 + _FLOATS if fp8 else _FLOATS)
    out, inn = t.shape if len(t.shape) == 2 else (t.shape[0], 1)
    if suf == "weight_packed":
        return {(out, inn // 4)}, ("I32",)
    if suf == "weight_shape":
        return {(2,)}, ("I32", "I64")
    if suf == "input_scale":
        return None, _FLOATS
    if suf == "weight_scale" and "weight_packed" in names:   # int8: one scale per group of a row
        return {(out, inn // g) for g in range(1, inn + 1) if inn % g == 0}, _FLOATS
    blocks = (-(-out // block[0]), -(-inn // block[1]))
    return {(), (1,), (1, 1), (out, 1), blocks}, _FLOATS


def _read_json_object(path: Path) -> dict:
    try:
        obj = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:
        raise CheckpointFormatError(f"not valid JSON: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                                    path=path) from None
    if not isinstance(obj, dict):
        raise CheckpointFormatError("not a JSON object", path=path)
    return obj


def read_index(path: Path) -> dict:
    """``weight_map`` of an index: tensor name -> a shard file name beside the index (nothing else)."""
    obj = _read_json_object(path)
    wm = obj.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise CheckpointFormatError("no weight_map object", path=path)
    for name, shard in wm.items():
        if not (isinstance(shard, str) and shard.endswith(".safetensors") and "/" not in shard
                and "\\" not in shard and not shard.startswith(".")):
            raise CheckpointFormatError(f"weight_map[{_clip(name)}] = {str(shard)[:60]!r} is not a shard file "
                                        "name beside the index", path=path)
    meta = obj.get("metadata", {})
    if not isinstance(meta, dict):
        raise CheckpointFormatError("metadata is not a JSON object", path=path)
    return wm


def index_mismatches(weight_map: dict, where: dict) -> tuple[list, list]:
    """Where an index and the shard headers disagree: (the names the index puts in a shard that does not
    hold them, in the index's order; the names the shards hold that the index does not list, sorted).
    ``where``: tensor name -> the shard whose header holds it."""
    return [n for n, shard in weight_map.items() if where.get(n) != shard], sorted(set(where) - set(weight_map))


def _check_index(path: Path, weight_map: dict, where: dict, root: Path) -> None:
    """The index and the shard headers must agree tensor for tensor (the message names both files)."""
    missing, extra = index_mismatches(weight_map, where)
    if missing:
        name, got = missing[0], where.get(missing[0])
        raise CheckpointFormatError(f"does not hold {_clip(name)}, which {path.name} lists in it" +
                                    (f" (it is in {got})" if got else ""), path=root / weight_map[name])
    if extra:
        raise CheckpointFormatError(f"holds {_clip(extra[0])}, which {path.name} does not list"
                                    + (f" ({len(extra) - 1} more)" if len(extra) > 1 else ""),
                                    path=root / where[extra[0]])


register_format("safetensors", _detect,
                lambda p, layers=None, strict=True: SafetensorsCheckpoint(p, layers=layers, strict=strict))

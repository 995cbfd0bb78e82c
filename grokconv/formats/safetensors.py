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

from ..config import CONFIG_FILE, GrokConfig, ffn_size, load_preset
from ..errors import CheckpointFormatError, MissingTensorError
from ..mapping import Layout, detect_layout
from ..tensor import QInt8, dequantize, from_torch, to_torch
from .base import CheckpointReader, StoredTensor, register_format
from .safetensors_io import SafetensorsFile

__all__ = ["SafetensorsCheckpoint"]

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
        if (root / INDEX).exists():
            try:
                weight_map = json.loads((root / INDEX).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointFormatError(f"bad index: {e}", path=root / INDEX) from None
            files = sorted(set(weight_map.values()))
        else:
            files = [path.name] if path.is_file() else sorted(p.name for p in root.glob("*.safetensors"))
        if not files:
            raise MissingTensorError("no *.safetensors files", path=root)
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        for fn in files:
            if not (root / fn).exists():
                raise MissingTensorError(f"shard {fn} named by the index is missing", path=root)
            sf = SafetensorsFile(root / fn)
            self.files[fn] = sf
            for n in sf.tensors:
                self.where[n] = fn
        self.hf_config = json.loads((root / "config.json").read_text()) if (root / "config.json").exists() else {}
        self.qconfig = self.hf_config.get("quantization_config") or {}
        modules = sorted({_module_name(n)[0] for n in self.where})
        self.layout: Layout = detect_layout(modules)
        self._canon: dict[tuple[str, int | None], str] = {}
        for m in modules:
            parsed = self.layout.parse(m)
            if parsed:
                self._canon[(parsed[1], parsed[2])] = m
        cfg = GrokConfig.load(root / CONFIG_FILE) if (root / CONFIG_FILE).exists() else self._config_from_hf()
        present = sorted({int(c.split("/")[1].rsplit("_", 1)[1]) for c, _ in self._canon
                          if c.startswith("transformer/")})
        super().__init__(root, cfg, present)
        if layers is not None and strict:
            missing = sorted(set(layers) - set(present))
            if missing:
                raise MissingTensorError(f"layers {missing} are not in this checkpoint", path=root)

    def _config_from_hf(self) -> GrokConfig:
        """A GrokConfig from config.json, through the layout's own config template (run backwards)."""
        base = load_preset("grok-1")
        vals = {}
        for key, tmpl in self.layout.config_template.items():
            if isinstance(tmpl, str) and tmpl.startswith("{") and key in self.hf_config:
                vals[tmpl[1:-1]] = self.hf_config[key]
        ffn = vals.pop("ffn_size", None)
        fields = {k: v for k, v in vals.items() if k in base.to_dict() and k != "ffn_size"}
        cfg = base.replace(**fields)
        if ffn is not None and ffn != cfg.ffn_size:
            wf = ffn * 3 / (2 * cfg.emb_size)
            cfg = cfg.replace(widening_factor=wf)
            if ffn_size(cfg.emb_size, wf) != ffn:
                raise CheckpointFormatError(f"intermediate_size {ffn} cannot be derived as Grok-1 derives it",
                                            path=self.path / "config.json")
        return cfg.validate()

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
        block = tuple(self.qconfig.get("weight_block_size") or _ct_block(self.qconfig) or (128, 128))
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

    def problems(self) -> list[str]:
        probs = []
        expected = {t.module + ".weight" if t.name.endswith(".weight") else t.name
                    for t in self.layout.plan(self.config, self.layers)}
        have = {_module_name(n)[0] for n in self.where}
        for n in sorted(expected - have)[:5]:
            probs.append(f"missing tensor {n}")
        for n in sorted(have - expected)[:5]:
            probs.append(f"unexpected tensor {n}")
        return probs


def _ct_block(qc: dict):
    for g in (qc.get("config_groups") or {}).values():
        b = (g.get("weights") or {}).get("block_structure")
        if b:
            return b
    return None


register_format("safetensors", _detect,
                lambda p, layers=None, strict=True: SafetensorsCheckpoint(p, layers=layers, strict=strict))

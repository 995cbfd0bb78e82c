"""``grokconv inspect``: what a checkpoint holds, from headers only (no payload byte is read)."""
from __future__ import annotations

from collections import Counter

from .formats.base import open_checkpoint
from .units import format_bytes as human

__all__ = ["inspect_checkpoint", "format_report", "human"]


def inspect_checkpoint(path) -> dict:
    reader = open_checkpoint(path, strict=False)
    problems = reader.problems()
    tensors = [] if problems and not reader.layers and reader.format != "jax" else reader.stored()
    by_dtype = Counter()
    for t in tensors:
        by_dtype[t.dtype] += t.nbytes
    cfg = reader.config
    return {
        "path": str(reader.path), "format": reader.format,
        "layout": getattr(getattr(reader, "layout", None), "name", None),
        "config": cfg.to_dict(),
        "layers_present": reader.layers,
        "tensors": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "bytes": t.nbytes,
                     "file": t.file, **({"quant": t.quant} if t.quant else {})} for t in tensors],
        "totals": {"tensors": len(tensors), "bytes": sum(t.nbytes for t in tensors),
                   "by_dtype": dict(by_dtype)},
        "problems": problems,
        "header_bytes_read": getattr(reader, "bytes_read", None),
    }


def format_report(rep: dict, limit: int | None = None) -> str:
    lines = [f"{rep['path']}: {rep['format']}" + (f" ({rep['layout']} layout)" if rep["layout"] else ""),
             f"config: {rep['config']['num_layers']} layers, d_model {rep['config']['emb_size']}, "
             f"{rep['config']['num_q_heads']}q/{rep['config']['num_kv_heads']}kv heads of {rep['config']['key_size']}, "
             f"{rep['config']['num_experts']} experts (top-{rep['config']['num_selected_experts']}) of "
             f"{rep['config']['ffn_size']}, vocab {rep['config']['vocab_size']}",
             f"layers present: {len(rep['layers_present'])} of {rep['config']['num_layers']}", ""]
    rows = rep["tensors"] if limit is None else rep["tensors"][:limit]
    w = max([len(t["name"]) for t in rows] + [4])
    lines.append(f"{'name':<{w}}  {'shape':<20} {'dtype':<8} {'bytes':>11}  quantization")
    for t in rows:
        q = t.get("quant", {})
        qs = ""
        if q.get("scale_shape"):
            qs = f"{q['scheme']}, scales {q['scale_shape']} {q['scale_dtype']}, {q['blocks']} row block(s)"
        elif q:
            qs = ", ".join(f"{v}" for v in q.values())
        lines.append(f"{t['name']:<{w}}  {str(tuple(t['shape'])):<20} {t['dtype']:<8} {human(t['bytes']):>11}  {qs}")
    if limit is not None and len(rep["tensors"]) > limit:
        lines.append(f"... {len(rep['tensors']) - limit} more (use --all or --json)")
    tot = rep["totals"]
    lines += ["", f"total: {tot['tensors']} tensors, {human(tot['bytes'])} ({tot['bytes']:,} bytes); "
              + ", ".join(f"{k} {human(v)}" for k, v in sorted(tot["by_dtype"].items()))]
    if rep.get("header_bytes_read") is not None:
        lines.append(f"read {rep['header_bytes_read']:,} header bytes, no payload")
    lines.append("problems: none" if not rep["problems"] else "problems:")
    lines += [f"  - {p}" for p in rep["problems"]]
    return "\n".join(lines)

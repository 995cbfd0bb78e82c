"""Byte sizes: parse ``5GB`` / ``16GiB``, print ``1.50 GiB`` (binary) or ``318.2 GB`` (decimal, as the hub shows)."""
from __future__ import annotations

__all__ = ["format_bytes", "parse_size"]


def format_bytes(n: float, decimal: bool = False) -> str:
    base, units = (1000, ("B", "kB", "MB", "GB", "TB")) if decimal else (1024, ("B", "KiB", "MiB", "GiB", "TiB"))
    for unit in units:
        if abs(n) < base or unit == units[-1]:
            return f"{int(n)} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= base
    raise AssertionError("unreachable")


def parse_size(text) -> int:
    """``5GB`` (10**9), ``16GiB`` (2**30), ``512M``, ``1e9`` or a plain number of bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    t = str(text).strip().upper().replace("IB", "I")
    units = {"KI": 1 << 10, "MI": 1 << 20, "GI": 1 << 30, "TI": 1 << 40, "KB": 10 ** 3, "MB": 10 ** 6,
             "GB": 10 ** 9, "TB": 10 ** 12, "K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "B": 1}
    for u, mult in units.items():
        if t.endswith(u):
            return int(float(t[: -len(u)]) * mult)
    return int(float(t))

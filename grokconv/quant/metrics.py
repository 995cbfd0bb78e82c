"""Quantization error statistics with float64 accumulation, whole-tensor or streamed chunk by chunk.

``rel_l2 = ||approx - ref|| / ||ref||``, ``sqnr_db = 10 log10(||ref||^2 / ||approx - ref||^2)``,
``max_abs = max |approx - ref|``, ``amax = max |ref|``. Sums run in float64 over sub-chunks of at most
``2**20`` elements (the only float64 copies made), so memory stays flat whatever the tensor size.

Edge values, never NaN: zero error gives ``rel_l2 = 0`` and ``sqnr_db = inf``; a zero ``ref`` with
non-zero error gives ``rel_l2 = inf`` and ``sqnr_db = -inf``; an empty input gives zeros and inf.
Streaming the same elements in any chunking gives the same ``max_abs``, ``amax`` and ``numel`` exactly
and the same sums up to float64 summation order (relative differences ~1e-15).
"""
from __future__ import annotations

import math

import torch

__all__ = ["ErrorAccumulator", "error_stats"]

_SUB = 1 << 20


class ErrorAccumulator:
    """Feed ``update(ref_chunk, approx_chunk)`` per chunk; ``result()`` gives ``error_stats``' dict."""

    def __init__(self, fast: bool = False) -> None:
        """``fast``: per-chunk sums from float32 norms (torch's cascaded reductions, ~1e-6 relative),
        accumulated in float64 -- three passes and no float64 copy, cheap enough for every chunk of a
        whole-model conversion. The default is the exact float64 accumulation."""
        self.fast = fast
        self.sum_ref_sq = 0.0
        self.sum_err_sq = 0.0
        self.max_abs = 0.0
        self.amax = 0.0
        self.numel = 0

    @torch.no_grad()
    def update(self, ref: torch.Tensor, approx: torch.Tensor) -> "ErrorAccumulator":
        if ref.shape != approx.shape:
            raise ValueError(f"ref shape {tuple(ref.shape)} != approx shape {tuple(approx.shape)}")
        r, a = ref.reshape(-1), approx.reshape(-1)
        n = r.numel()
        if self.fast and n:
            rf = r.float()
            e = a.float() - rf
            self.sum_ref_sq += float(torch.linalg.vector_norm(rf)) ** 2
            self.sum_err_sq += float(torch.linalg.vector_norm(e)) ** 2
            # amax and amin: several times faster than aminmax on the CPU, the same values
            self.max_abs = max(self.max_abs, abs(float(e.amax())), abs(float(e.amin())))
            self.amax = max(self.amax, abs(float(rf.amax())), abs(float(rf.amin())))
            self.numel += n
            return self
        rbuf = torch.empty(min(n, _SUB), dtype=torch.float64, device=r.device)
        ebuf = torch.empty_like(rbuf)
        for i in range(0, n, _SUB):
            k = min(_SUB, n - i)
            rd = rbuf[:k].copy_(r[i:i + k])
            ed = ebuf[:k].copy_(a[i:i + k]).sub_(rd)
            self.sum_ref_sq += float(torch.dot(rd, rd))
            self.sum_err_sq += float(torch.dot(ed, ed))
            self.max_abs = max(self.max_abs, *(abs(float(v)) for v in torch.aminmax(ed)))
            self.amax = max(self.amax, *(abs(float(v)) for v in torch.aminmax(rd)))
        self.numel += r.numel()
        return self

    @torch.no_grad()
    def update_counts(self, ref: torch.Tensor, approx: torch.Tensor, counts: torch.Tensor) -> "ErrorAccumulator":
        """Elements given as distinct ``(ref, approx)`` pairs and how often each occurs (``counts``, same
        shape): what a table-driven quantizer knows. Sums in float64, as ``update`` would make them."""
        if not (ref.shape == approx.shape == counts.shape):
            raise ValueError(f"ref {tuple(ref.shape)}, approx {tuple(approx.shape)} and counts {tuple(counts.shape)} differ")
        c = counts.reshape(-1).double()
        if not bool((c > 0).any()):
            return self
        r = ref.reshape(-1).double()
        e = approx.reshape(-1).double() - r
        # values that never occur take no part: weight 0 in the sums, and masked out of the maxima
        # (where() rather than a product: a value that never occurs may be inf or NaN)
        r, e = torch.where(c > 0, r, 0.0), torch.where(c > 0, e, 0.0)
        self.sum_ref_sq += float(torch.dot(c, r * r))
        self.sum_err_sq += float(torch.dot(c, e * e))
        self.max_abs = max(self.max_abs, float(e.abs().max()))
        self.amax = max(self.amax, float(r.abs().max()))
        self.numel += int(counts.sum())
        return self

    def result(self) -> dict:
        ref_sq, err_sq = self.sum_ref_sq, self.sum_err_sq
        if err_sq == 0:
            rel, sqnr = 0.0, math.inf
        elif ref_sq == 0:
            rel, sqnr = math.inf, -math.inf
        else:
            rel, sqnr = math.sqrt(err_sq / ref_sq), 10.0 * math.log10(ref_sq / err_sq)
        return {"rel_l2": rel, "sqnr_db": sqnr, "max_abs": self.max_abs, "amax": self.amax,
                "numel": self.numel}


def error_stats(ref: torch.Tensor, approx: torch.Tensor) -> dict:
    """``{"rel_l2", "sqnr_db", "max_abs", "amax", "numel"}`` of ``approx`` against ``ref``."""
    return ErrorAccumulator().update(ref, approx).result()

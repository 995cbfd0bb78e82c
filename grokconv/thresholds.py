"""Parity thresholds by conversion kind: data only (``grokconv parity --expect KIND``)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["Thresholds", "THRESHOLDS", "KINDS"]


@dataclass(frozen=True)
class Thresholds:
    """Limits a parity run must stay within; ``None`` means not checked."""
    max_abs: float | None = None          # max |logit_a - logit_b|
    max_kl: float | None = None           # KL(A||B) of the next-token distributions, mean over positions
    min_top1: float | None = None         # fraction of positions with the same argmax
    min_top5: float | None = None         # mean |top5(A) & top5(B)| / 5
    max_hidden_rel: float | None = None   # ||h_a - h_b|| / ||h_a|| of the residual stream, every layer
    note: str = ""

    def replace(self, **kw) -> "Thresholds":
        return dataclasses.replace(self, **{k: v for k, v in kw.items() if v is not None})

    def limits(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "note" and getattr(self, f.name) is not None}


# One row per conversion kind (``-fp32``: the same kind in a ``--dtype fp32`` run, picked by ``auto``).
# Calibrated with ``tools/calibrate_parity.py`` (bf16 unless the row says fp32, all 12 layers) on two
# models, and each limit is the worst figure either showed times a stated margin:
# * ``tiny-trained`` (the trained preset, 8 batches of 2 x 32 held-out tokens): real conversions (fp8
#   per tensor / channel / 128x128 block, DeepSeek blocks, int8 re-quantization of a bf16 export, the
#   per-channel int8 scheme) and simulated ones (tests/parity_readers.py: int8 per channel and in groups
#   of 48, fp8 per channel and in 32 x 32 blocks). Its KL and top-1 limits come from here: KL limit =
#   the worst correct conversion's KL times 2.5 (int8), 2.1 (fp8) or 1.7 (int8-fp32), top-1 limit = the
#   worst top-1 minus about 0.1 (64 positions a batch: one flip is 0.016).
# * ``tiny`` (random weights, 36 seeded batches of 1x8, 2x16 and 1x32 tokens): every token's own
#   embedding dominates its logits, so KL stays below 4e-9 and top-1 at 1.0, but random weights amplify
#   any perturbation layer after layer; its top-5 and hidden-state limits come from here (about 1.6x room).
# On the trained model the correct conversions pass and the catalogued conversion bugs
# (parity_readers.LOSSY_BUGS) fail: expert scales taken from the next expert, a row block's scale
# shifted by one block, transposed block scales, a group size that does not divide (bf16 rows), amax
# taken over the wrong axis (the int8-fp32 row). Round-toward-zero passes every row: the sandwich
# post-norms normalise its systematic shrink away, and what is left costs at most 2x the correct
# rounding's KL, inside the noise of routing changes (tests/test_trained.py asserts this too).
# A q8_0 (GGUF) row belongs here once that path lands, calibrated the same way (tools/calibrate_parity.py).
THRESHOLDS: dict[str, Thresholds] = {
    "exact": Thresholds(
        max_abs=0.0, max_kl=0.0, min_top1=1.0, min_top5=1.0, max_hidden_rel=0.0,
        note="lossless (original int8, its lossless re-encodings or its bf16 dequantization, in a bf16 run): "
             "the same bf16 weights in the same layout run the same kernels, so every bit agrees"),
    "int8": Thresholds(
        max_kl=2e-2, min_top1=0.85, min_top5=0.6, max_hidden_rel=0.4,
        note="int8 re-quantization, bf16. tiny-trained (held-out text): worst KL 8.0e-3, top-1 0.953, top-5 0.950, "
             "hidden rel L2 0.064; tiny (random): worst top-5 0.79, hidden rel L2 0.24 (12 layers)"),
    "int8-fp32": Thresholds(
        max_kl=4e-3, min_top1=0.85, min_top5=0.6, max_hidden_rel=0.4,
        note="int8 re-quantization, fp32 run. tiny-trained: worst KL 2.3e-3 (1.7x room: amax over the wrong axis "
             "gives 5.1e-3 at best), top-1 0.953, top-5 0.978, hidden rel L2 0.034; top-5 and hidden limits as int8"),
    "fp8": Thresholds(
        max_kl=2.5e-2, min_top1=0.75, min_top5=0.5, max_hidden_rel=0.5,
        note="fp8 e4m3 per tensor / channel / block, bf16 (fp32 runs use it too: their figures are no larger). "
             "tiny-trained: worst KL 1.2e-2, top-1 0.875, top-5 0.931, hidden rel L2 0.090; "
             "tiny (random): worst top-5 0.68, hidden rel L2 0.31 (12 layers)"),
    # GGUF q8_0 (`to-gguf --type q8_0`: the linear weights are the original int8, lossless; the float
    # embedding is ordinary q8_0, the only loss). Calibrated on both models, bf16, all 12 layers
    # (tools/calibrate_parity.py --only gguf-q8_0 --batches 8; 36 random batches on tiny).
    "q8_0": Thresholds(
        max_kl=2e-2, min_top1=0.85, min_top5=0.5, max_hidden_rel=0.45,
        note="GGUF q8_0 (also f16 GGUF: one fp16 rounding, far inside). tiny-trained (held-out text): worst KL "
             "8.4e-3 (2.4x room), top-1 0.953, top-5 0.938, hidden rel L2 0.062; tiny (random): worst hidden "
             "rel L2 0.29, top-5 0.72 (1.5x room), from the embedding's q8_0 alone"),
}
KINDS = tuple(THRESHOLDS)

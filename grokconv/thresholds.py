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


# One row per conversion kind. The loose rows were measured on the tiny synthetic model (bf16, all 12
# layers, 36 random batches of 1x8, 2x16 and 1x32 tokens) against simulated per-channel int8
# re-quantization and fp8 e4m3 of its weights (tests/parity_readers.py); the worst of each is in the
# note and the limits leave about 1.6x room. On tiny every token's own embedding dominates its logits,
# so top-1 is always 1.0 and KL stays below 4e-9: the KL and top-1 limits are the usual acceptance
# levels for weight-only int8 and fp8 on trained models, and on tiny the hidden-state and top-5 limits
# do the work. Random-weight models amplify any perturbation layer after layer, so the loose rows catch
# gross faults (scale blocks, layer order, RoPE, GQA); subtler ones are the "exact" row's job, which the
# lossless path of every converter must pass.
THRESHOLDS: dict[str, Thresholds] = {
    "exact": Thresholds(
        max_abs=0.0, max_kl=0.0, min_top1=1.0, min_top5=1.0, max_hidden_rel=0.0,
        note="lossless (original int8, its lossless re-encodings or its bf16 dequantization, in a bf16 run): "
             "the same bf16 weights in the same layout run the same kernels, so every bit agrees"),
    "int8": Thresholds(
        max_kl=5e-3, min_top1=0.95, min_top5=0.6, max_hidden_rel=0.4,
        note="int8 re-quantization; tiny, 12 layers: worst hidden rel L2 0.24, top-5 0.79 (0.04 and 0.95 over 2 layers)"),
    "fp8": Thresholds(
        max_kl=2e-2, min_top1=0.9, min_top5=0.5, max_hidden_rel=0.5,
        note="fp8 e4m3 per channel; tiny, 12 layers: worst hidden rel L2 0.31, top-5 0.68 (0.06 and 0.90 over 2 layers)"),
    # Calibrated on the TINY SYNTHETIC model only (12 layers, bf16, 36 random batches of 1x8, 2x16, 1x32)
    # with `to-gguf --type q8_0` (weights lossless, the float embedding ordinary q8_0): limits ~1.6x the worst.
    "q8_0": Thresholds(
        max_kl=5e-3, min_top1=0.95, min_top5=0.5, max_hidden_rel=0.45,
        note="GGUF q8_0 (also f16 GGUF: one fp16 rounding, far inside); tiny synthetic, 12 layers: worst hidden "
             "rel L2 0.29, top-5 0.72, from the embedding's q8_0 alone"),
}
KINDS = tuple(THRESHOLDS)

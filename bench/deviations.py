"""What vLLM 0.24 and SGLang 0.5.23 compute differently from Grok-1, measured on a checkpoint.

Each deviation is a switch of the reference forward (``grokconv.forward.Semantics``; the table is
``grokconv.forward.ENGINE_DEVIATIONS``, read from the engines' released ``grok1.py`` / ``grok.py``).
The reference (``model.py``'s semantics) runs once; each deviation runs on the same tokens, and the
report gives KL(reference || deviation), top-1 agreement, top-5 overlap and the max abs logit difference.

    python bench/deviations.py                       # the tiny synthetic model (made under build/)
    python bench/deviations.py CKPT --layers all --batch 4 --seq-len 64 --json out.json
    make deviations DEV_ARGS='CKPT --layers 0-1'

Any checkpoint grokconv reads works (a trained tiny model shows the effects a random one hides: on
random weights each token's own embedding dominates its logits).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grokconv.config import load_preset  # noqa: E402
from grokconv.formats.base import open_checkpoint  # noqa: E402
from grokconv.forward import ENGINE_DEVIATIONS, forward  # noqa: E402
from grokconv.parity import compare_logits, random_tokens  # noqa: E402
from grokconv.synth import synthesize  # noqa: E402


def measure(ckpt, *, layers="all", batch=4, seq_len=32, seed=0, dtype="bf16", device="cpu") -> dict:
    reader = open_checkpoint(ckpt)
    cfg = reader.config
    tokens = random_tokens(cfg.vocab_size, batch, seq_len, seed, cfg.pad_token)
    t0 = time.perf_counter()
    ref = forward(reader, tokens, layers=layers, device=device, dtype=dtype).logits
    out = {"checkpoint": str(ckpt), "layers": layers, "dtype": dtype, "batch": batch, "seq_len": seq_len,
           "seed": seed, "engines": {}}
    for engine, table in ENGINE_DEVIATIONS.items():
        rows = {}
        for what, sem in table.items():
            got = forward(reader, tokens, layers=layers, device=device, dtype=dtype, semantics=sem).logits
            st = compare_logits(ref, got)
            rows[what] = {"switches": sem.changes(), "kl": st.kl, "top1": st.top1, "top5": st.top5,
                          "max_abs": st.max_abs}
        out["engines"][engine] = rows
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?", help="any checkpoint grokconv reads (default: the tiny synthetic model)")
    ap.add_argument("--layers", default="all")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    ckpt = args.checkpoint
    if ckpt is None:
        ckpt = ROOT / "build" / "deviations" / "tiny"
        if not (ckpt / "ckpt-0").is_dir():
            synthesize(ckpt, load_preset("tiny"), seed=0)
    res = measure(ckpt, layers=args.layers, batch=args.batch, seq_len=args.seq_len, seed=args.seed,
                  dtype=args.dtype, device=args.device)
    print(f"{res['checkpoint']}: layers {res['layers']}, {res['dtype']}, tokens {res['batch']}x{res['seq_len']} "
          f"(seed {res['seed']}); each row against Grok-1's own semantics")
    print(f"{'engine':<15} {'deviation':<82} {'KL':>10} {'top-1':>7} {'top-5':>7} {'max abs':>9}")
    for engine, rows in res["engines"].items():
        for what, r in rows.items():
            print(f"{engine:<15} {what:<82} {r['kl']:>10.3g} {r['top1']:>7.4f} {r['top5']:>7.4f} {r['max_abs']:>9.4g}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

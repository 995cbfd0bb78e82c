"""Measure what each lossy conversion does to parity, on the trained and the random tiny model.

For every lossy path (the real converters: fp8 per tensor / channel / 128x128 block, DeepSeek-style fp8
blocks, int8 re-quantization of a bf16 export, the per-channel int8 scheme; the simulated conversions
and the bug catalogue of ``tests/parity_readers.py``) it runs ``grokconv parity`` semantics (bf16, all
layers) over many token batches and prints the worst KL(A||B), top-1, top-5 and hidden-state rel L2:
the figures ``grokconv/thresholds.py`` is calibrated on.

    .venv/bin/python tools/calibrate_parity.py                   # both models, all paths
    .venv/bin/python tools/calibrate_parity.py --model trained --batches 4 --json out.json

Trained model: ``--batches`` batches of 2 x 32 held-out tokens; tiny: as many seeded random batches of
2 x 16 tokens (its vocabulary has no text).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tools"))

import torch  # noqa: E402

from grokconv.config import load_preset  # noqa: E402
from grokconv.formats.base import open_checkpoint  # noqa: E402
from grokconv.parity import random_tokens, run_parity  # noqa: E402
from grokconv.synth import synthesize, write_trained  # noqa: E402


# the conversions are the CI parity table's own (tests/test_parity_paths.py)
from test_parity_paths import _gguf, _st, _then  # noqa: E402


CONVERSIONS = {
    "fp8-channel": _st(quantize="fp8", fp8_scheme="channel"),
    "fp8-tensor": _st(quantize="fp8", fp8_scheme="tensor"),
    "fp8-block": _st(quantize="fp8", fp8_scheme="block"),
    "fp8-block-deepseek": _st(quantize="fp8", fp8_scheme="block", fp8_format="fp8"),
    "bf16 -> int8 (re-quantized)": _then(_st(layout="hf"), _st(layout="sglang", quantize="int8")),
    "int8-channel scheme": _st(quantize="int8", int8_scheme="channel"),
    "gguf-q8_0": _gguf("q8_0"),
}


def measure(a, b, batches, **kw) -> dict:
    worst = {"kl": 0.0, "top1": 1.0, "top5": 1.0, "hidden_rel": 0.0, "kind": None}
    kls = []
    for tok in batches:
        rep = run_parity(a, b, tok, layers="all", device="cpu", dtype=kw.get("dtype", "bf16"),
                         thresholds=kw.get("kind", "auto"), keep_logits=False)
        kls.append(rep.logits.kl)
        worst["kind"] = rep.kind
        worst["kl"] = max(worst["kl"], rep.logits.kl)
        worst["top1"] = min(worst["top1"], rep.logits.top1)
        worst["top5"] = min(worst["top5"], rep.logits.top5)
        worst["hidden_rel"] = max(worst["hidden_rel"], max(s.rel_l2 for s in rep.hidden))
    worst["kl_mean"] = sum(kls) / len(kls)
    worst["kl_min"] = min(kls)                   # the best batch: what a bug must still exceed
    worst["kls"] = kls
    return worst


def main(argv=None) -> int:
    import parity_readers as pr
    import train_tiny

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("trained", "tiny", "both"), default="both")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--only", help="comma-separated path names (default: all)")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    only = set(args.only.split(",")) if args.only else None
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = {}
        if args.model in ("trained", "both"):
            ck = write_trained(tmp / "trained")
            models["tiny-trained"] = (ck, train_tiny.heldout_batches(ck / "tokenizer.model", args.batches))
        if args.model in ("tiny", "both"):
            ck = synthesize(tmp / "tiny", load_preset("tiny"), seed=0)
            models["tiny"] = (ck, [random_tokens(512, 2, 16, seed=s) for s in range(args.batches)])
        for mname, (ck, batches) in models.items():
            a = open_checkpoint(ck)
            rows = {}
            for name, conv in CONVERSIONS.items():
                if only and name not in only:
                    continue
                t0 = time.perf_counter()
                out = tmp / f"{mname}-{len(rows)}"
                conv(ck, out)
                rows[name] = measure(a, open_checkpoint(out), batches, dtype=args.dtype)
                rows[name]["seconds"] = round(time.perf_counter() - t0, 1)
                print(mname, name, rows[name], flush=True)
            for bug, (fn, ok, scheme, kind) in pr.LOSSY_BUGS.items():
                for label, b in ((f"ok: {ok.__name__}", pr.TransformReader(a, ok, scheme=scheme)),
                                 (f"bug: {bug}", pr.bug_reader(a, bug))):
                    if (only and label not in only) or label in rows:
                        continue
                    rows[label] = measure(a, b, batches, kind=kind, dtype=args.dtype)
                    print(mname, label, rows[label], flush=True)
            results[mname] = rows
    print()
    for mname, rows in results.items():
        print(f"{mname}: worst over {args.batches} batches ({args.dtype}, all layers)")
        print("| path | kind | KL max | KL mean | KL min | top-1 min | top-5 min | hidden rel L2 max |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for name, r in rows.items():
            print(f"| {name} | {r['kind']} | {r['kl']:.3g} | {r['kl_mean']:.3g} | {r['kl_min']:.3g} | {r['top1']:.3f} "
                  f"| {r['top5']:.3f} | {r['hidden_rel']:.3g} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make bench`: throughput and peak memory of conversions on a full-width synthetic checkpoint.

Throughput is bytes moved (read + written) per second of wall time, printed as a ratio to a plain
`cp` of the same source files to the same disk, measured in the same run. Both include a final
`sync`, so neither is flattered by dirty pages. Each conversion runs in its own process; its peak
RSS is that process's maximum resident set (file-backed mapped pages included).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

RUN = """
import json, sys, os, time
from grokconv.convert import to_safetensors
t = time.perf_counter()
s = to_safetensors(sys.argv[1], sys.argv[2], quantize=sys.argv[3], fp8_scheme=sys.argv[4], workers=int(sys.argv[5]),
                   progress=False, device=sys.argv[6])
os.sync()
print(json.dumps({"seconds": time.perf_counter() - t, "read": s.bytes_read, "written": s.bytes_written,
                  "peak_rss": s.peak_rss, "phases": s.phases}))
"""

# to-gguf cases ("gguf:f16", "gguf:q8_0"): the output is one .gguf file; the vocabulary is a small trained
# SentencePiece model (llama.cpp's converter pads it to the model's vocab size, as to-gguf does)
RUN_GGUF = """
import json, sys, os, time
from grokconv.gguf_export import to_gguf
t = time.perf_counter()
s = to_gguf(sys.argv[1], os.path.join(sys.argv[2], "model.gguf"), type=sys.argv[3], tokenizer=sys.argv[4],
            workers=int(sys.argv[5]), progress=False)
os.sync()
print(json.dumps({"seconds": time.perf_counter() - t, "read": s.bytes_read, "written": s.bytes_written,
                  "peak_rss": s.peak_rss, "phases": s.phases, "q8_0": s.q8_0}))
"""

# to-megatron cases ("megatron:torch_dist", "megatron:torch"): read = the source's bytes (each read once);
# peak_anon = the most anonymous memory /proc/self/smaps_rollup showed (sampled every 20 ms), which, unlike
# RSS, does not count the mapped source's pages
RUN_MEGATRON = """
import json, sys, os, time, threading
from pathlib import Path
from grokconv.megatron import to_megatron
def anon():
    with open("/proc/self/smaps_rollup") as f:
        return next((int(l.split()[1]) * 1024 for l in f if l.startswith("Anonymous:")), 0)
peak, stop = [anon()], threading.Event()
def watch():
    while not stop.wait(0.02):
        peak[0] = max(peak[0], anon())
threading.Thread(target=watch, daemon=True).start()
t = time.perf_counter()
s = to_megatron(sys.argv[1], sys.argv[2], fmt=sys.argv[3], progress=False)
os.sync()
sec = time.perf_counter() - t
stop.set()
read = sum(p.stat().st_size for p in Path(sys.argv[1], "ckpt-0").iterdir())
print(json.dumps({"seconds": sec, "read": read, "written": s.bytes_written, "peak_rss": s.peak_rss,
                  "phases": s.phases, "peak_anon": max(peak[0], anon())}))
"""


def bench_tokenizer(root: Path) -> Path:
    path = root / "bench-tokenizer.model"
    if not path.exists():
        import sentencepiece as spm
        corpus = root / "bench-corpus.txt"
        corpus.write_text("\n".join(f"grok {i} tensor weight scale block expert {i * 7}" for i in range(2000)))
        spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(root / "bench-tokenizer"), vocab_size=300,
                                       model_type="bpe", byte_fallback=True, minloglevel=2)
    return path


def gib(n):
    return n / 2 ** 30


def cold_cache() -> bool:
    """Start every measurement from a cold page cache when allowed (root), so cp and the conversions
    read the source from disk alike; otherwise say so (the ratio is then warm against warm-ish)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="build/bench")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cases", default="none,int8,fp8:channel,fp8:tensor,fp8:block,gguf:f16,gguf:q8_0,"
                                       "megatron:torch_dist")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic source for the next run")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="where conversions compute")
    args = ap.parse_args()
    root = Path(args.dir)
    src = root / f"full-width-{args.layers}"
    root.mkdir(parents=True, exist_ok=True)
    if not (src / "grokconv-config.json").exists() or len(list((src / "ckpt-0").glob("tensor*"))) < 2 + 12 * args.layers:
        print(f"synthesizing a full-width checkpoint with {args.layers} layers in {src} ...", flush=True)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "grokconv.cli", "synth", str(src), "--preset", "full-width",
                        "--layers", str(args.layers)], check=True)
        print(f"  {time.perf_counter() - t:.0f} s", flush=True)
    size = sum(p.stat().st_size for p in (src / "ckpt-0").iterdir())
    rows = []

    cold = True

    def plain_copy() -> float:
        nonlocal cold
        dst = root / "copy"
        shutil.rmtree(dst, ignore_errors=True)
        cold = cold_cache() and cold
        t = time.perf_counter()
        subprocess.run(["cp", "-r", str(src / "ckpt-0"), str(dst)], check=True)
        os.sync()
        sec = time.perf_counter() - t
        shutil.rmtree(dst)
        return sec

    # the disk's speed drifts over minutes here: copy before and after the cases, and take the faster
    # copy as the reference (the ratios are then the conservative ones)
    cp_first = plain_copy()
    print(f"source {gib(size):.2f} GiB; cp {cp_first:.1f} s = {2 * size / cp_first / 1e6:.0f} MB/s moved", flush=True)
    for case in args.cases.split(","):
        quant, _, scheme = case.partition(":")
        out = root / f"out-{quant}-{scheme or 'x'}"
        shutil.rmtree(out, ignore_errors=True)
        cold = cold_cache() and cold
        if quant == "gguf":
            tok = bench_tokenizer(root)
            out.mkdir(parents=True)
            r = subprocess.run([sys.executable, "-c", RUN_GGUF, str(src), str(out), scheme, str(tok), str(args.workers)],
                               check=True, capture_output=True, text=True)
        elif quant == "megatron":
            r = subprocess.run([sys.executable, "-c", RUN_MEGATRON, str(src), str(out), scheme or "torch_dist"],
                               check=True, capture_output=True, text=True)
        else:
            r = subprocess.run([sys.executable, "-c", RUN, str(src), str(out), quant, scheme or "channel",
                                str(args.workers), args.device], check=True, capture_output=True, text=True)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        moved = res["read"] + res["written"]
        rate = moved / res["seconds"]
        rows.append((case, res["seconds"], moved, rate, res["peak_rss"], res["phases"]))
        print(f"{case}: {res['seconds']:.1f} s, {rate / 1e6:.0f} MB/s moved, "
              f"peak RSS {gib(res['peak_rss']):.2f} GiB", flush=True)
        if res.get("peak_anon"):
            print(f"  peak anonymous memory {gib(res['peak_anon']):.2f} GiB (smaps_rollup, sampled)", flush=True)
        if res.get("q8_0"):
            q = res["q8_0"]
            print(f"  q8_0 from the original int8: {q['q8_0_exact_blocks']} of {q['q8_0_blocks']} blocks exact, "
                  f"{q['q8_0_inexact_blocks']} inexact {({k: v for k, v in q.items() if k.startswith('inexact_')})}",
                  flush=True)
        shutil.rmtree(out)
    cp_last = plain_copy()
    cp_s = min(cp_first, cp_last)
    cp_rate = 2 * size / cp_s
    rows.insert(0, ("cp (plain copy)", cp_s, 2 * size, cp_rate, None, {}))
    if not args.keep:
        shutil.rmtree(src)

    print()
    print(f"{'case':<16} {'seconds':>8} {'GB moved':>9} {'MB/s':>7} {'x cp':>6} {'peak RSS':>9}  where the worker time goes")
    for name, sec, moved, rate, rss, phases in rows:
        tot = sum(phases.values()) or 1
        prof = ", ".join(f"{k} {100 * v / tot:.0f}%" for k, v in phases.items())
        print(f"{name:<16} {sec:8.1f} {moved / 1e9:9.2f} {rate / 1e6:7.0f} {rate / cp_rate:6.2f} "
              f"{'' if rss is None else f'{gib(rss):.2f} GiB':>9}  {prof}")
    print(f"\ncp before the cases {cp_first:.1f} s, after {cp_last:.1f} s; the faster is the reference")
    print(f"{os.cpu_count()} cores; device {args.device}; workers {args.workers}; source {gib(size):.2f} GiB ({args.layers} layers); "
          f"page cache {'dropped before every measurement' if cold else 'NOT dropped (not permitted): warm reads'}")


if __name__ == "__main__":
    main()

"""`make bench`: throughput and peak memory of conversions on a full-width synthetic checkpoint.

Throughput is bytes moved (read + written) per second of wall time, printed as a ratio to a plain
`cp` of the same source files to the same disk, measured just before and just after each conversion
(the faster of the two is its reference: the disk's speed drifts by 2x over minutes here). Both include a final
`sync`, so neither is flattered by dirty pages. Each conversion runs in its own process; its peak
RSS is that process's maximum resident set (file-backed mapped pages included).

Per case and worker count it prints what bounds it: the workers' time split into read (waiting for
the source's pages: the read+transform phase less the transform alone), transform (the case's cost
measured alone on one in-memory expert slice, ``bench/transform.py``, scaled to the bytes converted)
and write; the projected time for the whole release (318 GB) on this machine; and an ESTIMATE of
where a 32-core machine with this disk would be limited (the transform scaled linearly in cores,
which the GIL-held Python between tiles and the memory bandwidth will not quite allow).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transform  # noqa: E402  (the transform alone: bench/transform.py)

RELEASE_BYTES = 318e9   # the Grok-1 release on disk (770 files)
BIG_MACHINE_CORES = 32

RUN = """
import json, sys, os, time
from grokconv.convert import to_safetensors
t = time.perf_counter()
scheme = sys.argv[4]      # "block-inv": the DeepSeek-style --fp8-format fp8 (128x128 blocks, float32 scale_inv)
s = to_safetensors(sys.argv[1], sys.argv[2], quantize=sys.argv[3], fp8_scheme=scheme.removesuffix("-inv"),
                   fp8_format="fp8" if scheme.endswith("-inv") else "compressed-tensors", workers=int(sys.argv[5]),
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


def transform_seconds_per_gib(case: str) -> float:
    """The case's transform alone, one thread, warm: s per GiB of int8 input (mean of the two shapes)."""
    import torch
    torch.set_num_threads(1)
    per = []
    for K, N, G in transform.SHAPES.values():
        value = transform.source(K, N // 4, G)           # a quarter slice: the same tiles, a quarter the time
        per.append(min(transform.run_case(case, value) for _ in range(2)) / (value.weight.nbytes / 2 ** 30))
    return sum(per) / len(per)


def hms(sec: float) -> str:
    h, m = divmod(int(round(sec)) // 60, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {int(round(sec)) % 60:02d} s"


def main():
    from grokconv.runtime import available_cores
    cores = available_cores()
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="build/bench")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--workers", default=f"1,{cores}" if cores > 1 else "1",
                    help="comma-separated worker counts to run each case with (default: 1 and the available cores)")
    ap.add_argument("--cases", default="none,int8,fp8:channel,fp8:tensor,fp8:block,fp8:block-inv,gguf:f16,gguf:q8_0,"
                                       "megatron:torch_dist")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic source for the next run")
    ap.add_argument("--hash", action="store_true", help="print the sha256 of every output file (to compare builds)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="where conversions compute")
    args = ap.parse_args()
    worker_counts = [int(w) for w in str(args.workers).split(",")]
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
    int8_bytes = sum(p.stat().st_size for p in (src / "ckpt-0").iterdir() if p.stat().st_size > 100 << 20)
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

    # the disk's speed drifts by 2x over minutes here (a shared virtual disk): every conversion is
    # bracketed by a copy just before and just after it, and its reference is the faster of the two
    # (the ratios are then the conservative ones)
    cps = [plain_copy()]
    print(f"source {gib(size):.2f} GiB; cp {cps[0]:.1f} s = {2 * size / cps[0] / 1e6:.0f} MB/s moved; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    costs = {}
    for case in args.cases.split(","):
        quant, _, scheme = case.partition(":")
        # to-megatron dequantizes to bf16 (the `none` transform) and has no worker pool: one run
        costs[case] = transform_seconds_per_gib("none" if quant == "megatron" else case)
        print(f"{case}: transform alone {costs[case]:.2f} s/GiB of int8 (1 thread, warm)", flush=True)
        for workers in (worker_counts[:1] if quant == "megatron" else worker_counts):
            out = root / f"out-{quant}-{scheme or 'x'}"
            shutil.rmtree(out, ignore_errors=True)
            cold = cold_cache() and cold
            load = os.getloadavg()[0]
            if quant == "gguf":
                tok = bench_tokenizer(root)
                out.mkdir(parents=True)
                r = subprocess.run([sys.executable, "-c", RUN_GGUF, str(src), str(out), scheme, str(tok), str(workers)],
                                   check=True, capture_output=True, text=True)
            elif quant == "megatron":
                r = subprocess.run([sys.executable, "-c", RUN_MEGATRON, str(src), str(out), scheme or "torch_dist"],
                                   check=True, capture_output=True, text=True)
            else:
                r = subprocess.run([sys.executable, "-c", RUN, str(src), str(out), quant, scheme or "channel",
                                    str(workers), args.device], check=True, capture_output=True, text=True)
            res = json.loads(r.stdout.strip().splitlines()[-1])
            moved = res["read"] + res["written"]
            rate = moved / res["seconds"]
            cps.append(plain_copy())
            cp_ref = min(cps[-2:])
            rows.append(dict(case=case, workers=workers, sec=res["seconds"], moved=moved, rate=rate, rss=res["peak_rss"],
                             phases=res["phases"], read=res["read"], load=load, cp=cp_ref))
            print(f"{case} x{workers}: {res['seconds']:.1f} s, {rate / 1e6:.0f} MB/s moved, "
                  f"peak RSS {gib(res['peak_rss']):.2f} GiB; cp before/after {cps[-2]:.1f}/{cps[-1]:.1f} s: "
                  f"{rate / (2 * size / cp_ref):.2f} x cp", flush=True)
            if res.get("peak_anon"):
                print(f"  peak anonymous memory {gib(res['peak_anon']):.2f} GiB (smaps_rollup, sampled)", flush=True)
            if res.get("q8_0"):
                q = res["q8_0"]
                print(f"  q8_0 from the original int8: {q['q8_0_exact_blocks']} of {q['q8_0_blocks']} blocks exact, "
                      f"{q['q8_0_inexact_blocks']} inexact {({k: v for k, v in q.items() if k.startswith('inexact_')})}",
                      flush=True)
            if args.hash:
                for f in sorted(p for p in out.rglob("*") if p.is_file() and "report" not in p.name):
                    digest = subprocess.run(["sha256sum", str(f)], check=True, capture_output=True, text=True)
                    print(f"  {digest.stdout.split()[0]}  {f.relative_to(out)}", flush=True)
            shutil.rmtree(out)
    cp_s = min(cps)
    cp_rate = 2 * size / cp_s
    if not args.keep:
        shutil.rmtree(src)

    print()
    print(f"{'case':<19} {'wk':>2} {'seconds':>8} {'GB moved':>8} {'MB/s':>6} {'cp s':>5} {'x cp':>5} {'x min':>5} "
          f"{'peak RSS':>9} "
          f"{'bound':>9}  {'read/transform/write of worker time':<36} {'318 GB release':>15}  load")
    print(f"{'cp (fastest)':<19} {'':>2} {cp_s:8.1f} {2 * size / 1e9:8.2f} {cp_rate / 1e6:6.0f} {cp_s:5.1f} "
          f"{1:5.2f} {1:5.2f} {'':>9} {'disk':>9}  {'':<36} {hms(cp_s * RELEASE_BYTES / size):>15}")
    for r in rows:
        ph = r["phases"]
        work = sum(ph.values()) or 1e-9
        # the transform alone, scaled to the int8 bytes this run converted (the float files are small)
        tf = min(costs[r["case"]] * int8_bytes / 2 ** 30, ph.get("read (page faults) + transform", work))
        read = max(0.0, ph.get("read (page faults) + transform", 0.0) - tf)
        write = ph.get("write", 0.0)
        other = max(0.0, work - read - tf - write)
        split = {"read": read, "transform": tf + other, "write": write}
        bound = max(split, key=split.get) if ph else "n/a"
        prof = "/".join(f"{100 * v / work:.0f}" for v in split.values()) + " %" if ph else "(this writer times no phases)"
        print(f"{r['case']:<19} {r['workers']:>2} {r['sec']:8.1f} {r['moved'] / 1e9:8.2f} {r['rate'] / 1e6:6.0f} "
              f"{r['cp']:5.1f} {r['rate'] / (2 * size / r['cp']):5.2f} {r['rate'] / cp_rate:5.2f} "
              f"{gib(r['rss']):7.2f} G {bound:>9}  {prof:<36} "
              f"{hms(r['sec'] * RELEASE_BYTES / size):>15}  {r['load']:.1f}")
    print(f"\ncp runs (s), one before the first case and one after each: {', '.join(f'{c:.1f}' for c in cps)}; "
          f"each case's reference ('cp s') is the faster of its two neighbours; 'x min' is against the fastest "
          f"copy of the whole run, whatever the disk's state when the case ran (the stricter figure)")
    print(f"{cores} cores available; device {args.device}; source {gib(size):.2f} GiB ({args.layers} layers); "
          f"page cache {'dropped before every measurement' if cold else 'NOT dropped (not permitted): warm reads'}; "
          f"load average now {os.getloadavg()[0]:.1f} (the last column: when each case started)")
    print(f"\nESTIMATE, not a measurement: a {BIG_MACHINE_CORES}-core machine with this disk "
          f"({cp_rate / 1e6:.0f} MB/s moved), the transform scaling linearly with {BIG_MACHINE_CORES} workers:")
    for case, cost in costs.items():
        arith = BIG_MACHINE_CORES * 2 ** 30 / cost          # int8 bytes per second the cores could transform
        out_per_in = next((r["moved"] - r["read"]) / max(r["read"], 1) for r in rows if r["case"] == case)
        disk = cp_rate / (1 + out_per_in)                    # int8 bytes per second the disk can move
        limit = "disk" if disk < arith else "arithmetic"
        print(f"  {case:<19} arithmetic {arith / 1e9:5.1f} GB/s of int8 vs disk {disk / 1e9:5.2f} GB/s: limited by "
              f"{limit}; the release in ~{hms(RELEASE_BYTES / min(disk, arith))}")


if __name__ == "__main__":
    main()

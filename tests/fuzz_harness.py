"""Seeded mutation fuzzing of every reader, through grokconv's real command line.

A case is (input kind, file, mutation): a copy of one input with one of its files changed (a flipped
bit, an overwritten / inserted / deleted byte, mostly among the first few hundred bytes where the
opcodes and headers are; a truncation; trailing bytes), then each of the kind's commands run on it.
Every command must end in one of

    ok        exit 0, and what it produced has the tensor names, dtypes and shapes of the unmutated run
    problems  ``inspect`` exit 1, listing the problems it found
    error     exit 2 with exactly one ``error: <path>: ...`` line (and maybe a ``hint:``) naming the
              mutated file

and never in a traceback, a hang (a per-case timeout), a crash (the worker process dies), a file
created outside the output folder, a changed source, or output under a final name after an error.

Cases run in worker processes (``python tests/fuzz_harness.py --worker``; started once, they take
case descriptors as JSON lines on stdin), so a hang or a crash is caught and the next case goes on in a
fresh worker. A case is fully described by its descriptor (kind, file, op, pos, data): those that
ever failed are kept in ``tests/fuzz_corpus/*.json`` and replayed as regression tests.

Adding a reader is one entry in ``INPUTS`` (how to make its input from the base checkpoint, which
files to mutate, which commands to run); a command is one entry in ``COMMANDS``. E.g. a GGUF reader:

    InputKind("gguf", ["to-gguf", "{base}", "{dst}/model.gguf", "--no-progress"], ("*.gguf",),
              ("inspect", "to-safetensors")),
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import select
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CORPUS = HERE / "fuzz_corpus"
LINK_MIN = 64 << 10


def base_config():
    """The config of the base checkpoint every input is made from: tiny, 2 layers, 2 experts."""
    from grokconv.config import load_preset
    return load_preset("tiny").replace(num_layers=2, num_experts=2).validate()          # files at least this big are hard-linked into a case, smaller ones copied


# ------------------------------------------------------------------------------------------- tables

@dataclass(frozen=True)
class InputKind:
    """One reader's input: built from the base checkpoint by a grokconv command line (``{base}``,
    ``{dst}``) or a function ``(base, dst)``; ``files``: globs (under the input) of what a case may
    mutate, each pattern drawn equally often; ``commands``: names in ``COMMANDS``."""
    name: str
    build: object
    files: tuple
    commands: tuple


def _build_gguf(base: Path, dst: Path) -> None:
    """A q8_0 GGUF of the base checkpoint, its vocabulary from a SentencePiece model trained here."""
    sys.path.insert(0, str(HERE))
    from test_gguf import train_tokenizer
    from grokconv.gguf_export import to_gguf
    dst.mkdir(parents=True)
    to_gguf(base, dst / "model.gguf", type="q8_0", tokenizer=train_tokenizer(dst), progress=False)
    for p in dst.iterdir():
        if p.is_dir():
            shutil.rmtree(p)          # .grokconv: the output's record (not part of a GGUF input)
        elif p.suffix != ".gguf":
            p.unlink()


def _build_download(base: Path, dst: Path) -> None:
    """A grokconv download (manifest, ledger, layer 0 of the tiny preset) from the loopback hub."""
    sys.path.insert(0, str(HERE))
    from hub_emulator import HubEmulator
    from grokconv import download as dl
    from grokconv.config import load_preset
    from grokconv.schema import param_specs
    cfg = load_preset("tiny")
    rng = random.Random(0)
    files = {f"ckpt-0/{s.file}": rng.randbytes(rng.randint(200, 3000)) for s in param_specs(cfg)}
    saved = {k: os.environ.get(k) for k in ("HF_ENDPOINT", "HF_HUB_DISABLE_XET", "HF_HUB_OFFLINE")}
    with HubEmulator() as hub:
        hub.add_repo("xai-org/grok-1", files)
        os.environ.update(HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_XET="1")
        os.environ.pop("HF_HUB_OFFLINE", None)
        try:
            dl.download(dst, cfg, layers=[0], tokenizer_repo=None, progress=False, workers=2)
            # the emulator's port is random: a fixed endpoint keeps the manifest's bytes (and so the
            # corpus's positions in it) the same from one build to the next
            m = dst / dl.MANIFEST
            m.write_text(m.read_text().replace(hub.endpoint, "http://127.0.0.1:1"))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


INPUTS = [
    InputKind("jax", None, ("ckpt-0/tensor*", "grokconv-config.json"), ("inspect", "to-safetensors")),
    InputKind("safetensors-bf16", ["to-safetensors", "{base}", "{dst}", "--max-shard-size", "2MB", "--no-progress"],
              ("*.safetensors", "model.safetensors.index.json", "config.json", "grokconv-config.json"),
              ("inspect", "to-safetensors", "verify")),
    InputKind("safetensors-int8", ["to-safetensors", "{base}", "{dst}", "--quantize", "int8", "--layout", "sglang",
                                   "--max-shard-size", "2MB", "--no-progress"],
              ("*.safetensors", "model.safetensors.index.json", "config.json"), ("inspect", "to-safetensors")),
    InputKind("safetensors-fp8", ["to-safetensors", "{base}", "{dst}", "--quantize", "fp8", "--fp8-scheme", "block",
                                  "--fp8-format", "fp8", "--layout", "sglang", "--no-progress"],
              ("*.safetensors", "config.json"), ("inspect", "to-safetensors")),
    InputKind("megatron", ["to-megatron", "{base}", "{dst}", "--format", "torch", "--tp", "2", "--ep", "2",
                           "--no-progress"],
              ("release/*/model_optim_rng.pt", "latest_checkpointed_iteration.txt", "grokconv-config.json"),
              ("inspect", "to-safetensors")),
    InputKind("megatron-dist", ["to-megatron", "{base}", "{dst}", "--format", "torch_dist", "--no-progress"],
              ("release/.metadata", "release/common.pt", "release/__0_0.distcp", "release/metadata.json",
               "latest_checkpointed_iteration.txt"),
              ("inspect", "to-safetensors")),
    InputKind("gguf", _build_gguf, ("*.gguf",), ("inspect", "to-safetensors")),
    InputKind("download", _build_download,
              ("ckpt-0/tensor*", ".grokconv/manifest.json", ".grokconv/verified.jsonl"),
              ("verify", "download-offline")),
]

# name -> (argv with {src} {out}, extra environment, does it write into {src}?)
COMMANDS = {
    "inspect": (["inspect", "--json", "{src}"], {}, False),
    "to-safetensors": (["to-safetensors", "{src}", "{out}", "--max-shard-size", "1MB", "--workers", "1",
                        "--no-progress"], {}, False),
    "verify": (["verify", "{src}"], {}, False),
    "download-offline": (["download", "--preset", "tiny", "--layers", "0", "--no-tokenizer", "--dir", "{src}"],
                         {"HF_HUB_OFFLINE": "1"}, True),
}

OPS = ("flip", "overwrite", "insert", "delete", "truncate", "trailing")
OP_WEIGHTS = (3, 3, 2, 2, 1, 1)
HEAD = 400                   # "the first few hundred bytes": where 80% of positions are drawn
# a JSON file (an index, a manifest, a config) also gets structural mutations half the time: the value
# at node ``pos`` of a depth-first walk (0: the whole document) replaced by another shape
JSON_VALUES = ([], ["model-00001-of-00001.safetensors"], {}, {"a": 1}, 0, -1, 7, 2 ** 70, 1e308, "",
               "../x", None, True, [[]], {"weight_map": []})


def _json_slots(obj):
    """(container, key) of every value below ``obj``, depth first."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield obj, k
        yield from _json_slots(v)


# ------------------------------------------------------------------------------------------- cases

@dataclass
class Case:
    kind: str
    file: str                # relative to the input directory
    op: str
    pos: int
    data: str = ""           # hex: the byte written / inserted, or the trailing bytes
    bit: int = 0
    seed: int | None = None
    note: str = ""

    def apply(self, path: Path) -> None:
        b = bytearray(path.read_bytes())
        if self.op == "flip":
            b[self.pos] ^= 1 << self.bit
        elif self.op == "overwrite":
            b[self.pos] = bytes.fromhex(self.data)[0]
        elif self.op == "insert":
            b[self.pos:self.pos] = bytes.fromhex(self.data)
        elif self.op == "delete":
            del b[self.pos]
        elif self.op == "truncate":
            del b[self.pos:]
        elif self.op == "trailing":
            b += bytes.fromhex(self.data)
        elif self.op == "json":
            doc = json.loads(bytes(b))
            value = json.loads(bytes.fromhex(self.data))
            slots = list(_json_slots(doc))
            if self.pos == 0 or not slots:
                doc = value
            else:
                parent, key = slots[(self.pos - 1) % len(slots)]
                parent[key] = value
            b = bytearray(json.dumps(doc, indent=1).encode())
        elif self.op in ("selftest-hang", "selftest-crash"):   # the harness's own test of its guards
            if self.op == "selftest-hang":
                time.sleep(3600)
            os.kill(os.getpid(), 9)
        else:
            raise ValueError(f"unknown mutation {self.op!r}")
        path.write_bytes(bytes(b))

    def key(self) -> str:
        return f"{self.kind}:{self.file}:{self.op}@{self.pos}" + (f"={self.data}" if self.data else "") + \
            (f"^{self.bit}" if self.op == "flip" else "")


def make_case(seed: int, inputs: dict[str, Path], kinds=None) -> Case:
    """The case of one seed: a kind, a file of it, a mutation that changes the file."""
    rng = random.Random(seed)
    kind = rng.choice(sorted(kinds or inputs))
    spec = KINDS[kind]
    root = inputs[kind]
    pattern = rng.choice(spec.files)
    files = sorted(p.relative_to(root).as_posix() for p in root.glob(pattern) if p.is_file())
    rel = rng.choice(files)
    size = (root / rel).stat().st_size
    op = rng.choices(OPS, OP_WEIGHTS)[0]
    if size == 0:
        op = "trailing"
    pos = rng.randrange(min(size, HEAD)) if rng.random() < 0.8 or size <= HEAD else rng.randrange(size)
    case = Case(kind, rel, op, pos, seed=seed)
    if op == "flip":
        case.bit = rng.randrange(8)
    elif op == "overwrite":
        old = (root / rel).read_bytes()[pos]
        case.data = bytes([rng.choice([v for v in range(256) if v != old])]).hex()
    elif op == "insert":
        case.data = bytes([rng.randrange(256)]).hex()
    elif op == "trailing":
        case.pos = size
        case.data = rng.randbytes(rng.choice([1, 1, 2, 8, 64])).hex()
    if rel.endswith(".json") and rng.random() < 0.5:
        try:
            slots = sum(1 for _ in _json_slots(json.loads((root / rel).read_bytes())))
        except ValueError:
            return case
        value = rng.choice(JSON_VALUES)
        if json.dumps(value) != json.dumps(json.loads((root / rel).read_bytes())):
            case = Case(kind, rel, "json", rng.randrange(slots + 1), json.dumps(value).encode().hex(), seed=seed)
    return case


KINDS = {k.name: k for k in INPUTS}


def build_inputs(workdir: Path, kinds=None) -> dict[str, Path]:
    """The base checkpoint (tiny, 2 layers) and every kind's input made from it, once."""
    from click.testing import CliRunner
    from grokconv.cli import main
    from grokconv.synth import synthesize
    base = workdir / "base"
    if not base.exists():
        synthesize(base, base_config(), seed=0)
    out = {}
    for k in INPUTS:
        if kinds is not None and k.name not in kinds:
            continue
        dst = workdir / "inputs" / k.name
        if k.build is None:
            dst = base
        elif not dst.exists():
            tmp = dst.with_name(dst.name + ".building")
            shutil.rmtree(tmp, ignore_errors=True)
            if callable(k.build):
                k.build(base, tmp)
            else:
                res = CliRunner().invoke(main, [a.format(base=base, dst=tmp) for a in k.build])
                if res.exit_code != 0:
                    raise RuntimeError(f"building {k.name}: {res.output}")
            tmp.rename(dst)
        out[k.name] = dst
    return out


# ------------------------------------------------------------------------------------------- worker

def _snapshot(root: Path) -> dict:
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def _st_signature(out: Path) -> list:
    """(name, dtype, shape) of every tensor in a safetensors output, read by the safetensors library."""
    from safetensors import safe_open
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    sig = []
    for shard in sorted(set(idx["weight_map"].values())):
        with safe_open(out / shard, "np") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                sig.append((k, sl.get_dtype(), list(sl.get_shape())))
    return sorted(sig)


def _signature(cmd: str, res, out: Path):
    if cmd == "inspect":
        rep = json.loads(res.stdout)
        return sorted((t["name"], t["dtype"], t["shape"]) for t in rep["tensors"])
    if cmd == "to-safetensors":
        return _st_signature(out)
    if cmd == "verify":        # "ok: 14 files, 18.48 kB, against ...": what was checked, not what it is called
        return res.stdout.strip().splitlines()[-1].split(", against")[0] if res.stdout.strip() else ""
    return None


def run_case(case: Case, inputs: dict[str, Path], scratch: Path, baseline: dict | None) -> dict:
    """Run one case's commands (in this process, through click); its outcome per command, and failures."""
    from click.testing import CliRunner
    from grokconv.cli import main
    kind = KINDS[case.kind]
    result = {"case": dataclasses.asdict(case), "outcomes": {}, "failures": [], "signatures": {}}
    for cmd in kind.commands:
        argv_t, env, writes_src = COMMANDS[cmd]
        work = Path(tempfile.mkdtemp(prefix="case-", dir=scratch))
        src, out = work / "src", work / "out"
        _copy_input(inputs[case.kind], src, exclude=case.file if case.op != "none" else None)
        target = src / case.file
        if case.op != "none":
            case.apply(target)
        before = _snapshot(src)
        cwd = work / "cwd"
        cwd.mkdir()
        old_cwd = os.getcwd()
        os.chdir(cwd)
        try:
            res = CliRunner().invoke(main, [a.format(src=src, out=out) for a in argv_t], env=env,
                                     catch_exceptions=True)
        finally:
            os.chdir(old_cwd)
        fail = []
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            tb = "".join(traceback.format_exception(res.exception)).strip().splitlines()
            fail.append(f"traceback: {type(res.exception).__name__}: {res.exception} at {' | '.join(tb[-3:])}"[:800])
        if "Traceback" in res.output:
            fail.append("a traceback was printed")
        err_lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        code = res.exit_code
        if fail:
            outcome = "traceback"
        elif code == 0:
            outcome = "ok"
            try:
                sig = _signature(cmd, res, out)
            except Exception as e:  # noqa: BLE001 - the check itself must report, not crash the worker
                fail.append(f"succeeded, but its output is unreadable: {type(e).__name__}: {e}"[:500])
                sig = None
            sig = json.loads(json.dumps(sig))     # as it travels: tuples become lists
            result["signatures"][cmd] = sig
            if baseline is not None and cmd in baseline and sig != baseline[cmd]:
                fail.append(f"succeeded with other tensors / shapes than the unmutated run: {str(sig)[:300]}")
            if case.op != "none" and case.file.startswith("ckpt-0/") and cmd in ("verify", "download-offline"):
                fail.append("a changed checkpoint file passed its sha256 check")
            if list(out.rglob("*.incomplete")) if out.exists() else []:
                fail.append("an *.incomplete file is left after success")
        elif code == 1 and cmd == "inspect":
            outcome = "problems"
            try:
                if not json.loads(res.stdout)["problems"]:
                    fail.append("exit 1 without a problem listed")
            except ValueError:
                fail.append(f"exit 1 and no JSON report: {res.output[-300:]}")
        elif code == 2:
            errors = [ln for ln in err_lines if ln.startswith("error: ")]
            others = [ln for ln in err_lines if not ln.startswith(("error: ", "hint: ", "FAIL "))]
            outcome = "error"
            if len(errors) != 1 or others:
                fail.append(f"expected one error line, got: {err_lines[:6]}")
            elif not _names_file(errors[0], case, src):
                outcome = "error-elsewhere"
                fail.append(f"the error does not name {case.file}: {errors[0][:300]}")
            written = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
            if written:
                fail.append(f"output left after an error: {[p.name for p in written][:4]}")
        else:
            outcome = f"exit-{code}"
            fail.append(f"exit code {code}: {res.output[-400:]}")
        if not writes_src and _snapshot(src) != before:
            fail.append("the source was changed")
        stray = sorted(set(p.name for p in work.iterdir()) - {"src", "out", "cwd"}) + \
            [p.name for p in cwd.iterdir()]
        if stray:
            fail.append(f"files created outside the output folder: {stray[:4]}")
        result["outcomes"][cmd] = outcome
        result["failures"] += [f"{cmd}: {f}" for f in fail]
        if not fail:
            shutil.rmtree(work, ignore_errors=True)
        else:
            result.setdefault("kept", []).append(str(work))
    return result


def _names_file(line: str, case: Case, src: Path) -> bool:
    """Does an error line name the mutated file (by its path, or its name where a message lists it)?"""
    if case.op == "none":
        return True
    return str(src / case.file) in line or Path(case.file).name in line or \
        (case.file.endswith("model_optim_rng.pt") and Path(case.file).parent.name in line)


def _copy_input(src: Path, dst: Path, exclude: str | None) -> None:
    """Hard links for big files (never changed by a case), copies for small ones and the mutated one."""
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        q = dst / rel
        if p.is_dir():
            q.mkdir(parents=True, exist_ok=True)
            continue
        q.parent.mkdir(parents=True, exist_ok=True)
        if rel.as_posix() != exclude and p.stat().st_size >= LINK_MIN:
            os.link(p, q)
        else:
            shutil.copy2(p, q)


def worker_main(args) -> None:
    """Read {"case":..., "inputs":..., "baseline":...} lines; answer each with one result line."""
    scratch = Path(args[args.index("--worker") + 1])
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    out = sys.__stdout__
    sys.stdout = sys.stderr          # anything printed by accident must not corrupt the protocol
    import click.testing  # noqa: F401 - imported before "ready": a case's timeout counts the case only
    import grokconv.cli  # noqa: F401
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        msg = json.loads(line)
        case = Case(**msg["case"])
        t0 = time.perf_counter()
        res = run_case(case, {k: Path(v) for k, v in msg["inputs"].items()}, scratch, msg.get("baseline"))
        res["seconds"] = time.perf_counter() - t0
        out.write(json.dumps(res) + "\n")
        out.flush()


# ------------------------------------------------------------------------------------------- driver

class _Worker:
    def __init__(self, scratch: Path):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]),
               "HF_HUB_DISABLE_TELEMETRY": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
        env.pop("HF_HUB_OFFLINE", None)
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(scratch)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env=env, cwd=str(scratch), text=True, bufsize=1)
        self.case: Case | None = None
        self.started = 0.0
        self.ready = False

    def send(self, case: Case, inputs, baseline) -> None:
        if not self.ready:           # the worker's imports are not the case's time
            self.ready = json.loads(self.proc.stdout.readline() or "{}").get("ready", False)
        self.case, self.started = case, time.monotonic()
        self.proc.stdin.write(json.dumps({"case": dataclasses.asdict(case), "inputs": {k: str(v) for k, v in
                                          inputs.items()}, "baseline": baseline}) + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


@dataclass
class Report:
    results: list = field(default_factory=list)
    seconds: float = 0.0
    workers: int = 1

    @property
    def failures(self) -> list:
        return [r for r in self.results if r["failures"]]

    def counts(self) -> Counter:
        c = Counter()
        for r in self.results:
            for cmd, outcome in r["outcomes"].items():
                c[(r["case"]["kind"], cmd, outcome)] += 1
        return c

    def summary(self) -> str:
        by_outcome = Counter()
        for (_, _, o), n in self.counts().items():
            by_outcome[o] += n
        runs = sum(by_outcome.values())
        lines = [f"{len(self.results)} cases, {runs} command runs in {self.seconds:.1f} s "
                 f"({self.workers} workers): " + ", ".join(f"{o} {n}" for o, n in by_outcome.most_common()),
                 f"failing cases: {len(self.failures)}"]
        table = Counter()
        for (kind, cmd, outcome), n in sorted(self.counts().items()):
            table[(kind, cmd)] += 0
        for (kind, cmd) in sorted(table):
            parts = [f"{o} {n}" for (k, c, o), n in sorted(self.counts().items()) if (k, c) == (kind, cmd)]
            lines.append(f"  {kind:<18} {cmd:<17} " + ", ".join(parts))
        secs = {}
        for r in self.results:
            secs.setdefault(r["case"]["kind"], []).append(r.get("seconds", 0))
        lines.append("  seconds per case: " + ", ".join(f"{k} {sum(v) / len(v):.2f}" for k, v in sorted(secs.items())))
        ops = Counter(r["case"]["op"] for r in self.results)
        lines.append("  mutations: " + ", ".join(f"{o} {n}" for o, n in sorted(ops.items())))
        return "\n".join(lines)


def run_cases(cases: list[Case], inputs: dict[str, Path], scratch: Path, *, workers: int = 2,
              timeout: float = 60.0, budget: float | None = None, baseline: dict | None = None,
              progress=None) -> Report:
    """Run cases in ``workers`` worker processes; a case over ``timeout`` seconds is a hang, a worker
    that dies is a crash (the case is recorded, the worker replaced). Stops starting cases after
    ``budget`` seconds. ``baseline``: {kind: {command: signature}} of the unmutated inputs."""
    scratch.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    todo = list(cases)
    pool = [_Worker(scratch) for _ in range(max(1, min(workers, len(todo))))]
    report = Report(workers=len(pool))
    idle = list(pool)
    busy: dict = {}
    try:
        while todo or busy:
            while idle and todo and (budget is None or time.monotonic() - t0 < budget):
                w = idle.pop()
                case = todo.pop(0)
                w.send(case, {case.kind: inputs[case.kind]}, (baseline or {}).get(case.kind))
                busy[w.proc.stdout.fileno()] = w
            if not busy:
                break
            ready, _, _ = select.select(list(busy), [], [], 0.5)
            for fd in ready:
                w = busy.pop(fd)
                line = w.proc.stdout.readline()
                if line:
                    report.results.append(json.loads(line))
                    idle.append(w)
                else:           # the worker died: a crash of this case
                    w.kill()
                    report.results.append(_dead(w, f"crash: the worker died (exit {w.proc.returncode})"))
                    pool.remove(w)
                    nw = _Worker(scratch)
                    pool.append(nw)
                    idle.append(nw)
                if progress:
                    progress(report)
            now = time.monotonic()
            for fd, w in list(busy.items()):
                if now - w.started > timeout:
                    busy.pop(fd)
                    w.kill()
                    report.results.append(_dead(w, f"hang: no result after {timeout:.0f} s"))
                    pool.remove(w)
                    nw = _Worker(scratch)
                    pool.append(nw)
                    idle.append(nw)
    finally:
        for w in pool:
            w.kill()
    report.seconds = time.monotonic() - t0
    return report


def _dead(w: _Worker, what: str) -> dict:
    return {"case": dataclasses.asdict(w.case), "outcomes": {"?": what.split(":")[0]}, "failures": [what],
            "seconds": time.monotonic() - w.started}


def baselines(inputs: dict[str, Path], scratch: Path) -> dict:
    """Each kind's commands on its unmutated input (in this process): they must succeed; their
    signatures are the reference."""
    scratch.mkdir(parents=True, exist_ok=True)
    out = {}
    for k in inputs:
        r = run_case(Case(k, "", "none", 0), inputs, scratch, None)
        if r["failures"] or any(o != "ok" for o in r["outcomes"].values()):
            raise RuntimeError(f"the unmutated {r['case']['kind']} input does not pass: {r}")
        out[r["case"]["kind"]] = r["signatures"]
    return out


def load_corpus() -> list[Case]:
    cases = []
    for p in sorted(CORPUS.glob("*.json")):
        for d in json.loads(p.read_text()):
            cases.append(Case(**d))
    return cases


def seeded_cases(n: int, seed: int, inputs: dict[str, Path]) -> list[Case]:
    return [make_case(seed * 1_000_003 + i, inputs) for i in range(n)]


def main(argv) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=int(os.environ.get("FUZZ_CASES", 5000)))
    ap.add_argument("--seed", type=int, default=int(os.environ.get("FUZZ_SEED", 1)))
    ap.add_argument("--workers", type=int, default=int(os.environ.get("FUZZ_WORKERS", 2)))
    ap.add_argument("--timeout", type=float, default=float(os.environ.get("FUZZ_CASE_TIMEOUT", 60)))
    ap.add_argument("--budget", type=float, default=float(os.environ.get("FUZZ_TIME", 0)) or None)
    ap.add_argument("--dir", default=os.environ.get("FUZZ_DIR", "build/fuzz"))
    ap.add_argument("--failures", default=None, help="write failing case descriptors here (JSON)")
    a = ap.parse_args(argv)
    work = Path(a.dir).resolve()
    inputs = build_inputs(work)
    base = baselines(inputs, work / "scratch")
    cases = seeded_cases(a.cases, a.seed, inputs)
    last = [0.0]

    def show(rep):
        r = rep.results[-1]
        if r["failures"]:
            print(f"FAIL {Case(**r['case']).key()}: {r['failures'][:2]}", flush=True)
        if time.monotonic() - last[0] > 10:
            last[0] = time.monotonic()
            print(f"  {len(rep.results)}/{len(cases)} cases, {len(rep.failures)} failing", flush=True)
    rep = run_cases(cases, inputs, work / "scratch", workers=a.workers, timeout=a.timeout, budget=a.budget,
                    baseline=base, progress=show)
    print(rep.summary())
    for r in rep.failures[:20]:
        print(f"FAIL {Case(**r['case']).key()}: {r['failures'][:2]}")
    if a.failures:
        Path(a.failures).write_text(json.dumps([r["case"] for r in rep.failures], indent=1) + "\n")
    return 1 if rep.failures else 0


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker_main(sys.argv)
    else:
        sys.exit(main(sys.argv[1:]))

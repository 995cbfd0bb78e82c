"""Interrupted work (issue 12): every writing command, killed (SIGKILL) at random points and run again,
ends byte-identical to an uninterrupted run; a full disk is one clear error and leaves nothing that
looks complete.

``RESUMABLE`` is the table of writing commands: a new writer (``to-gguf``) is one more entry. Kill
points are drawn from a seeded generator over the uninterrupted run's own duration (RESUME_SEED,
RESUME_KILLS); each killed run is checked on the spot: every file under a final name is already the
uninterrupted run's file, and the completion marker is absent unless everything is there.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner

from grokconv.cli import main

KILLS = int(os.environ.get("RESUME_KILLS", 3))      # kill points per writer, drawn from RESUME_SEED
SEED = int(os.environ.get("RESUME_SEED", 0))
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Resumable:
    """A writing command: argv with {src} (its input, a key of the ``sources`` fixture) and {dst}; the
    file whose presence says "complete"; files that legitimately differ between runs (globs)."""
    name: str
    argv: tuple
    source: str
    marker: str
    volatile: tuple = ()
    env: dict = field(default_factory=dict)


RESUMABLE = [
    Resumable("to-safetensors", ("to-safetensors", "{src}", "{dst}", "--max-shard-size", "1MB", "--workers", "1",
                                 "--no-progress"), "jax", "model.safetensors.index.json"),
    Resumable("to-jax", ("to-jax", "{src}", "{dst}", "--no-progress"), "int8", "grokconv-config.json"),
    Resumable("to-megatron", ("to-megatron", "{src}", "{dst}", "--tp", "2", "--pp", "2", "--no-progress"), "jax",
              "latest_checkpointed_iteration.txt"),
    Resumable("download", ("download", "--preset", "tiny", "--no-tokenizer", "--workers", "1", "--dir", "{dst}"),
              "hub", ".grokconv/manifest.json", volatile=(".grokconv/verified.jsonl",)),
    Resumable("to-gguf", ("to-gguf", "{src}", "{dst}/model.gguf", "--workers", "1", "--no-progress"), "jax",
              "model.gguf"),
    Resumable("synth", ("synth", "{dst}", "--preset", "tiny", "--seed", "5", "--no-progress"),
              "none", "grokconv-config.json"),
]


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    """The tiny preset cut to 4 layers and 2 experts (8 MB in bf16): every command runs in about a second."""
    from grokconv.config import load_preset
    from grokconv.synth import synthesize
    from test_gguf import train_tokenizer
    out = synthesize(tmp_path_factory.mktemp("small") / "grok",
                     load_preset("tiny").replace(num_layers=4, num_experts=2).validate(), seed=3)
    # beside the checkpoint, as the release's tokenizer.model is: to-gguf builds its vocabulary from it
    shutil.copy(train_tokenizer(tmp_path_factory.mktemp("tok")), out / "tokenizer.model")
    return out


@pytest.fixture(scope="module")
def hub(tiny_ckpt):
    from hub_emulator import HubEmulator
    files = {f"ckpt-0/{p.name}": p.read_bytes() for p in sorted((tiny_ckpt / "ckpt-0").iterdir())}
    with HubEmulator() as emu:
        emu.add_repo("xai-org/grok-1", files)
        yield emu


@pytest.fixture(scope="module")
def sources(small_ckpt, tmp_path_factory, hub):
    int8 = tmp_path_factory.mktemp("int8")
    from grokconv.convert import to_safetensors
    to_safetensors(small_ckpt, int8, quantize="int8", progress=False)   # lossless: to-jax gives the release's bytes
    return {"jax": small_ckpt, "int8": int8, "hub": None, "none": None}


def _env(hub) -> dict:
    return {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
            "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _argv(cmd: Resumable, src, dst) -> list[str]:
    return [a.format(src=src, dst=dst) for a in cmd.argv]


def _files(d: Path, volatile=()) -> dict[str, str]:
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()
            and not any(p.relative_to(d).match(v) for v in volatile)}


def _run(cmd, src, dst, hub, monkeypatch):
    for k, v in _env(hub).items():
        monkeypatch.setenv(k, v)
    t0 = time.perf_counter()
    res = CliRunner().invoke(main, _argv(cmd, src, dst))
    assert res.exit_code == 0, res.output
    return time.perf_counter() - t0


@pytest.mark.parametrize("cmd", RESUMABLE, ids=[c.name for c in RESUMABLE])
def test_killed_at_random_points_then_rerun_is_byte_identical(cmd, sources, hub, tmp_path, monkeypatch):
    src = sources[cmd.source]
    ref = tmp_path / "ref"
    work_s = _run(cmd, src, ref, hub, monkeypatch)            # uninterrupted, in this process
    want = _files(ref, cmd.volatile)
    dst = tmp_path / "dst"
    rng = random.Random(f"{SEED}:{cmd.name}")
    interrupted = 0
    for k in range(KILLS):
        for attempt in range(4):                              # a kill that came too late is drawn again, earlier
            delay = rng.uniform(0.05, 0.9) * work_s / (2 ** attempt)
            proc = subprocess.Popen([sys.executable, "-m", "grokconv.cli", *_argv(cmd, src, dst)], env=_env(hub),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 120
            while not dst.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)                             # the work starts when its output folder appears
            time.sleep(delay)
            finished = proc.poll() is not None
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert finished is False or proc.returncode == 0, proc.stderr.read().decode()[-2000:]
            proc.stderr.close()
            got = _files(dst, cmd.volatile)
            for name, digest in got.items():                 # under a final name: already the final bytes
                if name.endswith(".incomplete") or name.startswith(".grokconv/"):
                    continue
                assert digest == want.get(name), f"{name} after a kill at {delay:.2f} s differs from the complete run"
            if not finished:
                interrupted += 1
                print(f"{cmd.name}: killed {delay:.2f} s into a {work_s:.2f} s run: {len(got)} files, "
                      f"{sum(n.endswith('.incomplete') or n.endswith('.part') for n in got)} partial")
                if cmd.name == "download":
                    m = dst / cmd.marker
                    assert not m.exists() or not json.loads(m.read_text())["complete"] or got == want
                else:
                    assert not (dst / cmd.marker).exists() or got == want, "looks complete after a kill"
                break
    assert interrupted == KILLS, f"only {interrupted} of {KILLS} kills landed before the run ended"
    _run(cmd, src, dst, hub, monkeypatch)                     # the same command again
    assert _files(dst, cmd.volatile) == want
    assert not list(dst.rglob("*.incomplete")) and not list(dst.rglob("*.part"))


# -- a full disk ------------------------------------------------------------------------------------

def _mount_tmpfs(where: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    where.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


FULL_DISK = RESUMABLE


@pytest.mark.parametrize("cmd", FULL_DISK, ids=[c.name for c in FULL_DISK])
def test_full_disk_on_a_small_tmpfs_is_one_error_and_nothing_complete(cmd, sources, hub, tmp_path, monkeypatch):
    """A real ENOSPC: the output on a 2 MiB tmpfs (root only; elsewhere the in-process test below stands)."""
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "2m"):
        pytest.skip("cannot mount a tmpfs here (needs root); the in-process ENOSPC test covers the write path")
    try:
        for k, v in _env(hub).items():
            monkeypatch.setenv(k, v)
        res = CliRunner().invoke(main, _argv(cmd, sources[cmd.source], mnt / "out"))
        assert res.exit_code == 2, res.output
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in res.output, res.output
        # download measures first ("not enough disk space"); the writers meet ENOSPC while writing
        assert "no space left on the device" in errors[0] or "not enough disk space" in errors[0], errors[0]
        assert str(mnt / "out") in errors[0]
        assert "hint: free space" in res.stderr
        out = mnt / "out"
        assert not (out / cmd.marker).exists() or cmd.name == "download" and not json.loads(
            (out / cmd.marker).read_text())["complete"]
        assert not list(out.rglob("*.incomplete"))
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_full_disk_in_process_every_write_path(small_ckpt, sources, tmp_path, monkeypatch):
    """ENOSPC injected into each write path (pwrite of a shard, atomic_write of a pickle and a rank
    file): one DiskFullError naming the file, the partial file removed, no completion marker."""
    import grokconv.convert as conv
    import grokconv.formats.atomic as atomic
    from grokconv.errors import DiskFullError
    from grokconv.jax_export import to_jax
    from grokconv.megatron import to_megatron

    calls = {"n": 0}
    real_pwrite = os.pwrite

    def full_pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)
    with monkeypatch.context() as m:
        m.setattr(atomic.os, "pwrite", full_pwrite)       # every planned file's writes (PlannedFile)
        with pytest.raises(DiskFullError, match=r"model-00001-of-\d+\.safetensors: no space left") as e:
            conv.to_safetensors(small_ckpt, tmp_path / "st", max_shard_size="4MB", progress=False, workers=1)
    assert "re-run the same command" in e.value.hint
    assert not list((tmp_path / "st").glob("*.incomplete")) and not (tmp_path / "st" / conv.INDEX_FILE).exists()

    class FullFile:
        def __init__(self, f, budget):
            self.f, self.left = f, budget

        def write(self, b):
            self.left -= len(b)
            if self.left < 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)
    real_open = open
    with monkeypatch.context() as m:
        m.setattr(atomic, "open", lambda p, mode="r": FullFile(real_open(p, mode), 300_000), raising=False)
        with pytest.raises(DiskFullError, match=r"ckpt-0/tensor\d{5}_000: no space left"):
            to_jax(sources["int8"], tmp_path / "jx", progress=False)
        assert not list((tmp_path / "jx").rglob("*.incomplete"))
        assert not (tmp_path / "jx" / "grokconv-config.json").exists()
        with pytest.raises(DiskFullError, match=r"model_optim_rng.pt: no space left"):   # torch.save's RuntimeError
            to_megatron(small_ckpt, tmp_path / "mg", tp=2, progress=False)
        assert not list((tmp_path / "mg").rglob("*.incomplete"))
        assert not (tmp_path / "mg" / "latest_checkpointed_iteration.txt").exists()


# -- issue 17: nothing mixed, nothing lost --------------------------------------------------------------
# Each writer, run twice into one output from two sources (or with other options), must either stop with
# one error naming the output and what differs, or with --overwrite leave the bytes of a fresh run.

@dataclass(frozen=True)
class Rerun:
    name: str
    argv: tuple                  # {src} {dst} {out}
    first: str                   # a key of the two_sources fixture (or a seed for synth)
    second: str
    differs: str                 # what the error must say differs
    extra2: tuple = ()           # options of the second run only
    out: str = "{dst}"           # what the error names (the output as the user gave it)


RERUNS = [
    Rerun("to-safetensors", ("to-safetensors", "{src}", "{dst}", "--max-shard-size", "1MB", "--workers", "1",
                             "--no-progress"), "a", "b", "source file changed: ckpt-0/tensor00000_000"),
    Rerun("to-safetensors-int8", ("to-safetensors", "{src}", "{dst}", "--quantize", "int8", "--workers", "1",
                                  "--no-progress"), "a", "b", "source file changed"),
    Rerun("to-safetensors-options", ("to-safetensors", "{src}", "{dst}", "--workers", "1", "--no-progress"), "a", "a",
          "quantize was 'none', now 'int8'", extra2=("--quantize", "int8")),
    Rerun("to-jax", ("to-jax", "{src}", "{dst}", "--no-progress"), "a", "b", "source file changed"),
    Rerun("to-gguf", ("to-gguf", "{src}", "{dst}/model.gguf", "--workers", "1", "--no-progress"), "a", "b",
          "source file changed", out="{dst}/model.gguf"),
    Rerun("to-gguf-type", ("to-gguf", "{src}", "{dst}/model.gguf", "--workers", "1", "--no-progress"), "a", "a",
          "type was 'q8_0', now 'f16'", extra2=("--type", "f16"), out="{dst}/model.gguf"),
    Rerun("synth", ("synth", "{dst}", "--layers", "2", "--seed", "{src}", "--no-progress"), "0", "1",
          "seed was 0, now 1"),
]


@pytest.fixture(scope="module")
def two_sources(small_ckpt, tmp_path_factory):
    """``a``: the small checkpoint; ``b``: the same config drawn with another seed (its tokenizer too)."""
    from grokconv.config import load_preset
    from grokconv.synth import synthesize
    b = synthesize(tmp_path_factory.mktemp("small_b") / "grok",
                   load_preset("tiny").replace(num_layers=4, num_experts=2).validate(), seed=4)
    shutil.copy(small_ckpt / "tokenizer.model", b / "tokenizer.model")
    return {"a": small_ckpt, "b": b}


def _cli(argv, expect=0):
    res = CliRunner().invoke(main, [str(a) for a in argv])
    assert res.exit_code == expect, res.output
    return res


def _rerun_argv(r: Rerun, which: str, dst: Path, sources, extra=()) -> list[str]:
    src = sources.get(which, which)
    return [a.format(src=src, dst=dst) for a in r.argv] + list(extra)


def _all_files(d: Path) -> dict[str, str]:
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("r", RERUNS, ids=[r.name for r in RERUNS])
def test_second_run_from_another_source_or_options_stops_or_overwrites(r, two_sources, tmp_path):
    dst = tmp_path / "out"
    _cli(_rerun_argv(r, r.first, dst, two_sources))
    first = _all_files(dst)
    res = _cli(_rerun_argv(r, r.second, dst, two_sources, r.extra2), expect=2)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in res.output, res.output
    assert errors[0].startswith(f"error: {r.out.format(dst=dst)}: already holds another output: "), errors[0]
    assert r.differs in errors[0], errors[0]
    assert "hint: pass --overwrite" in res.stderr
    assert _all_files(dst) == first                                   # nothing touched
    _cli(_rerun_argv(r, r.second, dst, two_sources, (*r.extra2, "--overwrite")))
    fresh = tmp_path / "fresh"
    _cli(_rerun_argv(r, r.second, fresh, two_sources, r.extra2))
    assert _all_files(dst) == _all_files(fresh)                      # byte-identical to a fresh run
    assert first != _all_files(fresh)


GUARDED = [r for r in RERUNS if r.name in ("to-safetensors", "to-jax", "to-gguf", "synth")]


def _state(d: Path, r: Rerun) -> tuple[Path, str]:
    """The output's directory and key (formats/outputs.py): a GGUF file's are its folder and its name."""
    return (d, "model.gguf") if r.name == "to-gguf" else (d, "output")


@pytest.mark.parametrize("r", GUARDED, ids=[r.name for r in GUARDED])
def test_power_loss_renamed_file_of_zeros_is_not_kept(r, two_sources, tmp_path):
    """What a power loss can leave when data is not fsync'd before the rename: a file under its final
    name with the right size (and header) and zeros for payload, not in the journal. Resume rewrites it."""
    from grokconv.formats.outputs import Fingerprint, OutputGuard
    ref = tmp_path / "ref"
    _cli(_rerun_argv(r, r.first, ref, two_sources))
    want = _all_files(ref)
    dst = tmp_path / "dst"
    shutil.copytree(ref, dst)
    d, key = _state(dst, r)
    record = d / ".grokconv" / f"{key}.json"
    rec = json.loads(record.read_text())
    files = rec["files"]
    victim = max(files, key=lambda f: (files[f], f))                 # the largest finished file
    rec.update(complete=False, files={})                             # an unfinished run...
    record.write_text(json.dumps(rec))
    with OutputGuard(d, Fingerprint.from_dict(rec["fingerprint"]), key=key).start() as g:
        for f, size in sorted(files.items()):                        # ...whose journal lists the others
            if f != victim:
                g.done(d / f, size)
    data = bytearray((d / victim).read_bytes())
    data[len(data) // 2:] = bytes(len(data) - len(data) // 2)        # payload lost, size and header kept
    (d / victim).write_bytes(bytes(data))
    _cli(_rerun_argv(r, r.first, dst, two_sources))
    assert _all_files(dst) == want


SOURCE_CHANGED = [r for r in RERUNS if r.name in ("to-safetensors", "to-jax", "to-gguf")]


@pytest.mark.parametrize("r", SOURCE_CHANGED, ids=[r.name for r in SOURCE_CHANGED])
def test_resume_after_the_source_changed_under_a_half_finished_run(r, two_sources, tmp_path, monkeypatch):
    """A run stopped after two files; its source is then replaced (a re-download, another draw): the
    re-run stops naming the changed files; with --overwrite it gives a fresh run's bytes."""
    import grokconv.formats.atomic as atomic
    src = tmp_path / "src"
    shutil.copytree(two_sources["a"], src)
    dst = tmp_path / "out"
    real, calls = atomic.durable_replace, {"n": 0}

    def stop_after_two(tmp, final):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real(tmp, final)
    with monkeypatch.context() as m:
        m.setattr(atomic, "durable_replace", stop_after_two)
        res = CliRunner().invoke(main, _rerun_argv(r, "x", dst, {"x": src}))
    assert res.exit_code != 0 and calls["n"] == 3
    d, key = _state(dst, r)
    assert not (d / ".grokconv" / f"{key}.json").read_text().count('"complete": true')
    shutil.rmtree(src / "ckpt-0")
    shutil.copytree(two_sources["b"] / "ckpt-0", src / "ckpt-0")
    res = _cli(_rerun_argv(r, "x", dst, {"x": src}), expect=2)
    assert "already holds another output: source file changed: ckpt-0/tensor00000_000" in res.stderr, res.output
    _cli(_rerun_argv(r, "x", dst, {"x": src}, ("--overwrite",)))
    fresh = tmp_path / "fresh"
    _cli(_rerun_argv(r, "x", fresh, {"x": src}))
    assert _all_files(dst) == _all_files(fresh)


def test_two_concurrent_runs_into_one_output(two_sources, tmp_path):
    """The second run stops naming the first one's pid; the first finishes with the bytes of a lone run."""
    src, dst = two_sources["a"], tmp_path / "out"
    code = ("import sys, time, grokconv.convert as c; orig = c._run_job\n"
            "def slow(*a, **k):\n    time.sleep(0.05); return orig(*a, **k)\n"
            "c._run_job = slow\n"
            "from grokconv.cli import main\n"
            f"sys.argv = ['grokconv', 'to-safetensors', {str(src)!r}, {str(dst)!r}, '--max-shard-size', '1MB', "
            "'--workers', '1', '--no-progress']\nmain()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lock = dst / ".grokconv" / "output.lock"
    deadline = time.monotonic() + 120
    while not lock.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    res = _cli(["to-safetensors", src, dst, "--max-shard-size", "1MB", "--workers", "1", "--no-progress"], expect=2)
    assert f"another grokconv run (pid {proc.pid} on " in res.stderr, res.output
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
    proc.stderr.close()
    ref = tmp_path / "ref"
    _cli(["to-safetensors", src, ref, "--max-shard-size", "1MB", "--workers", "1", "--no-progress"])
    assert _all_files(dst) == _all_files(ref)

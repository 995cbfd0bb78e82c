"""The guarded-output API (formats/outputs.py, formats/atomic.py): fingerprints, the per-output lock, the
journal of durable files, unique temporary names. The writers' own behaviour is in test_resume.py."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from grokconv.errors import OutputLockedError, OutputMismatchError
from grokconv.formats.atomic import atomic_write, temp_owner, temp_path, write_planned
from grokconv.formats.outputs import EDGE_BYTES, file_digest, guard_output, make_fingerprint, source_fingerprint


def _src(tmp_path, payload=b"a" * 3_000_000):
    d = tmp_path / "src"
    (d / "ckpt-0").mkdir(parents=True)
    (d / "ckpt-0" / "tensor00000_000").write_bytes(payload)
    (d / "grokconv-config.json").write_text("{}")
    (d / ".grokconv").mkdir()
    (d / ".grokconv" / "state.json").write_text("ignored")
    (d / "ckpt-0" / "tensor00001_000.123-deadbeef.incomplete").write_bytes(b"ignored")
    return d


def test_file_digest_is_sha256_of_size_head_and_tail(tmp_path):
    data = os.urandom(EDGE_BYTES * 3 + 17)
    p = tmp_path / "f"
    p.write_bytes(data)
    want = hashlib.sha256(len(data).to_bytes(8, "little") + data[:EDGE_BYTES] + data[-EDGE_BYTES:]).hexdigest()
    assert file_digest(p) == "edge:" + want
    small = tmp_path / "s"
    small.write_bytes(b"xyz")
    assert file_digest(small) == "edge:" + hashlib.sha256((3).to_bytes(8, "little") + b"xyz").hexdigest()


def test_source_fingerprint_lists_files_not_state(tmp_path):
    d = _src(tmp_path)
    rows = source_fingerprint(d)
    assert [r[0] for r in rows] == ["ckpt-0/tensor00000_000", "grokconv-config.json"]
    assert rows[0][1] == 3_000_000
    # a download manifest's full sha256 is used for the files it lists with the same size
    sha = hashlib.sha256(b"a" * 3_000_000).hexdigest()
    (d / ".grokconv" / "manifest.json").write_text(json.dumps(
        {"files": [{"path": "ckpt-0/tensor00000_000", "size": 3_000_000, "sha256": sha}]}))
    assert source_fingerprint(d)[0][2] == "sha256:" + sha


def test_fingerprint_changes_with_source_and_options(tmp_path):
    d = _src(tmp_path)
    a = make_fingerprint("w", d, layout="hf")
    assert a == make_fingerprint("w", d, layout="hf") and a.digest == make_fingerprint("w", d, layout="hf").digest
    b = make_fingerprint("w", d, layout="sglang")
    assert b.differences(a) == ["layout was 'hf', now 'sglang'"]
    with open(d / "ckpt-0" / "tensor00000_000", "r+b") as f:   # one byte in the last MiB
        f.seek(2_999_000)
        f.write(b"b")
    c = make_fingerprint("w", d, layout="hf")
    assert c.digest != a.digest and c.differences(a) == ["source file changed: ckpt-0/tensor00000_000"]
    assert c.metadata()["grokconv.fingerprint"] == c.digest


def _guard(d, fp, **kw):
    return guard_output(d, fp, owned=("*.bin",), **kw)


def test_guard_refuses_another_runs_output_and_overwrite_replaces_it(tmp_path):
    src = _src(tmp_path)
    out = tmp_path / "out"
    fa = make_fingerprint("w", src, seed=0)
    with _guard(out, fa) as g:
        with atomic_write(out / "a.bin", durable=lambda n: g.done(out / "a.bin", n)) as f:
            f.write(b"A")
        g.finish()
    with _guard(out, fa) as g:                            # the same run again: its file is complete
        assert g.is_complete(out / "a.bin")
    fb = make_fingerprint("w", src, seed=1)
    with pytest.raises(OutputMismatchError, match=r"out: already holds another output: seed was 0, now 1") as e:
        _guard(out, fb)
    assert "--overwrite" in e.value.hint
    assert (out / "a.bin").read_bytes() == b"A"
    with _guard(out, fb, overwrite=True) as g:
        assert not (out / "a.bin").exists() and not g.is_complete(out / "a.bin")
    # files no recorded run made
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.bin").write_bytes(b"?")
    with pytest.raises(OutputMismatchError, match="that no recorded grokconv run made"):
        _guard(other, fa)


def test_a_renamed_file_not_in_the_journal_is_not_complete(tmp_path):
    """A power loss after the rename but before the data reached the disk: the journal line is written
    only after the file and its directory are fsync'd, so such a file is not trusted."""
    out = tmp_path / "out"
    fp = make_fingerprint("w", None, n=1)
    with _guard(out, fp) as g:
        with atomic_write(out / "a.bin", durable=lambda n: g.done(out / "a.bin", n)) as f:
            f.write(b"A" * 10)
        (out / "b.bin").write_bytes(b"\0" * 10)            # renamed, payload lost
    with _guard(out, fp) as g:
        assert g.resumed
        assert g.is_complete(out / "a.bin")
        assert not g.is_complete(out / "b.bin")
        assert not g.is_complete(out / "a.bin", check=lambda p: p.read_bytes() == b"B" * 10)


def test_lock_names_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    out = tmp_path / "out"
    fp = make_fingerprint("w", None)
    with _guard(out, fp):
        with pytest.raises(OutputLockedError, match=rf"pid {os.getpid()} on "):
            _guard(out, fp)
    assert not (out / ".grokconv" / "output.lock").exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket
    (out / ".grokconv" / "output.lock").write_text(f"{int(dead.stdout)} {socket.gethostname()}\n")
    with _guard(out, fp):
        assert (out / ".grokconv" / "output.lock").read_text().split()[0] == str(os.getpid())


def test_temp_names_are_unique_to_the_run_and_only_dead_runs_temps_are_removed(tmp_path):
    t = temp_path(tmp_path / "x.bin")
    assert t.name.startswith("x.bin.") and t.name.endswith(".incomplete") and temp_owner(t) == os.getpid()
    out = tmp_path / "out"
    out.mkdir()
    live = out / f"a.bin.{os.getppid()}-0123abcd.incomplete"        # our parent lives
    dead = out / "a.bin.999999999-0123abcd.incomplete"
    legacy = out / "a.bin.incomplete"
    for p in (live, dead, legacy):
        p.write_bytes(b"x")
    with _guard(out, make_fingerprint("w", None)):
        pass
    assert live.exists() and not dead.exists() and not legacy.exists()


def test_write_planned_fsyncs_before_the_rename(tmp_path, monkeypatch):
    import grokconv.formats.atomic as atomic
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (events.append("rename"), real_replace(a, b))[1])
    write_planned(tmp_path / "f", 16, b"HEADER", lambda f: f.pwrite(b"payload!", 8))
    assert events == ["fsync", "rename", "fsync"]          # file, rename, directory
    assert (tmp_path / "f").read_bytes() == b"HEADER\0\0payload!"

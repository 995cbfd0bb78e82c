"""``grokconv download`` / ``verify`` against a hub emulator on loopback (tests/hub_emulator.py)."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from hub_emulator import HubEmulator  # noqa: E402

from grokconv import download as dl  # noqa: E402
from grokconv.cli import main  # noqa: E402
from grokconv.config import load_preset  # noqa: E402
from grokconv.errors import DownloadError  # noqa: E402
from grokconv.schema import file_name, files_for_layers, param_specs  # noqa: E402

TINY = load_preset("tiny")
BIG_FILE = "ckpt-0/tensor00000_000"
BIG_SIZE = 24 << 20            # over huggingface_hub's 10 MiB write chunk, so a killed run leaves bytes on disk
STALL_AT = 12 << 20


def ckpt_paths(layers=None) -> set[str]:
    specs = param_specs(TINY) if layers is None else files_for_layers(TINY, layers)
    return {f"ckpt-0/{s.file}" for s in specs}


def random_repo(seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {p: rng.randbytes(rng.randint(200, 3000)) for p in sorted(ckpt_paths())} | {"README.md": b"# test\n"}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    from grokconv.synth import synthesize
    src = synthesize(tmp_path_factory.mktemp("src"), TINY, seed=1)
    real = {p: (src / p).read_bytes() for p in ckpt_paths()}
    rand = random_repo(0)
    emu = HubEmulator(page_size=50)   # the 146-file listing comes in three pages
    emu.add_repo("xai-org/grok-1", real | {"README.md": b"# Grok-1\n"})
    emu.add_repo("test/random", rand)
    emu.add_repo("test/big", rand | {BIG_FILE: random.Random(1).randbytes(BIG_SIZE)})
    emu.add_repo("test/gated", rand, gated=True)
    emu.add_repo("keyfan/grok-1-hf", {"tokenizer.model": random.Random(2).randbytes(4000), "config.json": b"{}"})
    emu.add_repo("Xenova/grok-1-tokenizer", {"tokenizer.json": b"{}", "tokenizer_config.json": b"{}"})
    emu.add_repo("someone/git-tokenizer", {"tokenizer.model": b"small, kept in git"}, lfs=False)
    emu.tokens.add("hf_good")
    emu.src = src
    with emu:
        yield emu


@pytest.fixture(autouse=True)
def hub_env(hub, monkeypatch):
    hub.reset()
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)


def fetch(dest, repo="test/random", layers=(0,), tokenizer_repo=None, **kw):
    return dl.download(dest, TINY, repo=repo, layers=None if layers is None else list(layers),
                       tokenizer_repo=tokenizer_repo, progress=False, **kw)


def cli(*args):
    return CliRunner().invoke(main, list(args))


def fetched_paths(hub, repo="test/random", since=0) -> list[str]:
    return [r.path.split("/", 5)[-1] for r in hub.file_gets(repo)[since:]]


def test_emulator_speaks_what_huggingface_hub_expects(hub, tmp_path):
    from huggingface_hub import hf_hub_download, snapshot_download
    wanted = ["ckpt-0/tensor0000[0-2]_000"]
    snapshot_download("test/random", local_dir=tmp_path / "snap", endpoint=hub.endpoint, allow_patterns=wanted)
    for i in range(3):
        assert (tmp_path / "snap/ckpt-0" / file_name(i)).read_bytes() == hub.repos["test/random"].files[
            f"ckpt-0/{file_name(i)}"]
    got = hf_hub_download("keyfan/grok-1-hf", "tokenizer.model", local_dir=tmp_path / "tok", endpoint=hub.endpoint)
    assert Path(got).read_bytes() == hub.repos["keyfan/grok-1-hf"].files["tokenizer.model"]


def test_whole_download_opens_in_the_reader_and_reruns_fetch_nothing(hub, tmp_path):
    from grokconv.formats.base import open_checkpoint
    dest = tmp_path / "ck"
    result = fetch(dest, repo="xai-org/grok-1", layers=None, tokenizer_repo=dl.DEFAULT_TOKENIZER_REPO)
    assert result.fetched_files == len(ckpt_paths()) + 1 == len(result.plan.files)
    assert result.fetched_bytes == result.plan.total_bytes
    repo = hub.repos["xai-org/grok-1"]
    for path in ckpt_paths():
        assert (dest / path).read_bytes() == repo.files[path]
    assert (dest / "tokenizer.model").read_bytes() == hub.repos["keyfan/grok-1-hf"].files["tokenizer.model"]
    assert "keyfan/grok-1-hf@" in result.plan.tokenizer and "NOT the file" in result.plan.tokenizer
    assert not (dest / "README.md").exists()
    manifest = dl.read_manifest(dest)
    assert manifest["complete"] and manifest["layers"] is None and manifest["commit"] == repo.commit
    assert len(manifest["files"]) == 147 and all(len(e["sha256"]) == 64 for e in manifest["files"])
    assert dl.verify_dir(dest).problems == []
    with open_checkpoint(dest) as ck, open_checkpoint(hub.src) as ref:
        assert ck.layers == list(range(TINY.num_layers))
        name = "transformer/decoder_layer_11/router/w"
        np.testing.assert_array_equal(ck.load(name), ref.load(name))

    before = len(hub.log)
    again = fetch(dest, repo="xai-org/grok-1", layers=None, tokenizer_repo=dl.DEFAULT_TOKENIZER_REPO)
    assert again.fetched_files == 0 and len(again.present) == 147
    assert not [r for r in hub.log[before:] if "/resolve/" in r.path]


def test_by_layer_download_takes_the_lexicographic_files(hub, tmp_path):
    from grokconv.formats.base import open_checkpoint
    dest = tmp_path / "ck"
    fetch(dest, repo="xai-org/grok-1", layers=(0, 1, 11))
    assert sorted(fetched_paths(hub, "xai-org/grok-1")) == sorted(ckpt_paths([0, 1, 11]))
    assert {p.name for p in (dest / "ckpt-0").iterdir()} == {p.split("/")[1] for p in ckpt_paths([0, 1, 11])}
    with open_checkpoint(dest, layers=[0, 1, 11]) as ck:
        assert ck.layers == [0, 1, 11]

    n = len(hub.file_gets("xai-org/grok-1"))
    fetch(dest, repo="xai-org/grok-1", layers=(0, 1, 2))
    new = set(fetched_paths(hub, "xai-org/grok-1", since=n))
    assert new == ckpt_paths([2]) - ckpt_paths([])   # only the new layer's 12 files
    # layer files sit in string order 0, 1, 10, 11, 2, ...: layer 2 is the 5th block, not the 3rd
    assert f"ckpt-0/{file_name(2 + 12 * 4)}" in new and f"ckpt-0/{file_name(2 + 12 * 2)}" not in new
    assert dl.read_manifest(dest)["layers"] == [0, 1, 2, 11]
    assert dl.verify_dir(dest).problems == []


def test_dry_run_lists_files_and_total_and_writes_nothing(hub, tmp_path):
    dest = tmp_path / "ck"
    res = cli("download", "--repo", "test/random", "--preset", "tiny", "--layers", "0", "--no-tokenizer",
              "--dir", str(dest), "--dry-run")
    assert res.exit_code == 0, res.output
    total = sum(len(hub.repos["test/random"].files[p]) for p in ckpt_paths([0]))
    assert f"{total:,} bytes" in res.output
    assert sum(line.startswith("  ckpt-0/") for line in res.output.splitlines()) == 14
    assert "to fetch: 14 files" in res.output
    assert not dest.exists() and not hub.file_gets("test/random")


def _largest_partial(staging: Path) -> int:
    """The largest of huggingface_hub's temporary files (others are renamed away while we look)."""
    sizes = [0]
    for p in staging.rglob("*.incomplete") if staging.is_dir() else []:
        try:
            sizes.append(p.stat().st_size)
        except FileNotFoundError:
            pass
    return max(sizes)


def test_killed_run_keeps_finished_files_and_fetches_the_cut_one_again(hub, tmp_path):
    """What is lost against the old transfer engine (README): hf_hub_download writes each transfer to a
    temporary name unique to its process, so the file a kill cut is fetched again from byte 0 (no
    Range); every finished file is kept, and the dead run's temporary file is gone after the re-run."""
    dest = tmp_path / "ck"
    args = ["download", "--repo", "test/big", "--preset", "tiny", "--no-tokenizer", "--workers", "4",
            "--dir", str(dest)]
    hub.stall_at[("test/big", BIG_FILE)] = STALL_AT
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "grokconv.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    staging = dest / ".grokconv" / "staging"
    try:
        deadline = time.monotonic() + 60
        while True:  # the big file half on disk (huggingface_hub's temporary file), every other file finished
            done = [p for p in (dest / "ckpt-0").glob("tensor*")] if (dest / "ckpt-0").is_dir() else []
            if len(done) == len(ckpt_paths()) - 1 and _largest_partial(staging) >= 10 << 20:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the first run never reached the stall"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    hub.stall_at.clear()
    hub.release.set()
    assert not (dest / BIG_FILE).exists() and not dl.read_manifest(dest)["complete"]

    start = len(hub.file_gets("test/big"))
    res = cli(*args)
    assert res.exit_code == 0, res.output
    rerun = hub.file_gets("test/big")[start:]
    assert [(r.path.split("/", 5)[-1], r.range) for r in rerun] == [(BIG_FILE, None)]
    assert (dest / BIG_FILE).read_bytes() == hub.repos["test/big"].files[BIG_FILE]
    assert "fetched 1 " in res.output and f"{len(ckpt_paths()) - 1} already present" in res.output
    assert dl.verify_dir(dest).problems == [] and dl.read_manifest(dest)["complete"]
    assert not staging.exists()


def test_xet_enabled_falls_back_to_http_on_a_hub_without_xet(hub, tmp_path):
    """hf_xet installed and HF_HUB_DISABLE_XET unset (huggingface_hub reads it at import: a fresh
    process): the emulator sends no Xet headers, so huggingface_hub fetches over HTTP, and the files
    are the hub's."""
    pytest.importorskip("hf_xet")
    dest = tmp_path / "ck"
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_XET"} | {"HF_ENDPOINT": hub.endpoint}
    proc = subprocess.run([sys.executable, "-m", "grokconv.cli", "download", "--repo", "test/random", "--preset",
                           "tiny", "--layers", "0", "--no-tokenizer", "--dir", str(dest)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for p in ckpt_paths([0]):
        assert (dest / p).read_bytes() == hub.repos["test/random"].files[p]
    assert sorted(fetched_paths(hub)) == sorted(ckpt_paths([0]))
    assert dl.verify_dir(dest).problems == []


def test_corrupted_transfer_is_fetched_again(hub, tmp_path):
    target = f"ckpt-0/{file_name(0)}"
    hub.corrupt[("test/random", target)] = 1
    result = fetch(tmp_path / "ck")
    assert result.retried == [target] and fetched_paths(hub).count(target) == 2
    assert (tmp_path / "ck" / target).read_bytes() == hub.repos["test/random"].files[target]


def test_corrupted_file_stops_with_one_line_error_and_nothing_unverified_kept(hub, tmp_path):
    target = f"ckpt-0/{file_name(3)}"
    hub.corrupt[("test/random", target)] = 2
    dest = tmp_path / "ck"
    res = cli("download", "--repo", "test/random", "--preset", "tiny", "--layers", "0", "--no-tokenizer",
              "--dir", str(dest))
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert lines[-2].startswith(f"error: {target} from test/random@") and "failed verification twice: sha256" in \
        lines[-2] and lines[-1].startswith("hint: ")
    staging = dest / ".grokconv/staging"      # hf_hub_download's local_dir: no copy of the bad bytes either
    assert not (dest / target).exists() and not (staging / target).exists() and not list(staging.rglob("*.incomplete"))
    assert not dl.read_manifest(dest)["complete"]


def test_verify_reports_changed_and_missing_files(hub, tmp_path):
    dest = tmp_path / "ck"
    fetch(dest)
    res = cli("verify", str(dest))
    assert res.exit_code == 0 and res.output.startswith("ok: 14 files"), res.output
    changed, gone = dest / "ckpt-0" / file_name(0), dest / "ckpt-0" / file_name(1)
    data = bytearray(changed.read_bytes())
    data[7] ^= 1
    changed.write_bytes(bytes(data))
    gone.unlink()
    res = cli("verify", str(dest))
    assert res.exit_code == 2
    assert f"FAIL ckpt-0/{file_name(0)}: sha256" in res.output and f"FAIL ckpt-0/{file_name(1)}: missing" in res.output
    assert "error: 2 problem(s)" in res.output

    again = fetch(dest)     # a re-run repairs both
    assert again.fetched_files == 2 and dl.verify_dir(dest).problems == []


def test_verify_safetensors_directory(tmp_path):
    from safetensors.numpy import save_file
    save_file({"a": np.zeros((2, 3), np.float32), "b": np.ones(4, np.int8)}, tmp_path / "m-1.safetensors")
    save_file({"c": np.ones((5,), np.float32)}, tmp_path / "m-2.safetensors")
    index = {"metadata": {"total_size": 48}, "weight_map": {"a": "m-1.safetensors", "b": "m-1.safetensors",
                                                            "c": "m-2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    res = cli("verify", str(tmp_path))
    assert res.exit_code == 0 and "ok: 2 files" in res.output, res.output

    index["weight_map"] |= {"d": "m-2.safetensors", "e": "m-3.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    shard = tmp_path / "m-1.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3])
    problems = dl.verify_dir(tmp_path).problems
    assert len(problems) == 3
    assert problems[0].endswith("m-1.safetensors: data buffer should end at byte 148, file has 145 bytes")
    assert problems[1].startswith("m-2.safetensors: lacks 1 tensor(s)")
    assert problems[2].startswith("m-3.safetensors: missing")
    assert cli("verify", str(tmp_path)).exit_code == 2


def test_offline_checks_the_directory_and_fetches_nothing(hub, tmp_path, monkeypatch):
    dest = tmp_path / "ck"
    fetch(dest)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")   # nothing may be asked of any hub
    before = len(hub.log)
    result = fetch(dest)
    assert result.fetched_files == 0 and len(result.present) == 14 and len(hub.log) == before
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE is set and 12 requested file.s. were never fetched"):
        fetch(dest, layers=(0, 1))
    (dest / "ckpt-0" / file_name(0)).unlink()
    with pytest.raises(DownloadError, match=r"1 of 14 files are not \(whole\) in"):
        fetch(dest)
    with pytest.raises(DownloadError, match="holds no earlier download"):
        fetch(tmp_path / "empty")


@pytest.mark.parametrize("args, message", [
    (["--repo", "nobody/nothing"], "error: repository nobody/nothing not found on http://127.0.0.1:"),
    (["--revision", "v9"], "error: revision 'v9' not found in test/random"),
    (["--preset", "grok-1"], "error: test/random@main has 146 checkpoint files under ckpt-0/; a 64-layer config "
                             "expects 770"),
    (["--tokenizer-repo", "Xenova/grok-1-tokenizer"], "error: Xenova/grok-1-tokenizer has no tokenizer.model (it "
                                                      "has tokenizer.json, tokenizer_config.json)"),
])
def test_bad_requests_fail_in_one_line_before_writing(hub, tmp_path, args, message):
    dest = tmp_path / "ck"
    base = {"--repo": "test/random", "--preset": "tiny", "--layers": "0"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    res = cli("download", "--dir", str(dest), *[x for kv in base.items() for x in kv])
    assert res.exit_code == 2 and message in res.output, res.output
    assert "Traceback" not in res.output and not dest.exists()


def test_gated_repo_needs_a_token(hub, tmp_path, monkeypatch):
    dest = tmp_path / "ck"
    with pytest.raises(DownloadError, match="test/gated is gated: downloading it needs a Hugging Face token") as e:
        fetch(dest, repo="test/gated")
    assert "HF_TOKEN" in e.value.hint
    assert not list((dest / "ckpt-0").iterdir()) and not dl.read_manifest(dest)["complete"]
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(DownloadError, match="the token in HF_TOKEN has no access"):
        fetch(dest, repo="test/gated")
    monkeypatch.setenv("HF_TOKEN", "hf_good")
    assert fetch(dest, repo="test/gated").fetched_files == 14
    assert {r.auth for r in hub.file_gets("test/gated")[-14:]} == {"Bearer hf_good"}


def test_no_network_is_one_clear_error(tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]   # closed again when the block ends: nothing listens there
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(DownloadError, match=f"cannot reach http://127.0.0.1:{port}") as e:
        fetch(tmp_path / "ck")
    assert "HF_HUB_OFFLINE" in e.value.hint


def test_full_disk_before_and_during_the_transfer(hub, tmp_path, monkeypatch):
    dest = tmp_path / "ck"
    need = dl.format_bytes(sum(len(hub.repos["test/random"].files[p]) for p in ckpt_paths([0])))
    with monkeypatch.context() as m:
        m.setattr(dl.shutil, "disk_usage", lambda p: type("Usage", (), {"free": 500})())
        with pytest.raises(DownloadError, match=f"not enough disk space in .*: {need} to fetch, 500 B free"):
            fetch(dest)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    import grokconv.hub.fetch as fetch_mod
    monkeypatch.setattr(fetch_mod, "hf_hub_download", full)
    with pytest.raises(DownloadError, match="disk full while writing ckpt-0/tensor"):
        fetch(dest)
    assert not list((dest / "ckpt-0").iterdir()) and not dl.read_manifest(dest)["complete"]


def test_tokenizer_from_a_local_file_or_a_git_stored_one(hub, tmp_path, monkeypatch):
    local = tmp_path / "tokenizer.model"
    local.write_bytes(b"sentencepiece model bytes")
    monkeypatch.setattr(dl, "ORIGINAL_TOKENIZER_SHA256", hashlib.sha256(local.read_bytes()).hexdigest())
    res = cli("download", "--repo", "test/random", "--preset", "tiny", "--layers", "0", "--tokenizer", str(local),
              "--dir", str(tmp_path / "a"))
    assert res.exit_code == 0, res.output
    assert f"tokenizer: {local} (local file), byte-identical to the original" in res.output
    assert (tmp_path / "a/tokenizer.model").read_bytes() == local.read_bytes()
    assert dl.verify_dir(tmp_path / "a").problems == []
    assert not hub.file_gets("keyfan/grok-1-hf")

    hub.corrupt[("someone/git-tokenizer", "tokenizer.model")] = 1   # caught by the git blob sha1
    result = fetch(tmp_path / "b", tokenizer_repo="someone/git-tokenizer")
    assert result.retried == ["tokenizer.model"]
    assert (tmp_path / "b/tokenizer.model").read_bytes() == b"small, kept in git"
    assert dl.verify_dir(tmp_path / "b").problems == []


def test_bad_layer_range_is_a_usage_error(tmp_path):
    res = cli("download", "--preset", "tiny", "--layers", "0-12", "--dir", str(tmp_path / "ck"))
    assert res.exit_code == 2 and "layers [12] out of range" in res.output


# -- issue 17: verify validates every index shape and never crashes ----------------------------------------
@pytest.mark.parametrize("weight_map", [["m-1.safetensors"], {"a": ["m-1.safetensors"]}, {"a": 1}, {"a": None},
                                        {}, "m-1.safetensors", {"a": "../m-1.safetensors"}, {"a": {"b": "c"}}],
                         ids=["list", "name-to-list", "name-to-number", "name-to-null", "empty", "string",
                              "outside", "name-to-object"])
def test_verify_refuses_every_index_shape_with_one_error(tmp_path, weight_map):
    from safetensors.numpy import save_file
    save_file({"a": np.zeros((2, 3), np.float32)}, tmp_path / "m-1.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    res = cli("verify", str(tmp_path))
    assert res.exit_code == 2 and "Traceback" not in res.output and isinstance(res.exception, SystemExit), res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and str(index) in errors[0], res.output
    assert "weight_map" in errors[0], errors[0]


@pytest.mark.parametrize("text", ["[]", "1", '"x"', "{", "\xff", '{"weight_map": {"a": "m-1.safetensors"}, '
                                  '"metadata": []}'], ids=["list", "number", "string", "cut", "bytes", "metadata"])
def test_verify_refuses_a_broken_index_file(tmp_path, text):
    from safetensors.numpy import save_file
    save_file({"a": np.zeros((2, 3), np.float32)}, tmp_path / "m-1.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_bytes(text.encode("latin-1"))
    res = cli("verify", str(tmp_path))
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error: ")]
    assert res.exit_code == 2 and len(errors) == 1 and str(index) in errors[0] and "Traceback" not in res.output, \
        res.output

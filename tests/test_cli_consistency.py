"""Every long command takes --no-progress, and every command that reports takes --json: one JSON object
on stdout (errors stay one ``error:`` line on stderr with a non-zero exit)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from grokconv.cli import main

LONG = ["synth", "to-safetensors", "to-gguf", "to-jax", "to-megatron", "from-megatron", "download", "verify", "parity"]
REPORTS = ["synth", "inspect", "to-safetensors", "to-gguf", "to-jax", "to-megatron", "from-megatron", "download", "verify"]
# parity: --json PATH writes its (large) report to a file; its options are another issue's.


def _flags(name):
    return {opt for p in main.commands[name].params for opt in getattr(p, "opts", []) + getattr(p, "secondary_opts", [])}


@pytest.mark.parametrize("name", LONG)
def test_long_commands_take_no_progress(name):
    assert "--no-progress" in _flags(name)


@pytest.mark.parametrize("name", REPORTS)
def test_reporting_commands_take_json(name):
    assert "--json" in _flags(name)


def test_json_summaries_parse_and_hold_the_figures(tmp_path):
    run = CliRunner().invoke
    src = tmp_path / "s"
    res = run(main, ["synth", str(src), "--layers", "1", "--json", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["files"] == 14
    from test_gguf import train_tokenizer
    (tmp_path / "tok").mkdir()
    tok = train_tokenizer(tmp_path / "tok")
    steps = [
        (["to-safetensors", str(src), str(tmp_path / "st"), "--quantize", "int8", "--json", "--no-progress"],
         "files_written", 1),
        (["to-safetensors", str(src), str(tmp_path / "st"), "--quantize", "int8", "--json", "--no-progress"],
         "files_skipped", 1),
        (["to-safetensors", str(src), str(tmp_path / "x"), "--dry-run", "--json"], "dry_run", True),
        (["verify", str(tmp_path / "st"), "--json", "--no-progress"], "ok", True),
        (["to-jax", str(tmp_path / "st"), str(tmp_path / "jx"), "--json", "--no-progress"], "tensors", 14),
        (["to-megatron", str(src), str(tmp_path / "m"), "--json", "--no-progress"], "files_written", 1),
        (["to-megatron", str(src), str(tmp_path / "m"), "--dry-run", "--json"], "fits", True),
        (["from-megatron", str(tmp_path / "m"), str(tmp_path / "b"), "--json", "--no-progress"], "files_written", 1),
        (["inspect", str(src), "--json"], "format", "jax"),
        (["to-gguf", str(src), str(tmp_path / "g" / "m.gguf"), "--tokenizer", str(tok), "--json", "--no-progress"],
         "files_written", 1),
        (["to-gguf", str(src), str(tmp_path / "g" / "m.gguf"), "--tokenizer", str(tok), "--dry-run", "--json"],
         "dry_run", True),
    ]
    for argv, key, value in steps:
        res = run(main, argv)
        assert res.exit_code == 0, (argv, res.output)
        assert json.loads(res.stdout)[key] == value, argv
    for p in (tmp_path / "jx" / "ckpt-0").iterdir():     # int8 is lossless all the way round
        assert p.read_bytes() == (src / "ckpt-0" / p.name).read_bytes()
    bad = tmp_path / "st" / "model-00001-of-00001.safetensors"
    bad.write_bytes(bad.read_bytes()[:-1])
    res = run(main, ["verify", str(tmp_path / "st"), "--json"])
    assert res.exit_code == 2 and json.loads(res.stdout)["ok"] is False
    assert f"first: {bad}" in [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")][0]

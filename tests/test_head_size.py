"""Exports an engine would misread are refused: vLLM's grok1.py (the `hf` layout) and llama.cpp (the
`keyfan` layout through its converter, and `to-gguf`) take the head size as d_model / heads whatever
the config says. A model whose heads do not fill d_model stops with an error and a hint unless --force;
SGLang reads head_dim (the `sglang` layout is written), and Grok-1's shape (heads fill d_model) passes.
"""
import json
import shutil

import pytest
from click.testing import CliRunner

from grokconv.cli import main
from grokconv.config import load_preset
from grokconv.errors import LayoutError
from grokconv.mapping import check_head_size, layout_names, load_layout
from grokconv.synth import synthesize
from test_gguf import train_tokenizer


@pytest.fixture(scope="module")
def misfit(tmp_path_factory):
    """tiny with 16 heads of 32 in d_model 256 (512 != 256), one layer, and a tokenizer file beside it."""
    d = tmp_path_factory.mktemp("heads") / "m"
    synthesize(d, load_preset("tiny").replace(key_size=32, num_layers=1), seed=0)
    shutil.copy(train_tokenizer(d.parent), d / "tokenizer.model")   # keyfan and to-gguf need one
    return d


def test_which_layouts_derive_the_head_size():
    derives = {n for n in [*layout_names(), "gguf"] if load_layout(n).derives_head_size}
    assert derives == {"hf", "keyfan", "gguf"}
    cfg = load_preset("tiny")                  # heads fill d_model, as Grok-1's 48 x 128 = 6144
    assert cfg.num_q_heads * cfg.key_size == cfg.emb_size
    assert all(check_head_size(load_layout(n), cfg) is None for n in derives)
    bad = cfg.replace(key_size=32)
    with pytest.raises(LayoutError, match=r"16 heads of 32 in d_model 256 \(512 != 256\)"):
        check_head_size(load_layout("hf"), bad)
    assert "vLLM" in check_head_size(load_layout("hf"), bad, force=True)
    assert check_head_size(load_layout("sglang"), bad) is None


@pytest.mark.parametrize("layout", ["hf", "keyfan"])
def test_to_safetensors_refuses_unless_force(misfit, tmp_path, layout):
    dst = tmp_path / layout
    r = CliRunner().invoke(main, ["to-safetensors", str(misfit), str(dst), "--layout", layout, "--no-progress"])
    assert r.exit_code == 2 and "512 != 256" in r.output and "hint: --force" in r.output, r.output
    assert "Traceback" not in r.output and not (dst.exists() and any(dst.iterdir()))   # nothing written
    r = CliRunner().invoke(main, ["to-safetensors", str(misfit), str(dst), "--layout", layout, "--force",
                                  "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "warning (--force)" in r.stderr and json.loads((dst / "config.json").read_text())["head_dim"] == 32


def test_sglang_layout_is_written(misfit, tmp_path):
    r = CliRunner().invoke(main, ["to-safetensors", str(misfit), str(tmp_path / "s"), "--layout", "sglang",
                                  "--no-progress"])
    assert r.exit_code == 0 and "warning" not in r.stderr, r.output


def test_to_gguf_refuses_unless_force(misfit, tmp_path):
    out = tmp_path / "m.gguf"
    r = CliRunner().invoke(main, ["to-gguf", str(misfit), str(out), "--type", "f32", "--no-progress"])
    assert r.exit_code == 2 and "embedding_length / head_count" in r.output and "--force" in r.output, r.output
    assert not out.exists()
    r = CliRunner().invoke(main, ["to-gguf", str(misfit), str(out), "--type", "f32", "--dry-run", "--force"])
    assert r.exit_code == 0 and "warning (--force)" in r.stderr, r.output

"""``parity --engine vllm`` without vLLM: the errors that name the cause, before any vLLM runs
(tests/test_vllm.py, run by ``make test-vllm``, runs vLLM itself)."""
import dataclasses
import importlib.util
import json

import numpy as np
import pytest
from click.testing import CliRunner

from grokconv.cli import main
from grokconv.config import load_preset
from grokconv.convert import to_safetensors
from grokconv.engines import engine_semantics, vllm_engine
from grokconv.errors import EngineUnavailableError, GrokconvError
from grokconv.forward import ENGINE_DEVIATIONS
from grokconv.synth import synthesize


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm-engine")
    out = {}
    for name, cfg in {"h32": load_preset("tiny").replace(key_size=32, num_q_heads=8, num_kv_heads=4, num_layers=1,
                                                         attn_output_multiplier=32 ** -0.5),
                      "misfit": load_preset("tiny").replace(key_size=32, num_layers=1),
                      "scale": load_preset("tiny").replace(key_size=32, num_q_heads=8, num_kv_heads=4,
                                                           num_layers=1)}.items():
        synthesize(tmp / name, cfg, seed=0)
        to_safetensors(tmp / name, tmp / f"{name}-hf", progress=False)
        out[name] = tmp / f"{name}-hf"
    return out


def test_semantics_are_the_vllm_rows_of_the_deviation_table():
    """What the engine switches on in the reference is what the deviation table says vLLM computes."""
    table = ENGINE_DEVIATIONS["vLLM 0.24.0"]
    sem, logprobs = engine_semantics("vllm", "bf16")
    assert logprobs and sem == table["all of the above"]
    sem32, _ = engine_semantics("vllm", "fp32")    # the router in bf16 is the bf16 run's weight dtype
    assert sem32 == dataclasses.replace(sem, gate_dtype="f32")
    assert engine_semantics("transformers", "bf16")[0].is_reference


def test_no_vllm_is_a_clear_error(exports, monkeypatch, tmp_path):
    monkeypatch.delenv(vllm_engine.PYTHON_ENV, raising=False)
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(EngineUnavailableError, match="not importable here") as e:
            vllm_engine.logits(exports["h32"], np.array([[1, 2, 3]]))
        assert "make vllm-venv" in e.value.hint
    r = CliRunner().invoke(main, ["parity", str(exports["h32"]), str(exports["h32"]), "--engine", "vllm",
                                  "--engine-python", str(tmp_path / "nope" / "python")])
    assert r.exit_code == 2 and "does not exist" in r.output and "hint: make vllm-venv" in r.output, r.output


@pytest.mark.parametrize("name,match", [("misfit", r"hidden_size / num_attention_heads \(256 / 16 = 16\) and "
                                                   r"ignores head_dim 32"),
                                        ("scale", r"head_dim\*\*-0.5 = 0.176777, this model by "
                                                  r"attn_output_multiplier = 0.25")])
def test_models_vllm_would_misread_are_refused_before_it_runs(exports, name, match, tmp_path):
    fake = tmp_path / "python"          # never started: the refusal comes first
    fake.write_text("#!/bin/sh\nexit 99\n")
    with pytest.raises(GrokconvError, match=match):
        vllm_engine.logits(exports[name], np.array([[1, 2, 3]]), python=str(fake))
    assert json.loads((exports[name] / "config.json").read_text())["head_dim"] == 32


def test_a_worker_that_dies_is_one_error(exports, tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'ImportError: libtorch_cpu.so: cannot open shared object file' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(GrokconvError, match=r"exit status 3: ImportError: libtorch_cpu.so"):
        vllm_engine.logits(exports["h32"], np.array([[1, 2, 3]]), python=str(fake))

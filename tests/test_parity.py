"""Parity: every known way to get the forward or the weights wrong fails the exact check; lossy
conversions pass their own rows; the CLI reports and exits as documented."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import require
import torch
from click.testing import CliRunner

from grokconv.cli import main
from grokconv.errors import ParityError
from grokconv.formats.base import open_checkpoint
from grokconv.forward import WRONG_VARIANTS
from grokconv.parity import (THRESHOLDS, Thresholds, compare_hidden, compare_logits, infer_kind, parse_tokens,
                             random_tokens, resolve_thresholds, run_parity)
from parity_readers import TransformReader, first_scale_row, quant_fp8, requant_int8, write_numeric_order_copy


@pytest.fixture(scope="module")
def reader(tiny_ckpt):
    return open_checkpoint(tiny_ckpt)


@pytest.fixture(scope="module")
def tokens():
    return random_tokens(512, 2, 16, seed=0)


@pytest.fixture(scope="module")
def numeric_ckpt(tiny_ckpt, tmp_path_factory):
    return write_numeric_order_copy(tiny_ckpt, tmp_path_factory.mktemp("numeric") / "grok")


def _parity(a, b, tokens, **kw):
    kw.setdefault("layers", "all")
    kw.setdefault("device", "cpu")
    return run_parity(a, b, tokens, **kw)


def test_same_checkpoint_is_bit_exact(reader, tokens):
    rep = _parity(reader, reader, tokens).check()
    assert rep.kind == "exact" and rep.passed
    assert rep.logits.max_abs == 0 and rep.logits.kl == 0 and rep.logits.top1 == 1 and rep.logits.top5 == 1
    assert [s.layer for s in rep.hidden] == list(range(12))
    assert all(s.max_abs == 0 and s.rel_l2 == 0 and s.cosine == pytest.approx(1) for s in rep.hidden)
    assert rep.logits_a.shape == (2, 16, 512) and rep.logits_a.dtype == torch.float32


@pytest.mark.parametrize("variant", sorted(WRONG_VARIANTS))
def test_wrong_forward_variant_fails_exact(reader, tokens, variant):
    """The variant on one side, the reference on the other, same weights: the exact row must fail.
    Every variant acts in every layer, so four layers show it (test_forward checks all 12 against numpy)."""
    rep = _parity(reader, reader, tokens, layers="0-3", semantics_b=WRONG_VARIANTS[variant])
    assert not rep.passed and rep.logits.max_abs > 0
    assert rep.b["semantics"] == WRONG_VARIANTS[variant].changes()
    with pytest.raises(ParityError, match="exact") as info:
        rep.check()
    assert info.value.report is rep


def test_numeric_layer_order_fails(reader, numeric_ckpt, tokens):
    """A converter that reads file positions in numeric layer order: right for layers 0-1, wrong after."""
    wrong = open_checkpoint(numeric_ckpt)
    assert _parity(reader, wrong, tokens, layers="0-1").passed        # the copy is faithful where orders agree
    rep = _parity(reader, wrong, tokens)
    assert not rep.passed
    assert [s.layer for s in rep.hidden if s.max_abs > 0][0] == 2      # "layer 2" holds layer 10's weights
    assert not _parity(reader, wrong, tokens, thresholds="int8").passed   # gross enough for the loose row


def test_g8_scales_applied_as_g1_fails(reader, tokens):
    wrong = TransformReader(reader, first_scale_row)
    rep = _parity(reader, wrong, tokens)
    assert not rep.passed and rep.hidden[0].max_abs > 0
    assert not _parity(reader, wrong, tokens, thresholds="int8").passed


def test_lossy_conversions_pass_their_rows(reader, tokens):
    """Simulated int8 re-quantization and fp8 of the weights: outside exact, inside their own rows."""
    int8 = TransformReader(reader, requant_int8, scheme="int8-channel")
    fp8 = TransformReader(reader, quant_fp8, scheme="fp8-channel")
    assert infer_kind(reader, int8) == "int8" and infer_kind(reader, fp8) == "fp8"
    assert infer_kind(reader, reader) == infer_kind(reader, reader, dtype="fp32") == "exact"
    rep = _parity(reader, int8, tokens, thresholds="auto")
    assert rep.kind == "int8" and rep.passed, rep.failures
    assert not _parity(reader, int8, tokens, layers="0-1").passed
    rep = _parity(reader, fp8, tokens, thresholds="auto")
    assert rep.kind == "fp8" and rep.passed, rep.failures


def test_threshold_table_and_overrides(reader):
    assert set(THRESHOLDS) >= {"exact", "int8", "fp8"}
    assert THRESHOLDS["exact"].limits() == {"max_abs": 0.0, "max_kl": 0.0, "min_top1": 1.0, "min_top5": 1.0,
                                            "max_hidden_rel": 0.0}
    kind, th = resolve_thresholds("fp8", max_kl=0.5, min_top1=None)
    assert kind == "fp8" and th.max_kl == 0.5 and th.min_top1 == THRESHOLDS["fp8"].min_top1
    assert resolve_thresholds(Thresholds(max_abs=1.0))[0] == "custom"
    with pytest.raises(ValueError, match="unknown parity kind"):
        resolve_thresholds("fp4")


def test_metrics():
    a = torch.tensor([[[2.0, 1.0, 0.0, -1.0, -2.0, -3.0]]])
    b = torch.tensor([[[1.0, 2.0, 0.0, -1.0, -2.0, -3.0]]])
    st = compare_logits(a, b)
    pa, pb = torch.softmax(a.double(), -1), torch.softmax(b.double(), -1)
    assert st.kl == pytest.approx(float((pa * (pa / pb).log()).sum()))
    assert st.top1 == 0 and st.top5 == 1 and st.max_abs == 1
    c = torch.tensor([[[-3.0, -2.0, -1.0, 0.0, 1.0, 2.0]]])
    assert compare_logits(a, c).top5 == pytest.approx(4 / 5)
    h = compare_hidden(0, torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.5]))
    assert h.rel_l2 == pytest.approx(0.1) and h.max_abs == pytest.approx(0.5)
    assert h.cosine == pytest.approx((9 + 18) / (5 * math.hypot(3, 4.5)))


def test_token_helpers():
    t = random_tokens(512, 3, 7, seed=1)
    assert t.shape == (3, 7) and t.min() >= 1 and t.max() <= 511
    assert torch.equal(t, random_tokens(512, 3, 7, seed=1))
    assert parse_tokens("1, 2,3").tolist() == [[1, 2, 3]]
    assert parse_tokens("1,2;3,4").tolist() == [[1, 2], [3, 4]]
    for bad in ("1,x", "1,2;3", ""):
        with pytest.raises(ValueError):
            parse_tokens(bad)


def test_different_models_refused(reader, tmp_path, tokens):
    from grokconv.config import load_preset
    from grokconv.synth import synthesize
    other = open_checkpoint(synthesize(tmp_path / "o", load_preset("tiny", num_layers=2, key_size=8, num_q_heads=32)))
    with pytest.raises(ParityError, match="different models"):
        run_parity(reader, other, tokens, layers="0", device="cpu")


# -- CLI -----------------------------------------------------------------------------------------
def _cli(*args):
    return CliRunner().invoke(main, ["parity", *map(str, args), "--no-progress"])


def test_cli_same_checkpoint(tiny_ckpt, tmp_path):
    out_json, out_npz = tmp_path / "r.json", tmp_path / "l.npz"
    res = _cli(tiny_ckpt, tiny_ckpt, "--batch", 2, "--seq-len", 5, "--device", "cpu", "--json", out_json,
               "--save-logits", out_npz, "--profile")
    assert res.exit_code == 0, res.output
    assert "top-1 agreement: 1.0" in res.output and "KL(A||B): 0 " in res.output and "PASS" in res.output
    assert "peak RSS" in res.output
    rep = json.loads(out_json.read_text())
    assert rep["passed"] is True and rep["kind"] == "exact" and rep["layers"] == [0, 1]
    assert rep["batch"] == 2 and rep["seq_len"] == 5 and len(rep["tokens"]) == 2
    assert [h["layer"] for h in rep["hidden"]] == [0, 1]
    assert set(rep["hidden"][0]) == {"layer", "max_abs", "rel_l2", "cosine"}
    assert rep["logits"] == {"max_abs": 0.0, "kl": 0.0, "top1": 1.0, "top5": 1.0}
    assert rep["profile"]["wall_s"] > 0 and rep["profile"]["peak_rss_bytes"] > 0
    npz = np.load(out_npz)
    assert sorted(npz.files) == ["a", "b"]
    assert npz["a"].shape == npz["b"].shape == (2, 5, 512) and npz["a"].dtype == np.float32
    assert np.array_equal(npz["a"], npz["b"])


def test_cli_threshold_failure_exits_nonzero(tiny_ckpt, numeric_ckpt, tmp_path):
    out_json = tmp_path / "r.json"
    res = _cli(tiny_ckpt, numeric_ckpt, "--tokens", "5,77,301,2,459", "--layers", "all", "--device", "cpu",
               "--json", out_json)
    assert res.exit_code != 0
    assert "FAIL" in res.output and "parity failed" in res.output
    rep = json.loads(out_json.read_text())                    # written before the exit, for diagnosis
    assert rep["passed"] is False and rep["failures"] and rep["tokens"] == [[5, 77, 301, 2, 459]]
    # an explicit override loosens just one limit: the hidden states still fail exact
    res = _cli(tiny_ckpt, numeric_ckpt, "--layers", "all", "--max-abs", 1000, "--max-kl", 1, "--min-top1", 0)
    assert res.exit_code != 0 and "hidden state" in res.output


def test_cli_errors(tiny_ckpt):
    res = _cli(tiny_ckpt, tiny_ckpt, "--text", "hello")
    assert res.exit_code == 2 and "tokenizer.model" in res.output
    res = _cli(tiny_ckpt, tiny_ckpt, "--tokens", "1,2", "--text", "x")
    assert res.exit_code == 2 and "not both" in res.output
    res = _cli(tiny_ckpt, tiny_ckpt, "--tokens", "1,99999")
    assert res.exit_code == 2 and "token ids" in res.output
    res = _cli(tiny_ckpt, tiny_ckpt, "--layers", "40")
    assert res.exit_code == 2 and "out of range" in res.output


def test_cli_text_through_a_sentencepiece_tokenizer(tiny_ckpt, tmp_path):
    """--text encodes with the tokenizer.model beside A (no BOS, as runners.py): a tiny SentencePiece
    BPE model trained here stands in for Grok-1's (which cannot be fetched in CI)."""
    spm = require("sentencepiece")
    import shutil
    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog number {i * 7}" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tok"), vocab_size=64,
                                   model_type="bpe", byte_fallback=False, minloglevel=2)
    shutil.copy(tmp_path / "tok.model", ck / "tokenizer.model")
    text = "the lazy fox jumps"
    ids = spm.SentencePieceProcessor(model_file=str(ck / "tokenizer.model")).encode(text)
    out = tmp_path / "r.json"
    res = CliRunner().invoke(main, ["parity", str(ck), str(tiny_ckpt), "--text", text, "--device", "cpu",
                                    "--json", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["tokens"] == [ids]

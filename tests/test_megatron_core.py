"""Megatron-Core itself loads and runs what ``grokconv to-megatron`` writes (megatron-core 0.16.1, CPU).

Each checkpoint is loaded with ``load_state_dict(strict=True)`` into a Megatron-Core ``GPTModel``
built from the checkpoint's ``args`` with grokconv's Grok-1 spec; TP 2 and EP 2 run as two gloo
processes, each loading its own rank file. The logits are compared with grokconv's reference forward
in float32 on the same weights. Measured on the tiny model (12 layers, 16 tokens incl. padding):
relative L2 1.8e-6 to 2.1e-6, max abs 3e-5 to 4.6e-5 for logits up to 38 (float32 summation order:
fused QKV, baddbmm, Megatron's softmax and routing). The tolerance (rel L2 2e-5, max abs 5e-4) is 10x
that; every deliberate deviation of Grok-1's semantics tried below lands far outside it, and the stock
Megatron-Core spec (without the post-norms) does not load at all.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import require  # noqa: E402

mcore = require("megatron.core", reason="megatron-core is not installed (pip install 'grokconv[megatron]')")

from grokconv.errors import CheckpointFormatError, EngineUnavailableError  # noqa: E402
from grokconv.formats.base import open_checkpoint  # noqa: E402
from grokconv.forward import WRONG_VARIANTS, forward  # noqa: E402
from grokconv.megatron import to_megatron  # noqa: E402

REL_L2, MAX_ABS = 2e-5, 5e-4

# Megatron-LM 0.16.1 megatron/training/arguments.py: argument names that are not TransformerConfig
# fields (those are generated from the dataclass by ArgumentGroupFactory); the last four are
# state Megatron-LM's save_checkpoint keeps in args
MEGATRON_LM_ARGS = {
    "add_position_embedding", "group_query_attention", "make_vocab_size_divisible_by", "max_position_embeddings",
    "num_experts", "num_layers_per_virtual_pipeline_stage", "padded_vocab_size", "position_embedding_type",
    "rotary_base", "rotary_percent", "seq_length", "swiglu", "untie_embeddings_and_output_weights",
    "use_legacy_models", "vocab_size", "use_rotary_position_embeddings",
    "ckpt_format", "iteration", "consumed_train_samples", "consumed_valid_samples", "norm_epsilon",
}


@pytest.fixture(scope="module")
def tokens():
    t = np.random.default_rng(0).integers(1, 512, size=(2, 16))
    t[1, :3] = 0                        # left padding: Grok-1 masks pad keys
    return t


@pytest.fixture(scope="module")
def meg(tiny_ckpt, tmp_path_factory):
    made = {}

    def get(tp=1, pp=1, ep=1, impl="local"):
        key = (tp, pp, ep, impl)
        if key not in made:
            dst = tmp_path_factory.mktemp(f"mcore_tp{tp}_pp{pp}_ep{ep}_{impl}")
            to_megatron(tiny_ckpt, dst, tp=tp, pp=pp, ep=ep, transformer_impl=impl, progress=False)
            made[key] = dst
        return made[key]
    return get


@pytest.fixture(scope="module")
def reference(meg, tokens):
    """grokconv's reference forward, fp32, on the weights the Megatron checkpoint holds (bf16 linears)."""
    return forward(open_checkpoint(meg()), tokens, dtype="fp32").logits.numpy()


def _close(got, want):
    d = got.astype(np.float64) - want
    return float(np.linalg.norm(d) / np.linalg.norm(want)), float(np.abs(d).max())


def _engine(path, tokens, dtype="fp32"):
    from grokconv.engines.megatron_core import logits
    return logits(path, tokens, dtype=dtype)


def test_engine_tp1_equals_reference_and_wrong_semantics_do_not(meg, tokens, tiny_ckpt, reference):
    got = _engine(meg(), tokens)
    assert got.shape == (2, 16, 512) and got.dtype == np.float32
    rel, mx = _close(got, reference)
    assert rel < REL_L2 and mx < MAX_ABS, (rel, mx)
    # the tolerance tells Grok-1 from the near misses this spec exists to avoid (the cap, tanh GELU)
    # (renormalising the top-2 gates is invisible in Grok-1: rms_norm_3 divides the common factor out)
    for name in ("no-logit-cap", "erf-gelu"):
        wrong = forward(open_checkpoint(meg()), tokens, dtype="fp32", semantics=WRONG_VARIANTS[name]).logits.numpy()
        assert _close(got, wrong)[0] > 5 * REL_L2, name      # erf GELU: 3e-4 on this model


@pytest.mark.parametrize("tp,ep", [(2, 1), (1, 2)])
def test_engine_tensor_and_expert_parallel_ranks_load_strictly_and_agree(meg, tokens, reference, tp, ep):
    """Two gloo processes; each loads its own rank file with strict=True (a failure raises) and
    Megatron-Core's own TP / EP communication assembles the logits."""
    rel, mx = _close(_engine(meg(tp=tp, ep=ep), tokens), reference)
    assert rel < REL_L2 and mx < MAX_ABS, (rel, mx)


def test_engine_pipeline_checkpoint_through_the_merged_load(meg, tokens, reference):
    rel, mx = _close(_engine(meg(pp=2), tokens), reference)
    assert rel < REL_L2 and mx < MAX_ABS, (rel, mx)


def test_engine_bf16_runs_close_to_the_bf16_reference(meg, tokens, reference):
    """bf16 is the release precision; Megatron rounds at other points than model.py (the GLU in bf16,
    softmax_scale inside the bf16 matmul, RoPE's cos/sin in bf16), and this random 12-layer model
    amplifies rounding: the reference's own bf16 and fp32 logits differ by 7% (rel L2) here."""
    got = _engine(meg(), tokens, dtype="bf16")
    ref16 = forward(open_checkpoint(meg()), tokens, dtype="bf16").logits.numpy()
    rel16, _ = _close(got, ref16)
    rel32, _ = _close(got, reference)
    assert rel16 < 0.15 and rel32 < 0.15, (rel16, rel32)
    assert (got.argmax(-1) == ref16.argmax(-1)).mean() >= 0.8


def _local_model_and_state(meg, stock: bool):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from grokconv.formats.megatron import load_rank_file
    from grokconv.mcore.model import build_model, transformer_config
    sd = load_rank_file(meg() / "release" / "mp_rank_00" / "model_optim_rng.pt")
    args = sd["args"]
    if not stock:
        return build_model(args, dtype="fp32"), sd["model"]
    config = transformer_config(args, dtype="fp32")
    spec = get_gpt_layer_local_spec(num_experts=args.num_experts, normalization="RMSNorm")
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=args.padded_vocab_size,
                    max_sequence_length=args.max_position_embeddings, share_embeddings_and_output_weights=True,
                    position_embedding_type="rope", rotary_base=int(args.rotary_base)), sd["model"]


def _names(sd) -> set:
    """State-dict names without ``_extra_state``: Megatron-Core's own linears report one (None) and fill it
    in on load when a checkpoint has none (a load pre-hook), so strict loading never needs it stored."""
    return {k for k in sd if not k.endswith("._extra_state")}


def test_our_spec_is_exactly_the_checkpoint_and_the_stock_spec_is_not(meg):
    from grokconv.engines.megatron_core import load_strict
    from grokconv.mcore.model import cpu_stand_ins, model_parallel
    from grokconv.mcore.spec import POST_NORM_KEYS
    with cpu_stand_ins(), model_parallel(1, 1):
        model, state = _local_model_and_state(meg, stock=False)
        assert not any(k.endswith("_extra_state") for k in state)
        assert _names(model.state_dict()) == set(state)
        res = model.load_state_dict(dict(state), strict=True)
        assert res.missing_keys == [] and res.unexpected_keys == []
        stock, state = _local_model_and_state(meg, stock=True)
        want = _names(stock.state_dict())
        # the stock local MoE spec has every other name: only the two post-norms per layer are extra
        assert want - set(state) == set()
        assert set(state) - want == {f"decoder.layers.{i}.{k}" for i in range(12) for k in POST_NORM_KEYS}
        with pytest.raises(RuntimeError, match="Unexpected key"):
            stock.load_state_dict(dict(state), strict=True)
        with pytest.raises(CheckpointFormatError, match="24 unexpected"):
            load_strict(stock, dict(state), "x")


def test_transformer_engine_named_checkpoint(meg, tokens):
    """The TE name of the input norm is written and read back; running it needs Transformer Engine."""
    d = meg(impl="transformer_engine")
    r = open_checkpoint(d)
    assert r.impl == "transformer_engine" and r.problems() == []
    from grokconv.formats.megatron import load_rank_file
    keys = set(load_rank_file(d / "release/mp_rank_00/model_optim_rng.pt")["model"])
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in keys
    assert not any("input_layernorm" in k for k in keys)
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        with pytest.raises(EngineUnavailableError, match="Transformer Engine"):
            _engine(d, tokens)


def test_args_hold_only_megatron_names_and_build_the_config(meg):
    from megatron.core.transformer.transformer_config import TransformerConfig
    from grokconv.formats.megatron import load_rank_file
    from grokconv.mcore.model import transformer_config
    args = vars(load_rank_file(meg(tp=2) / "release/mp_rank_00/model_optim_rng.pt")["args"])
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    foreign = sorted(k for k in args if not k.startswith("grokconv_") and k not in fields and k not in MEGATRON_LM_ARGS)
    assert foreign == []
    for gone in ("sandwich_norm", "attn_logit_softcapping", "post_self_attn_layernorm", "post_mlp_layernorm",
                 "embedding_multiplier_scale", "output_multiplier_scale", "activation"):
        assert gone not in args
    # Megatron-LM's argparse names for the epsilon: norm_epsilon up to core_v0.15, layernorm_epsilon from
    # core_v0.16 (tests/test_megatron_dist.py checks every name against Megatron-LM's arguments.py)
    assert args["norm_epsilon"] == args["layernorm_epsilon"] == 1e-5
    a = load_rank_file(meg(tp=2) / "release/mp_rank_00/model_optim_rng.pt")["args"]
    c = transformer_config(a, dtype="bf16", tp=1)
    assert (c.num_layers, c.hidden_size, c.num_attention_heads, c.num_query_groups, c.kv_channels) == \
        (12, 256, 16, 8, 16)
    assert (c.num_moe_experts, c.moe_router_topk, c.moe_router_pre_softmax, c.moe_router_dtype) == (8, 2, True, "fp32")
    assert c.moe_router_topk_scaling_factor is None and c.gated_linear_unit and c.softmax_scale == 0.25
    assert c.normalization == "RMSNorm" and not c.add_bias_linear and c.params_dtype == torch.bfloat16
    assert a.grokconv_attn_logit_cap == 30.0 and a.grokconv_embedding_multiplier == 16.0
    assert a.transformer_impl == "local" and a.tensor_model_parallel_size == 2

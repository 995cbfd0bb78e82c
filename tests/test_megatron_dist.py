"""``to-megatron --format torch_dist``: one distributed checkpoint of tiny, judged by Megatron-Core itself.

Megatron-Core 0.16.1's ``dist_checkpointing.load`` (strict) loads the one checkpoint into TP1, TP2 with
sequence parallelism, EP2, TP2xEP2 and PP2, each rank a real gloo process whose parameters are NaN
first; every tensor it loaded must equal the legacy writer's rank file of that layout, and the TP1
logits the legacy checkpoint's. Around that: the args Megatron-LM reads (its own argparse names,
carried in tests/data with the commits they come from), the files Megatron-Core expects, the tiling
check, the reader (bit-exact, hostile metadata refused) and the safe-globals fix.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from grokconv.errors import CheckpointFormatError, LayoutError, UnsafePickleError
from grokconv.formats.base import open_checkpoint
from grokconv.megatron import to_megatron

DATA = Path(__file__).parent / "data" / "megatron_lm_arg_names.json"


@pytest.fixture(scope="module")
def dist(tiny_ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    to_megatron(tiny_ckpt, d, fmt="torch_dist", progress=False)
    return d


@pytest.fixture(scope="module")
def legacy(tiny_ckpt, tmp_path_factory):
    made = {}

    def get(tp=1, pp=1, ep=1):
        if (tp, pp, ep) not in made:
            d = tmp_path_factory.mktemp(f"legacy_{tp}{pp}{ep}")
            to_megatron(tiny_ckpt, d, fmt="torch", tp=tp, pp=pp, ep=ep, progress=False)
            made[(tp, pp, ep)] = d
        return made[(tp, pp, ep)]
    return get


def _load(path):
    from grokconv.formats.megatron import load_rank_file
    return load_rank_file(path)


# -- files and args ------------------------------------------------------------------------------------
def test_files_are_what_megatron_core_writes(dist):
    rel = dist / "release"
    assert (dist / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert sorted(p.name for p in rel.iterdir()) == [".metadata", "__0_0.distcp", "common.pt", "metadata.json"]
    assert json.loads((rel / "metadata.json").read_text()) == {
        "sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
        "common_backend_version": 1}
    common = _load(rel / "common.pt")
    assert set(common) == {"args", "checkpoint_version", "iteration", "content_metadata"}
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == 0
    assert common["content_metadata"] == {"singleton_local_shards": False}
    from torch.distributed.checkpoint import FileSystemReader
    md = FileSystemReader(str(rel)).read_metadata()          # torch's own reader takes it
    qkv = md.state_dict_metadata["decoder.layers.self_attention.linear_qkv.weight"]
    assert tuple(qkv.size) == (12, (16 + 2 * 8) * 16, 256)
    # chunks of one query group each (8 = the largest TP tiny allows): any TP reads only what it keeps
    assert len(qkv.chunks) == 12 * 8 and {tuple(c.sizes) for c in qkv.chunks} == {(1, 64, 256)}
    fc1 = md.state_dict_metadata["decoder.layers.mlp.experts.experts.linear_fc1.weight"]
    assert tuple(fc1.size) == (12, 8, 2 * 512, 256) and len(fc1.chunks) == 12 * 8 * 16
    assert "decoder.layers.mlp.experts.experts.linear_fc1._extra_state/shard_3.5_12.8" in md.state_dict_metadata
    assert "decoder.layers.self_attention.linear_qkv._extra_state/shard_3_12" in md.state_dict_metadata


def test_bytes_are_a_function_of_source_and_options(tiny_ckpt, dist, tmp_path):
    to_megatron(tiny_ckpt, tmp_path / "again", fmt="torch_dist", progress=False)
    for name in (".metadata", "__0_0.distcp", "common.pt"):
        assert (tmp_path / "again/release" / name).read_bytes() == (dist / "release" / name).read_bytes(), name
    s = to_megatron(tiny_ckpt, tmp_path / "again", fmt="torch_dist", progress=False)
    assert (s.shards_written, s.shards_skipped) == (0, 1)


def test_args_are_megatron_lm_argparse_names(dist):
    """Every key but grokconv_* is an argparse name of Megatron-LM core_v0.15.2 or core_v0.16.1 (there the
    TransformerConfig fields are generated arguments); the epsilon is under both versions' names."""
    from megatron.core.transformer.transformer_config import TransformerConfig
    data = json.loads(DATA.read_text())
    v15, v16 = (set(data["versions"][v]["names"]) for v in ("core_v0.15.2", "core_v0.16.1"))
    v16 |= {f.name for f in dataclasses.fields(TransformerConfig)}
    # set on args by Megatron-LM itself, not by argparse (core_v0.16.1 arguments.py:742-744 validate_args,
    # checkpointing.py:1370 load_checkpoint)
    state = {"consumed_train_samples", "consumed_valid_samples", "iteration"}
    args = vars(_load(dist / "release/common.pt")["args"])
    foreign = sorted(k for k in args if not k.startswith("grokconv_") and k not in v15 | v16 | state)
    assert foreign == []
    # what core_transformer_config_from_args reads, by name, in each version
    for k in ("norm_epsilon", "num_experts", "moe_router_topk", "num_layers", "hidden_size", "num_attention_heads",
              "num_query_groups", "group_query_attention", "swiglu", "rotary_interleaved"):
        assert k in v15 and k in args, k
    for k in ("layernorm_epsilon", "num_experts", "moe_router_topk", "num_query_groups"):
        assert k in v16 and k in args, k
    assert args["norm_epsilon"] == args["layernorm_epsilon"] == 1e-5
    assert args["ckpt_format"] == "torch_dist" and args["num_experts"] == 8 and args["moe_router_topk"] == 2


def test_legacy_rank_files_carry_the_same_args(dist, legacy):
    a = vars(_load(dist / "release/common.pt")["args"])
    b = vars(_load(legacy() / "release/mp_rank_00/model_optim_rng.pt")["args"])
    assert b["norm_epsilon"] == 1e-5 and b["ckpt_format"] == "torch"
    # the format, and the run's fingerprint (issue 17: it holds the format), are all that differ
    differ = ("ckpt_format", "grokconv_fingerprint")
    assert a["grokconv_fingerprint"] != b["grokconv_fingerprint"]
    assert {k: v for k, v in a.items() if k not in differ} == {k: v for k, v in b.items() if k not in differ}


# -- the safe-globals bug ------------------------------------------------------------------------------
def test_loading_a_rank_file_keeps_safe_globals_others_registered(legacy):
    """torch.serialization.safe_globals' exit removes what it was given even when it was registered
    before: loading a rank file dropped argparse.Namespace, which Megatron-Core registers at import."""
    from torch.serialization import add_safe_globals, get_safe_globals
    add_safe_globals([argparse.Namespace])
    _load(legacy() / "release/mp_rank_00/model_optim_rng.pt")
    assert argparse.Namespace in get_safe_globals()


def test_megatron_loads_common_pt_after_a_rank_file_in_the_same_process(dist, legacy):
    from megatron.core import dist_checkpointing
    _load(legacy() / "release/mp_rank_00/model_optim_rng.pt")
    common = dist_checkpointing.load_common_state_dict(str(dist / "release"))
    assert common["args"].num_layers == 12


# -- the coverage check --------------------------------------------------------------------------------
def test_tiling_check_refuses_gaps_overlaps_and_strays():
    from grokconv.formats.megatron.dist_plan import check_tiling
    whole = [((0, 0), (2, 4)), ((2, 0), (2, 4))]
    check_tiling("t", (4, 4), whole)
    with pytest.raises(LayoutError, match="cover 1 of 2"):
        check_tiling("t", (4, 4), whole[:1])
    with pytest.raises(LayoutError, match="overlap"):
        check_tiling("t", (4, 4), [*whole, ((1, 1), (1, 1))])
    with pytest.raises(LayoutError, match="leaves the global shape"):
        check_tiling("t", (4, 4), [((0, 0), (2, 4)), ((2, 0), (3, 4))])


def test_writer_checks_what_it_recorded(tiny_ckpt, tmp_path, monkeypatch):
    """A chunk lost between plan and file is caught before .metadata / metadata.json are written."""
    import grokconv.formats.megatron.dist_writer as w
    real = w.check_tiling

    def lossy(key, shape, chunks):
        return real(key, shape, chunks[:-1] if key == "decoder.final_layernorm.weight" else chunks)
    monkeypatch.setattr(w, "check_tiling", lossy)
    monkeypatch.setattr("grokconv.formats.megatron.dist_plan.check_tiling", lambda *a: None)
    with pytest.raises(LayoutError, match="final_layernorm"):
        to_megatron(tiny_ckpt, tmp_path / "m", fmt="torch_dist", progress=False)
    assert not (tmp_path / "m/release/metadata.json").exists()
    assert not (tmp_path / "m/latest_checkpointed_iteration.txt").exists()


# -- reading it back -----------------------------------------------------------------------------------
def test_reader_is_bit_exact_and_round_trips_to_safetensors(dist, legacy, tiny_ckpt, tmp_path):
    from grokconv.convert import to_safetensors
    d, o = open_checkpoint(dist), open_checkpoint(tiny_ckpt)
    assert d.format == "megatron" and d.kind == "torch_dist" and d.problems() == []
    assert open_checkpoint(dist / "release").kind == "torch_dist"
    for s in o.specs():
        want, got = o.dense(s.name, "bf16"), d.dense(s.name, "bf16")
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), s.name
    from test_megatron import _hf_bytes      # shards' bytes, less the fingerprint that names the source
    to_safetensors(dist, tmp_path / "a", quantize="none", progress=False)
    to_safetensors(legacy(), tmp_path / "b", quantize="none", progress=False)
    a, b = _hf_bytes(tmp_path / "a"), _hf_bytes(tmp_path / "b")
    assert len(b) > 1 and a == b


def test_to_jax_from_torch_dist_gives_the_release_back(dist, tiny_ckpt, tmp_path):
    from grokconv.jax_export import to_jax
    to_jax(dist, tmp_path / "j", progress=False)
    want = sorted((tiny_ckpt / "ckpt-0").iterdir())
    got = {p.name: p for p in (tmp_path / "j" / "ckpt-0").iterdir()}
    assert len(want) == len(got)
    for p in want:
        assert got[p.name].read_bytes() == p.read_bytes(), p.name


def _copy(dist, tmp_path):
    import shutil
    d = tmp_path / "c"
    shutil.copytree(dist, d)
    return d


def test_hostile_metadata_pickle_is_refused_without_running_it(dist, tmp_path):
    d = _copy(dist, tmp_path)

    class Boom:
        def __reduce__(self):
            return (print, ("ran",))
    (d / "release/.metadata").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(UnsafePickleError, match="builtins.print"):
        open_checkpoint(d)


def test_missing_chunk_and_truncated_data_are_named(dist, tmp_path):
    from grokconv.formats.megatron.dist_reader import load_dist_metadata
    d = _copy(dist, tmp_path)
    meta = load_dist_metadata(d / "release/.metadata")
    m = meta.state_dict_metadata["decoder.layers.pre_mlp_layernorm.weight"]
    m.chunks.pop(5)
    (d / "release/.metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(CheckpointFormatError, match="pre_mlp_layernorm.weight: the chunks cover 11 of 12"):
        open_checkpoint(d)
    d2 = tmp_path / "t"
    import shutil
    shutil.copytree(dist, d2)
    f = d2 / "release/__0_0.distcp"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointFormatError, match="past the end of __0_0.distcp"):
        open_checkpoint(d2)


def test_cli_default_is_torch_dist_and_from_megatron_reads_it(tiny_ckpt, tmp_path):
    from click.testing import CliRunner
    from grokconv.cli import main
    run = CliRunner().invoke
    res = run(main, ["to-megatron", str(tiny_ckpt), str(tmp_path / "m"), "--tp", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m/release/metadata.json").exists() and not list((tmp_path / "m/release").glob("mp_rank_*"))
    assert _load(tmp_path / "m/release/common.pt")["args"].tensor_model_parallel_size == 2
    res = run(main, ["from-megatron", str(tmp_path / "m"), str(tmp_path / "hf"), "--layout", "keyfan", "--no-progress"])
    assert res.exit_code == 0, res.output
    res = run(main, ["inspect", str(tmp_path / "m")])
    assert res.exit_code == 0 and "decoder.layers.mlp.experts.experts.linear_fc1.weight" in res.output, res.output
    res = run(main, ["to-megatron", str(tiny_ckpt), str(tmp_path / "l"), "--format", "torch", "--no-progress"])
    assert res.exit_code == 0 and (tmp_path / "l/release/mp_rank_00/model_optim_rng.pt").exists()


# -- Megatron-Core loads it into any layout ------------------------------------------------------------
LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1), (1, 1, 2)]        # (tp, ep, pp)


@pytest.mark.parametrize("tp,ep,pp", LAYOUTS, ids=["tp1", "tp2-sp", "ep2", "tp2xep2", "pp2"])
def test_megatron_core_loads_one_checkpoint_into_every_layout(dist, legacy, tmp_path, tp, ep, pp):
    """Real gloo processes, one per rank, NaN-poisoned models, dist_checkpointing.load(strict=raise_all);
    each rank's loaded state dict equals the legacy writer's rank file of that layout, tensor by tensor."""
    from grokconv.engines.megatron_core import run_dist_layout
    from grokconv.sharding import checkpoint_dir_name
    run_dist_layout(dist / "release", str(tmp_path), tp=tp, ep=ep, pp=pp, dump=True)
    leg = legacy(tp, pp, ep)
    n = 0
    for t in range(tp):
        for p in range(pp):
            for e in range(ep):
                got = torch.load(tmp_path / f"state_{t}_{p}_{e}.pt", weights_only=True)
                want = _load(leg / "release" / checkpoint_dir_name(t, p, e, pp, ep) / "model_optim_rng.pt")["model"]
                assert set(got) == set(want), (set(got) ^ set(want))
                for k, v in got.items():
                    assert not torch.isnan(v).any(), k
                    assert torch.equal(v, want[k].to(v.dtype)), k
                n += len(got)
    assert n > 0


def test_tp1_logits_equal_the_legacy_checkpoints(dist, legacy):
    from grokconv.engines.megatron_core import logits
    tok = np.random.default_rng(0).integers(1, 512, size=(2, 16))
    tok[1, :3] = 0
    a = logits(dist, tok, dtype="fp32")
    b = logits(legacy(), tok, dtype="fp32")
    assert a.shape == (2, 16, 512) and np.array_equal(a, b)


def test_parity_cli_loads_torch_dist_into_tp2_and_agrees_with_the_reference(trained_ckpt, tmp_path):
    """`grokconv parity --engine megatron-core --tp 2` on a torch_dist export of the trained model: Megatron-Core
    loads it into TP2 (two gloo processes) and its fp32 logits pass the int8-fp32 row against the source."""
    from click.testing import CliRunner
    from grokconv.cli import main
    dst = tmp_path / "mdist"
    res = CliRunner().invoke(main, ["to-megatron", str(trained_ckpt), str(dst), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert (dst / "release" / "metadata.json").is_file()          # torch_dist is the CLI's default
    report = tmp_path / "r.json"
    res = CliRunner().invoke(main, ["parity", str(trained_ckpt), str(dst), "--engine", "megatron-core", "--tp", "2",
                                    "--dtype", "fp32", "--expect", "int8-fp32", "--batch", "2", "--seq-len", "16",
                                    "--no-progress", "--json", str(report)])
    assert res.exit_code == 0, res.output
    logits = json.loads(report.read_text())["logits"]
    # Megatron-Core fp32 on this model at TP1 measured KL 4.6e-6, max abs 0.022 (logits up to ~40): TP2 the same
    assert logits["kl"] < 1e-4 and logits["top1"] == 1.0 and logits["max_abs"] < 0.1, logits
    res = CliRunner().invoke(main, ["parity", str(trained_ckpt), str(trained_ckpt), "--tp", "2"])
    assert res.exit_code != 0 and "--engine megatron-core" in res.output

"""The keyfan export converts with llama.cpp's own ``convert_hf_to_gguf.py`` at any shard size.

The converter (conversion/grok.py, ``modify_tensors``) buffers expert tensors until the next tensor
arrives and asserts that one has a block id; it reads each shard in sorted key order, so a shard whose
experts sort right before ``transformer.in_out_embed.weight`` stopped it. grokconv plans keyfan shards
with the tensors without a layer in a shard of their own, first (``non_layer_shard_first`` in
mappings/keyfan.json). Independent expectation: the GGUF the unchanged converter makes from a
many-shard export holds the same tensors (name, type, shape, bytes) and metadata as the one it makes
from a single shard; and with the rule switched off the converter fails as it did.
"""
import subprocess
import sys

import gguf
import numpy as np
import pytest
from safetensors import safe_open

from grokconv.convert import INDEX_FILE, to_safetensors
from grokconv.mapping import load_layout
from test_gguf import LLAMA_CPP, train_tokenizer

SMALL = "2MB"   # tiny's keyfan export (77 MB) in 40+ shards


@pytest.fixture(scope="module")
def src(tiny_ckpt, tmp_path_factory):
    import shutil
    tmp = tmp_path_factory.mktemp("kfshards")
    d = tmp / "tiny"
    d.mkdir()
    (d / "ckpt-0").symlink_to(tiny_ckpt / "ckpt-0")
    shutil.copy(tiny_ckpt / "grokconv-config.json", d)
    shutil.copy(train_tokenizer(tmp), d / "tokenizer.model")
    return d


def _script():
    script = LLAMA_CPP / "convert_hf_to_gguf.py"
    if not script.is_file():
        pytest.skip(f"llama.cpp's converter not found at {script}: `make llama-cpp-src` takes it from the "
                    "llama-cpp-python sdist on PyPI (or set GROKCONV_LLAMA_CPP_SRC to a llama.cpp checkout)")
    return script


def _convert(exports: dict, tmp) -> dict:
    """Run the converter on each export at once; -> {key: (log, returncode, gguf path)}."""
    script = _script()
    procs = {k: (subprocess.Popen([sys.executable, str(script), str(d), "--outtype", "f32", "--outfile",
                                   str(tmp / f"{k}.gguf")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True), tmp / f"{k}.gguf") for k, d in exports.items()}
    res = {}
    for k, (p, out) in procs.items():
        log = p.communicate(timeout=600)[0]
        res[k] = (log, p.returncode, out)
    return res


def _shards(d) -> list[list[str]]:
    import json
    files = sorted(set(json.loads((d / INDEX_FILE).read_text())["weight_map"].values()))
    out = []
    for f in files:
        with safe_open(d / f, "np") as st:
            out.append(sorted(st.keys()))
    return out


def test_plan_puts_tensors_without_a_layer_first(src, tmp_path):
    many = to_safetensors(src, tmp_path / "kf", layout="keyfan", max_shard_size=SMALL, dry_run=True)
    assert len(many.shards) > 10
    assert sorted(n for n, _, _ in many.shards[0].tensors) == ["transformer.in_out_embed.weight",
                                                               "transformer.rms_norm.weight"]
    assert all(n.startswith("transformer.decoder_layer.") for s in many.shards[1:] for n, _, _ in s.tensors)
    one = to_safetensors(src, tmp_path / "kf1", layout="keyfan", dry_run=True)   # fits one shard: kept whole
    assert len(one.shards) == 1
    hf = to_safetensors(src, tmp_path / "hf", layout="hf", max_shard_size=SMALL, dry_run=True)
    assert "model.embed_tokens.weight" in [n for n, _, _ in hf.shards[0].tensors]   # other layouts: plan order
    assert len(hf.shards) == len(many.shards) - 1


def test_many_shards_convert_to_the_same_gguf_as_one(src, tmp_path, monkeypatch):
    _script()
    exports = {}
    for key, size in (("one", "1GB"), ("many", SMALL)):
        exports[key] = tmp_path / key / "grok"   # same folder name: the converter names the model after it
        to_safetensors(src, exports[key], layout="keyfan", max_shard_size=size, progress=False)
    shards = _shards(exports["many"])
    assert len(shards) > 10 and shards[0] == ["transformer.in_out_embed.weight", "transformer.rms_norm.weight"]
    # the old plan (shards cut in plan order): experts sort right before in_out_embed in the first shard
    lay = load_layout("keyfan")
    monkeypatch.setattr(lay, "non_layer_shard_first", None)
    exports["old"] = tmp_path / "old" / "grok"
    to_safetensors(src, exports["old"], layout="keyfan", max_shard_size=SMALL, progress=False)
    monkeypatch.undo()
    res = _convert(exports, tmp_path)
    for k in ("one", "many"):
        assert res[k][1] == 0, res[k][0][-3000:]
    assert res["old"][1] != 0 and "assert bid is not None" in res["old"][0], res["old"][0][-2000:]
    a, b = gguf.GGUFReader(res["one"][2]), gguf.GGUFReader(res["many"][2])
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert len(ta) == 12 * 12 + 2 and ta.keys() == tb.keys()
    for n in ta:
        assert ta[n].tensor_type == tb[n].tensor_type and list(ta[n].shape) == list(tb[n].shape), n
        assert np.array_equal(ta[n].data, tb[n].data), n

    def fields(r):
        return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert fields(a) == fields(b)

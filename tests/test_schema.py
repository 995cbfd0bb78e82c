"""The positional naming of the 770 files, against the index the original code produced."""
from grokconv.config import GrokConfig, ffn_size, load_preset
from grokconv.schema import files_for_layers, param_specs, parse_layers


def test_real_config_matches_param_index_line_for_line(reference_dir):
    lines = (reference_dir / "grok1-param-index.txt").read_text().splitlines()
    assert lines[0] == "num leaves 770"
    expected = lines[2:772]
    specs = param_specs(load_preset("grok-1"))
    got = [f"{s.file} params/{s.name} {tuple(s.shape)} float32" for s in specs]
    assert got == expected
    total = int(lines[772].split()[-1])
    import math
    assert sum(math.prod(s.shape) for s in specs) == total


def test_layer_start_files_are_lexicographic():
    specs = param_specs(load_preset("grok-1"))
    first = {}
    for s in specs:
        if s.layer is not None:
            first.setdefault(s.layer, s.index)
    # grok1-checkpoint.md 1.2: layer 0 -> 2, 1 -> 14, 10 -> 26, 2 -> 146, 63 -> 722, 9 -> 758
    assert [first[x] for x in (0, 1, 10, 2, 63, 9)] == [2, 14, 26, 146, 722, 758]
    order = sorted(first, key=first.get)
    assert order == sorted(range(64), key=str)


def test_any_layer_count_and_slot_order():
    cfg = load_preset("tiny").replace(num_layers=12)
    specs = param_specs(cfg)
    assert len(specs) == 2 + 12 * 12
    layers = [s.layer for s in specs[2::12]]
    assert layers == [0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9]
    slots = [s.slot for s in specs[2:14]]
    assert slots == ["moe/linear", "moe/linear_1", "moe/linear_v", "multi_head_attention/key",
                     "multi_head_attention/linear", "multi_head_attention/query", "multi_head_attention/value",
                     "rms_norm", "rms_norm_1", "rms_norm_2", "rms_norm_3", "router"]
    g = {s.slot: s.scale_groups for s in specs if s.layer == 0}
    assert g["multi_head_attention/linear"] == 8 and g["moe/linear_1"] == 8 and g["moe/linear"] == 1


def test_ffn_size_derivation_and_slices():
    assert ffn_size(6144, 8) == 32768
    assert ffn_size(100, 1) == 72  # int(100)*2//3 = 66 -> rounded up to a multiple of 8
    cfg = GrokConfig()
    files = files_for_layers(cfg, parse_layers("0-1,63", 64))
    assert len(files) == 2 + 3 * 12
    assert {f.file for f in files if f.layer == 63} == {f"tensor{i:05d}_000" for i in range(722, 734)}
    import pytest
    with pytest.raises(ValueError, match="out of range"):
        parse_layers("64", 64)

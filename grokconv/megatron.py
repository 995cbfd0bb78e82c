"""``grokconv.megatron``: the Megatron-LM writer's public names (the code lives in
``grokconv/formats/megatron/``, one module per concern)."""
from __future__ import annotations

from .formats.megatron.driver import FORMATS, to_megatron
from .formats.megatron.layout import (DEFAULT_IMPL, IMPLS, DirectMapping, GatedMLPMapping, MegatronLayout,
                                      QKVMapping, TensorMapping, VocabMapping, load_megatron_layout, read_block)
from .formats.megatron.legacy_writer import build_rank
from .formats.megatron.plan import (CHECKPOINT_VERSION, RANK_FILE, RELEASE_DIR, TRACKER_FILE, MegatronPlan,
                                    RankPlan, megatron_args, plan_megatron)

__all__ = ["MegatronLayout", "load_megatron_layout", "TensorMapping", "DirectMapping", "VocabMapping",
           "QKVMapping", "GatedMLPMapping", "RankPlan", "MegatronPlan", "plan_megatron", "megatron_args",
           "to_megatron", "read_block", "build_rank", "IMPLS", "DEFAULT_IMPL", "TRACKER_FILE", "RANK_FILE",
           "RELEASE_DIR", "CHECKPOINT_VERSION", "FORMATS"]

"""Grok-1 for Megatron-Core (the optional extra ``grokconv[megatron]``).

``spec.py`` is the layer spec: what stock Megatron-Core lacks for Grok-1 (two post-norms, a
30·tanh(x/30) attention-logit cap, tanh-GELU experts), built from Megatron-Core's own modules so that
every ``grokconv to-megatron`` output loads with ``strict=True``. ``model.py`` turns a checkpoint's
``args`` into a ``TransformerConfig`` and a ``GPTModel`` with Grok-1's embedding and output multipliers,
and holds the few stand-ins Megatron-Core needs to run on a CPU. Nothing here is imported unless
megatron-core is installed and asked for.
"""

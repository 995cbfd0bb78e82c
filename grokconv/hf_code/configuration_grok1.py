"""Grok-1 configuration for transformers (``trust_remote_code``), shipped by grokconv with every
Hugging Face style export (layouts ``hf``, ``keyfan``, ``sglang``) and named in config.json's
``auto_map``.

The fields are the export's config.json, kept as they are: engines that read this config (vLLM's and
SGLang's Grok loaders call ``AutoConfig`` first) find every key they look for. The tensor names are not
in it: ``modeling_grok1.py`` has the ``hf`` layout's written in its module tree and renames the others.

Written for transformers 4.x and 5.x (an explicit ``__init__``, which both accept).
"""
from transformers import PretrainedConfig


class Grok1Config(PretrainedConfig):
    model_type = "grok-1"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=131072,
        hidden_size=6144,
        intermediate_size=32768,
        num_hidden_layers=64,
        num_attention_heads=48,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=8192,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        attn_output_multiplier=0.08838834764831845,
        embedding_multiplier_scale=78.38367176906169,
        output_multiplier_scale=0.5773502691896257,
        max_attn_value=30.0,
        num_experts=8,
        num_experts_per_tok=2,
        hidden_act="gelu_pytorch_tanh",
        router_logit_softcapping=0.0,
        moe_router_renormalize=False,
        use_cache=True,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.attn_output_multiplier = attn_output_multiplier
        self.embedding_multiplier_scale = embedding_multiplier_scale
        self.output_multiplier_scale = output_multiplier_scale
        self.max_attn_value = max_attn_value
        # the keyfan and sglang configs call the expert count num_local_experts
        self.num_experts = kwargs.pop("num_local_experts", num_experts)
        self.num_local_experts = self.num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.hidden_act = hidden_act
        self.router_logit_softcapping = router_logit_softcapping
        self.moe_router_renormalize = moe_router_renormalize
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, pad_token_id=pad_token_id,
                         bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)


class GrokConfig(Grok1Config):
    """The same configuration under the model type of the ``keyfan`` layout's config.json (``grok``)."""
    model_type = "grok"

    def __init__(self, **kwargs):   # explicit: transformers 5 wraps subclasses without an __init__ of their own
        super().__init__(**kwargs)

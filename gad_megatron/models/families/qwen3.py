"""Qwen3 (dense): the Llama layout plus per-head RMSNorm on queries and keys (QK layernorm)."""

from gad_megatron.models.mapping import ArchMapping, Rule
from gad_megatron.models.families.llama import EMBEDDING_RULES, LAYER_RULES, L

QK_NORM = (
    Rule("decoder.layers.self_attention.q_layernorm.weight", (L + "self_attn.q_norm.weight",), (("head_dim",),)),
    Rule("decoder.layers.self_attention.k_layernorm.weight", (L + "self_attn.k_norm.weight",), (("head_dim",),)),
)

MAPPING = ArchMapping(
    model_type="qwen3",
    causal_lm_class="Qwen3ForCausalLM",
    seq_cls_class="Qwen3ForSequenceClassification",
    qkv_bias=False,
    qk_layernorm=True,
    rules=EMBEDDING_RULES + LAYER_RULES + QK_NORM,
)

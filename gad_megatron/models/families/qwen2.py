"""Qwen2 / Qwen2.5: the Llama layout plus biases on q, k, v (fused into megatron's linear_qkv.bias)."""

from gad_megatron.models.mapping import ArchMapping, Rule
from gad_megatron.models.families.llama import EMBEDDING_RULES, LAYER_RULES, L

QKV_BIAS = Rule(
    "decoder.layers.self_attention.linear_qkv.bias",
    (L + "self_attn.q_proj.bias", L + "self_attn.k_proj.bias", L + "self_attn.v_proj.bias"),
    (("q_dim",), ("kv_dim",), ("kv_dim",)),
    kind="qkv",
)

MAPPING = ArchMapping(
    model_type="qwen2",
    causal_lm_class="Qwen2ForCausalLM",
    seq_cls_class="Qwen2ForSequenceClassification",
    qkv_bias=True,
    qk_layernorm=False,
    rules=EMBEDDING_RULES + LAYER_RULES + (QKV_BIAS,),
    head_dim_from_hidden=True,
)

"""Mistral (no sliding window): the Llama layout under its own class names."""

from gad_megatron.convert.mapping import ArchMapping
from gad_megatron.convert.mappings.llama import EMBEDDING_RULES, LAYER_RULES

MAPPING = ArchMapping(
    model_type="mistral",
    causal_lm_class="MistralForCausalLM",
    seq_cls_class="MistralForSequenceClassification",
    qkv_bias=False,
    qk_layernorm=False,
    rules=EMBEDDING_RULES + LAYER_RULES,
)

"""Mistral (no sliding window): the Llama layout under its own class names; a sliding window is refused."""

from gad_megatron.models.mapping import ArchMapping
from gad_megatron.models.families.llama import EMBEDDING_RULES, LAYER_RULES



def check_config(cfg: dict, bad) -> None:
    if cfg.get("sliding_window") not in (None, 0):
        # Mistral v0.1 used a 4096 window; later Mistral models set null. A window silently dropped is wrong
        # for sequences longer than it, so we refuse instead of guessing.
        bad("sliding_window", cfg.get("sliding_window"), "sliding-window attention is not implemented")


MAPPING = ArchMapping(
    model_type="mistral",
    causal_lm_class="MistralForCausalLM",
    seq_cls_class="MistralForSequenceClassification",
    qkv_bias=False,
    qk_layernorm=False,
    rules=EMBEDDING_RULES + LAYER_RULES,
    check_config=check_config,
)

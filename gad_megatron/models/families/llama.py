"""Llama 3 / 3.1 / 3.2 (tied embeddings in 3.2). The other Llama-layout architectures extend these rules."""

from gad_megatron.models.mapping import ArchMapping, Rule
from gad_megatron.models.roles import D_ROLE

L = "model.layers.{i}."

EMBEDDING_RULES = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), (("vocab", "hidden"),)),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), (("hidden",),)),
    Rule("output_layer.weight", ("lm_head.weight",), (("vocab", "hidden"),), when="untied"),
    # The discriminator's scalar head, exported as *ForSequenceClassification (num_labels=1).
    Rule("output_layer.weight", ("score.weight",), (("one", "hidden"),), when=D_ROLE),
)

LAYER_RULES = (
    Rule("decoder.layers.self_attention.linear_qkv.layer_norm_weight", (L + "input_layernorm.weight",), (("hidden",),)),
    Rule(
        "decoder.layers.self_attention.linear_qkv.weight",
        (L + "self_attn.q_proj.weight", L + "self_attn.k_proj.weight", L + "self_attn.v_proj.weight"),
        (("q_dim", "hidden"), ("kv_dim", "hidden"), ("kv_dim", "hidden")),
        kind="qkv",
    ),
    Rule("decoder.layers.self_attention.linear_proj.weight", (L + "self_attn.o_proj.weight",), (("hidden", "q_dim"),)),
    Rule("decoder.layers.mlp.linear_fc1.layer_norm_weight", (L + "post_attention_layernorm.weight",), (("hidden",),)),
    Rule(
        "decoder.layers.mlp.linear_fc1.weight",
        (L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"),
        (("ffn", "hidden"), ("ffn", "hidden")),
        kind="gate_up",
    ),
    Rule("decoder.layers.mlp.linear_fc2.weight", (L + "mlp.down_proj.weight",), (("hidden", "ffn"),)),
)

MAPPING = ArchMapping(
    model_type="llama",
    causal_lm_class="LlamaForCausalLM",
    seq_cls_class="LlamaForSequenceClassification",
    qkv_bias=False,
    qk_layernorm=False,
    rules=EMBEDDING_RULES + LAYER_RULES,
)

"""Parameters per rank, exactly as megatron shards them (names, sizes and registration order)."""

from __future__ import annotations

from gad_megatron.models.roles import D_ROLE
# ---- parameters, exactly as megatron shards them --------------------------------------------------------------
def param_list(arch, tp: int, pp: int, stage: int, role: str = "student") -> list:
    """(name, numel, shared_embedding) of one rank of pipeline ``stage`` (any TP rank: the splits are even), in
    the order megatron's GPTModel (local spec) registers them -- the order its DDP grad buffer is laid out in.
    TP splits QKV / proj / fc1 / fc2 / the vocabulary; norms are replicated; the embedding lives on the first
    stage, the output layer on the last (a tied one is a copy there when pp > 1, flagged ``shared_embedding``);
    the discriminator's scalar head (1 x h, its input dimension split over TP) replaces the vocabulary
    projection."""
    h, f, q, kv = arch.hidden_size, arch.ffn_hidden_size, arch.num_attention_heads * arch.kv_channels, \
        arch.num_query_groups * arch.kv_channels
    student = role != D_ROLE
    tied_copy = student and arch.tie_word_embeddings and pp > 1
    out = []
    if stage == 0:
        out.append(("embedding.word_embeddings.weight", arch.vocab_size // tp * h, tied_copy))
    for i in range(arch.num_layers // pp):
        pre = f"decoder.layers.{i}."
        out.append((pre + "input_layernorm.weight", h, False))
        out.append((pre + "self_attention.linear_proj.weight", q * h // tp, False))
        out.append((pre + "self_attention.linear_qkv.weight", h * (q + 2 * kv) // tp, False))
        if arch.qkv_bias:
            out.append((pre + "self_attention.linear_qkv.bias", (q + 2 * kv) // tp, False))
        if arch.qk_layernorm:
            out += [(pre + "self_attention.q_layernorm.weight", arch.kv_channels, False),
                    (pre + "self_attention.k_layernorm.weight", arch.kv_channels, False)]
        out.append((pre + "pre_mlp_layernorm.weight", h, False))
        out.append((pre + "mlp.linear_fc1.weight", h * 2 * f // tp, False))  # gate + up
        out.append((pre + "mlp.linear_fc2.weight", f * h // tp, False))
    if stage == pp - 1:
        out.append(("decoder.final_layernorm.weight", h, False))
        if not student:
            out.append(("output_layer.weight", h // tp, False))
        elif not arch.tie_word_embeddings or pp > 1:
            out.append(("output_layer.weight", arch.vocab_size // tp * h, tied_copy))
    return out


def rank_params(arch, tp: int, pp: int, stage: int, role: str = "student") -> int:
    """Parameters one rank of pipeline ``stage`` holds."""
    return sum(n for _, n, _ in param_list(arch, tp, pp, stage, role))


def total_params(arch, role: str = "student") -> int:
    return rank_params(arch, 1, 1, 0, role)



"""CPU attention for megatron-core's local spec: torch's fused ``scaled_dot_product_attention`` as the core
attention, and static-batch decoding with keys cached after RoPE.

Without Transformer Engine, megatron's local ``DotProductAttention`` copies K and V to every query head
(``repeat_interleave`` for grouped-query attention), materialises the [b, heads, sq, sk] scores through the
global memory buffer, masks and softmaxes them in separate ops, then multiplies by V. torch's fused kernel does
the same arithmetic in one call and reads the grouped K / V as they are (``enable_gqa``): on SmolLM2 (9 query /
3 KV heads) a decode step's attention is ~5x faster, and the training forward / backward keeps no score tensor.

The case it takes is the one our models use: vanilla softmax, no attention dropout while training, no
query-key layer scaling, no sliding window. Anything else goes to megatron's own forward unchanged. Packed
sequences (THD, megatron's ``PackedSeqParams``), which megatron's local attention refuses, run as one row under
a block-diagonal causal mask. The mask
semantics are megatron's: a boolean mask marks the positions to drop and they get -10000 (not -inf), so a
query row whose keys are all masked (a left-padded prompt's pad positions) stays finite as in megatron; with no
mask, the scores are causal when sq > 1 (sq == sk) and unmasked for a one-token decode step.

Decoding (``RopeCachedSelfAttention``): megatron's static KV path caches keys *before* RoPE and re-applies RoPE
to the whole cached prefix at every step (~11 % of a SmolLM2 decode step on CPU). Its flash-decode path instead
stores keys with RoPE applied; this does the same for the unfused path: each step rotates only its new keys at
their cache slots, writes them, and hands the forward no key embedding (``k_pos_emb`` None: the forward then
rotates the query alone). The cache slot is the position (as in megatron's static path).
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import _yarn_get_concentration_factor_from_config
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

_MASKED = -10000.0  # megatron's attention_mask_func fills masked scores with this


class SDPADotProductAttention(DotProductAttention):
    def _fused_ok(self, attention_bias) -> bool:
        c = self.config
        return (attention_bias is None and self.softmax_offset is None
                and not c.apply_query_key_layer_scaling and self.scale_mask_softmax.window_size is None
                and not (self.training and self.attention_dropout.p > 0))

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        packed = packed_seq_params is not None
        if packed and (packed_seq_params.qkv_format != "thd" or not self._fused_ok(attention_bias)):
            raise ValueError("packed sequences (train.packed_sequences) on the local spec need plain causal softmax "
                             "attention in THD (no bias, window, dropout or query-key layer scaling): turn them off")
        if packed:
            return self._packed_forward(query, key, value, packed_seq_params)
        if not self._fused_ok(attention_bias):
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params)
        sq, b = query.size(0), query.size(1)
        # [s, b, heads, hn] -> [b, heads, s, hn]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        causal, mask = False, None
        if attention_mask is not None:
            mask = torch.zeros(attention_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(attention_mask, _MASKED)
        elif self.attn_mask_type == AttnMaskType.causal and sq > 1:
            causal = True  # top-left aligned: sq == sk here, as megatron asserts
        context = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=self.softmax_scale,
            enable_gqa=self.num_attention_heads_per_partition != self.num_query_groups_per_partition)
        # [b, heads, sq, hn] -> [sq, b, heads * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    def _packed_forward(self, query, key, value, packed_seq_params):
        """THD: ``[t, heads, hn]`` holding several sequences back to back (bounds ``cu_seqlens_q``); a token sees
        the tokens before it in its own sequence only: a block-diagonal causal mask (TE's kernels do this from
        the bounds without a [t, t] mask; the local spec has none that does)."""
        t = query.size(0)
        cu = packed_seq_params.cu_seqlens_q.to(query.device).long()
        segment = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=query.device), cu[1:] - cu[:-1])
        if segment.numel() != t:
            raise ValueError(f"cu_seqlens cover {segment.numel()} tokens of a {t}-token packed micro-batch")
        pos = torch.arange(t, device=query.device)
        allowed = (segment[:, None] == segment[None, :]) & (pos[None, :] <= pos[:, None])
        q, k, v = (x.permute(1, 0, 2).unsqueeze(0) for x in (query, key, value))  # [1, heads, t, hn]
        context = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, scale=self.softmax_scale,
            enable_gqa=self.num_attention_heads_per_partition != self.num_query_groups_per_partition)
        return context[0].permute(1, 0, 2).reshape(t, self.hidden_size_per_partition)  # [t, heads * hn]


class RopeCachedSelfAttention(SelfAttention):
    def _adjust_key_value_for_inference(self, inference_context, query, key, value, rotary_pos_emb, *args, **kwargs):
        ctx = inference_context if inference_context is not None else kwargs.get("inference_params")
        if (ctx is None or not ctx.is_static_batching() or self.config.flash_decode or rotary_pos_emb is None
                or rotary_pos_emb[1] is None):
            return super()._adjust_key_value_for_inference(inference_context, query, key, value, rotary_pos_emb,
                                                           *args, **kwargs)
        start = ctx.sequence_len_offset
        k_pos_emb = rotary_pos_emb[1][start:start + key.size(0)]
        key = apply_rotary_pos_emb(key, k_pos_emb, config=self.config,
                                   mscale=_yarn_get_concentration_factor_from_config(self.config),
                                   cp_group=self.pg_collection.cp)
        query, key, value, (q_pos_emb, _), mask_type, block_table = super()._adjust_key_value_for_inference(
            inference_context, query, key, value, rotary_pos_emb, *args, **kwargs)
        return query, key, value, (q_pos_emb, None), mask_type, block_table

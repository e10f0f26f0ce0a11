"""Token sampling on the device, batched, with one seed per sample (vLLM's per-request ``seed``).

Sampling is the Gumbel-max race: ``argmax(processed_logits + g)`` with ``g = -log(-log(u))`` draws exactly from
``softmax(processed_logits)``. ``u`` comes from a counter-based hash of (sample seed, decode step, token id)
rather than a stateful generator, so a sample's tokens depend only on its own seed and logits: not on which
batch it was decoded in, on the batch order, on the device, or on the TP / PP layout. All ops are elementwise
int64 / float32 torch ops on the logits' device (no host round trip, no per-row loop).
"""

from __future__ import annotations

from typing import Optional

import torch

from gad_megatron.rollout.base import SamplingConfig

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) on int64 tensors holding values < 2**32. Products may wrap in
    int64; only their low 32 bits are kept, which two's-complement wrapping leaves exact."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def sample_seeds(seed: Optional[int], prompt_index: torch.Tensor, sample_index: torch.Tensor) -> torch.Tensor:
    """One 32-bit seed per sample from the request seed, its prompt's index in the call and its index in the
    prompt's group."""
    base = _mix32(torch.tensor(int(seed or 0) + 0x9E3779B9, dtype=torch.long))
    return _mix32(base ^ _mix32(prompt_index.long() * 0x85EBCA6B + sample_index.long() * 0xC2B2AE35 + 1))


def uniforms(seeds: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[b, vocab]`` uniforms in (0, 1) for decode ``step`` (per row) of the samples with ``seeds``."""
    row = _mix32(seeds.long() ^ _mix32(step.long() * 0x27D4EB2F + 0x165667B1))
    col = _mix32(torch.arange(vocab, device=seeds.device, dtype=torch.long) + 0x61C88647)
    bits = _mix32(row.unsqueeze(1) ^ col.unsqueeze(0)) >> 8  # 24 bits: exact in float32
    return (bits.float() + 0.5) * (1.0 / (1 << 24))


def processed_logits(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """fp32 logits / temperature with vLLM's top-k then top-p filtering (filtered tokens at -inf)."""
    x = logits.float() / sampling.temperature
    if sampling.top_k and sampling.top_k > 0 and sampling.top_k < x.shape[-1]:
        kth = torch.topk(x, sampling.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_x, idx = torch.sort(x, descending=True, dim=-1)
        probs = sorted_x.softmax(-1)
        drop = probs.cumsum(-1) - probs > sampling.top_p  # keep the smallest prefix whose mass reaches top_p
        x = x.scatter(-1, idx, sorted_x.masked_fill(drop, float("-inf")))
    return x


def sample_tokens(logits: torch.Tensor, sampling: SamplingConfig, seeds: torch.Tensor, step: torch.Tensor):
    """Next token and its logprob per row of ``[b, V]`` logits.

    The logprob is that of the sampling temperature's distribution over the whole vocabulary,
    ``log_softmax(logits / T)`` (vLLM's ``processed_logprobs`` before top-k / top-p, and what the trainer
    recomputes); greedy (T = 0) reports ``log_softmax(logits)``."""
    raw = logits.float()
    if sampling.temperature == 0.0:
        tokens = raw.argmax(-1)
        return tokens, torch.log_softmax(raw, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    x = processed_logits(raw, sampling)
    gumbel = -torch.log(-torch.log(uniforms(seeds, step, x.shape[-1])))
    tokens = (x + gumbel).argmax(-1)
    logprobs = torch.log_softmax(raw / sampling.temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens, logprobs

"""Token sampling on the device, batched, with one seed per sample (vLLM's per-request ``seed``).

Sampling inverts the CDF of ``softmax(processed_logits)`` at one uniform per row. The uniform comes from a
counter-based hash of (sample seed, decode step) rather than a stateful generator, so a sample's tokens depend
only on its own seed and logits: not on which batch it was decoded in, the batch order, the device, or the TP /
PP layout. Everything runs as batched torch ops on the logits' device (no host round trip, no per-row loop);
the cost is a softmax, a cumulative sum and a binary search per row (a vocabulary-wide hash per step, the
Gumbel-max race, costs ~5x this on a CPU with a 152k vocabulary).
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


def row_uniforms(seeds: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """One float64 uniform in (0, 1) per row for decode ``step`` (per row) of the samples with ``seeds``."""
    bits = _mix32(_mix32(seeds.long() ^ _mix32(step.long() * 0x27D4EB2F + 0x165667B1)) + 0x61C88647)
    return (bits.double() + 0.5) * (1.0 / (1 << 32))


def _filter(x: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    if sampling.top_k and sampling.top_k > 0 and sampling.top_k < x.shape[-1]:
        kth = torch.topk(x, sampling.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_x, idx = torch.sort(x, descending=True, dim=-1)
        probs = sorted_x.softmax(-1)
        drop = probs.cumsum(-1) - probs > sampling.top_p  # keep the smallest prefix whose mass reaches top_p
        x = x.scatter(-1, idx, sorted_x.masked_fill(drop, float("-inf")))
    return x


def processed_logits(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """fp32 logits / temperature with vLLM's top-k then top-p filtering (filtered tokens at -inf)."""
    return _filter(logits.float() / sampling.temperature, sampling)


def sample_tokens(logits: torch.Tensor, sampling: SamplingConfig, seeds: torch.Tensor, step: torch.Tensor):
    """Next token and its logprob per row of ``[b, V]`` logits.

    The logprob is that of the sampling temperature's distribution over the whole vocabulary,
    ``log_softmax(logits / T)`` (vLLM's ``processed_logprobs`` before top-k / top-p, and what the trainer
    recomputes); greedy (T = 0) reports ``log_softmax(logits)``."""
    raw = logits.float()
    if sampling.temperature == 0.0:
        tokens = raw.argmax(-1)
        return tokens, raw.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(raw, -1)
    scaled = raw / sampling.temperature
    cdf = _filter(scaled, sampling).softmax(-1).double().cumsum(-1)  # float64: exact enough over any vocabulary
    target = (row_uniforms(seeds, step) * cdf[:, -1]).unsqueeze(-1)
    # The first token whose cumulative probability exceeds the target; a filtered token (probability 0) adds
    # nothing to the sum and is never the first to exceed it.
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)
    logprobs = scaled.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scaled, -1)
    return tokens, logprobs

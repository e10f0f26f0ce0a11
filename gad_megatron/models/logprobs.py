"""Token log-probabilities and entropy from vocab-parallel logits, never gathering the vocabulary.

Each tensor-parallel rank holds logits ``[b, s, V/TP]`` for its slice of the vocabulary. Logprobs use
megatron-core's ``vocab_parallel_cross_entropy`` (max / sum-exp / target-logit all-reduces inside, with its
own backward); entropy uses the same three all-reduces under no_grad (it is logged, its coefficient is 0).
Both score the *sampling* distribution: logits are divided by the temperature the rollout sampled with, so
they compare with vLLM's processed logprobs.
"""

from __future__ import annotations

import torch


def _tp_group():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group() if ps.model_parallel_is_initialized() else None


def vocab_parallel_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(logits / T)[target]`` per position: ``[b, s, V/TP]`` x ``[b, s]`` -> ``[b, s]`` (fp32).

    Differentiable (megatron's fused vocab-parallel cross-entropy). Works at TP=1 too.
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: logprobs need a sampling temperature > 0")
    # A new fp32 tensor: megatron's cross-entropy subtracts the max in place.
    scaled = logits.float() / temperature
    return -vocab_parallel_cross_entropy(scaled, targets.to(logits.device))


def vocab_parallel_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of ``softmax(logits / T)`` per position from vocab-parallel logits: ``[b, s]`` (fp32).

    Differentiable: the partial sums are all-reduced with megatron's reduce-from-TP-region (all-reduce
    forward, identity backward), right because every TP rank then computes the same loss from the reduced
    sums. Call it under ``torch.no_grad()`` when only logging it.
    """
    import torch.distributed as dist
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    group = _tp_group()
    distributed = group is not None and dist.get_world_size(group) > 1
    x = logits.float() / temperature
    m = x.detach().max(dim=-1).values  # a constant shift: H does not depend on it
    if distributed:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    e = torch.exp(x - m.unsqueeze(-1))
    s, ex = e.sum(dim=-1), (e * x).sum(dim=-1)
    if distributed:
        s, ex = reduce_from_tensor_model_parallel_region(s), reduce_from_tensor_model_parallel_region(ex)
    # H = log Z - E_p[x] with Z = sum exp(x) = s * exp(m)
    return torch.log(s) + m - ex / s

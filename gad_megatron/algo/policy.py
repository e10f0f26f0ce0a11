"""GRPO / PPO math for the generator, as small pure functions on ``[b, t]`` token tensors.

Shapes: every per-token tensor is ``[rows, tokens]`` aligned with a ``mask`` (1 = a response token that
counts, 0 = prompt or padding). Per-sequence tensors are ``[rows]``. Nothing here talks to a process group:
the caller owns normalisation across micro-batches and data-parallel ranks (see :func:`aggregate`).
"""

from __future__ import annotations

from typing import Optional

import torch

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean")
ADV_STD_MODES = ("group", "batch", "none")


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6, scale: bool = True,
                    std_mode: str = "group", std_floor: float = 0.0) -> torch.Tensor:
    """GRPO's advantage per sample: ``(r - mean_g) / (max(std, std_floor) + eps)``.

    ``rewards`` is ``[groups * group_size]``, grouped by prompt (sample ``j`` of prompt ``i`` at
    ``i * group_size + j``); the mean is always the group's. ``std_mode``: ``group`` (the paper / verl: the
    group's unbiased std), ``batch`` (one std over all rewards of the batch, so a group whose rewards barely
    differ keeps small advantages), ``none`` (centred only; ``scale=False`` is the same). ``std_floor``: a
    spread below it divides by the floor instead, so noise between near-equal rewards is not blown up to +-1.
    A group of equal rewards gets advantage exactly 0 (and no NaN, also for ``group_size == 1``).
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards: expected [groups * {group_size}], got shape {tuple(rewards.shape)}")
    if std_mode not in ADV_STD_MODES:
        raise ValueError(f"std_mode={std_mode!r}: use one of {ADV_STD_MODES}")
    r = rewards.double().view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if not scale or std_mode == "none":
        return centred.view(-1).to(rewards.dtype)
    if std_mode == "batch":
        std = (r.reshape(-1).std(unbiased=True) if r.numel() > 1 else torch.zeros((), dtype=r.dtype)).expand(r.shape[0], 1)
    else:
        std = r.std(dim=1, keepdim=True, unbiased=True) if group_size > 1 else torch.zeros_like(r[:, :1])
    # A group whose rewards are all equal carries no signal: exactly 0 (also with eps=0, where 0/0 is NaN).
    flat = (centred == 0).all(dim=1, keepdim=True)
    adv = torch.where(flat | (std <= 0), torch.zeros_like(centred), centred / (std.clamp(min=std_floor) + eps))
    return adv.view(-1).to(rewards.dtype)


def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_ratio: float = 0.2,
                  clip_ratio_high: float | None = None, dual_clip: float | None = None):
    """PPO's clipped surrogate per token (to be minimised), and which tokens the clip bound.

    ``loss = max(-A * r, -A * clip(r, 1 - eps_lo, 1 + eps_hi))`` with ``r = exp(logp - old_logp)``;
    with ``dual_clip = c > 1`` the loss of negative-advantage tokens is also capped at ``-A * c`` (Ye et al.
    2020). ``advantages`` broadcasts (``[b, 1]`` for per-sequence advantages). Returns (loss, clipped) where
    ``clipped`` is a float 0/1 tensor marking tokens whose gradient the clip removed.
    """
    hi = clip_ratio if clip_ratio_high is None else clip_ratio_high
    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)  # exp overflow guard; far beyond any clip bound
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped_obj = -advantages * ratio.clamp(1.0 - clip_ratio, 1.0 + hi)
    loss = torch.maximum(unclipped, clipped_obj)
    was_clipped = (clipped_obj > unclipped).float()
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip={dual_clip}: must be > 1")
        cap = -advantages * dual_clip
        neg = (advantages < 0).expand_as(loss)
        dual_hit = neg & (loss > cap)
        loss = torch.where(neg, torch.minimum(loss, cap), loss)
        was_clipped = torch.where(dual_hit, torch.ones_like(was_clipped), was_clipped)
    return loss, was_clipped


def low_var_kl(logp: torch.Tensor, ref_logp: torch.Tensor, clamp: float = 10.0) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per token, ``exp(ref - logp) - (ref - logp) - 1``, clamped to
    ``[-clamp, clamp]`` (verl's ``low_var_kl``). Non-negative and 0 where the two logprobs agree."""
    d = (ref_logp - logp).clamp(-20.0, 20.0)
    return (torch.exp(d) - d - 1.0).clamp(-clamp, clamp)


def tis_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float = 2.0):
    """Truncated importance sampling on the trainer/rollout mismatch (Yao et al. 2025): per-token weight
    ``min(exp(old_logp - rollout_logp), cap)``, no gradient. Returns (weights, capped) with ``capped`` 0/1
    marking tokens the cap cut."""
    w = torch.exp((old_logp - rollout_logp).clamp(-20.0, 20.0)).detach()
    return w.clamp(max=cap), (w > cap).float()


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
              seq_index: Optional[torch.Tensor] = None):
    """(sum, count) whose global ratio is the loss: callers add sums and counts over micro-batches and DP
    ranks and divide once, so the optimised loss is the logged loss whatever the micro-batching.

    - ``token-mean``: sum over valid tokens / number of valid tokens.
    - ``seq-mean-token-mean``: each sequence's own token mean, averaged over sequences (rows with no valid
      token count as no sequence). A sequence is a row, or (``seq_index``: the sequence of each position, for
      sequences packed into one row) the positions with the same index.
    """
    mask = mask.to(per_token.dtype)
    if mode == "token-mean":
        return (per_token * mask).sum(), mask.sum()
    if mode == "seq-mean-token-mean":
        if seq_index is None:
            n, sums = mask.sum(dim=1), (per_token * mask).sum(dim=1)
        else:
            idx, count = seq_index.reshape(-1), int(seq_index.max()) + 1
            n = mask.new_zeros(count).index_add(0, idx, mask.reshape(-1))
            sums = per_token.new_zeros(count).index_add(0, idx, (per_token * mask).reshape(-1))
        has = n > 0
        seq = sums / n.clamp(min=1)
        return (seq * has).sum(), has.to(per_token.dtype).sum()
    raise ValueError(f"loss_agg_mode={mode!r}: use one of {LOSS_AGG_MODES}")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def truncated_rewards(rewards: torch.Tensor, truncated: torch.Tensor, group_size: int, mode: str = "min") -> torch.Tensor:
    """Rewards with each truncated sample's (no end token) replaced: ``min`` -> the lowest reward of its group,
    ``score`` -> unchanged, a number (as text or float) -> that value. ``rewards`` / ``truncated``:
    ``[groups * group_size]``."""
    if mode == "score" or not bool(truncated.any()):
        return rewards
    r = rewards.view(-1, group_size)
    if mode == "min":
        fill = r.min(dim=1, keepdim=True).values.expand_as(r)
    else:
        fill = torch.full_like(r, float(mode))
    return torch.where(truncated.view_as(r), fill, r).reshape(-1)

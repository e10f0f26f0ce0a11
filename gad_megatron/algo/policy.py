"""GRPO / PPO math for the generator, as small pure functions on ``[b, t]`` token tensors.

Shapes: every per-token tensor is ``[rows, tokens]`` aligned with a ``mask`` (1 = a response token that
counts, 0 = prompt or padding). Per-sequence tensors are ``[rows]``. Nothing here talks to a process group:
the caller owns normalisation across micro-batches and data-parallel ranks (see :func:`aggregate`).
"""

from __future__ import annotations

import torch

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean")


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6, scale: bool = True) -> torch.Tensor:
    """GRPO's group-normalised advantage per sample: ``(r - mean_g) / (std_g + eps)``.

    ``rewards`` is ``[groups * group_size]``, grouped by prompt (sample ``j`` of prompt ``i`` at
    ``i * group_size + j``). std is the unbiased sample std, as verl's GRPO estimator uses; a group of equal
    rewards gets advantage exactly 0 (and no NaN, also for ``group_size == 1``).
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards: expected [groups * {group_size}], got shape {tuple(rewards.shape)}")
    r = rewards.double().view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if not scale:
        return centred.view(-1).to(rewards.dtype)
    std = r.std(dim=1, keepdim=True, unbiased=True) if group_size > 1 else torch.zeros_like(r[:, :1])
    # A group whose rewards are all equal carries no signal: exactly 0 (also with eps=0, where 0/0 is NaN).
    adv = torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))
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


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean"):
    """(sum, count) whose global ratio is the loss: callers add sums and counts over micro-batches and DP
    ranks and divide once, so the optimised loss is the logged loss whatever the micro-batching.

    - ``token-mean``: sum over valid tokens / number of valid tokens.
    - ``seq-mean-token-mean``: each sequence's own token mean, averaged over sequences (rows with no valid
      token count as no sequence).
    """
    mask = mask.to(per_token.dtype)
    if mode == "token-mean":
        return (per_token * mask).sum(), mask.sum()
    if mode == "seq-mean-token-mean":
        n = mask.sum(dim=1)
        has = n > 0
        seq = (per_token * mask).sum(dim=1) / n.clamp(min=1)
        return (seq * has).sum(), has.to(per_token.dtype).sum()
    raise ValueError(f"loss_agg_mode={mode!r}: use one of {LOSS_AGG_MODES}")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)

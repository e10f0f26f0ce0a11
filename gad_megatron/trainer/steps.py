"""The per-micro-batch steps megatron's pipeline schedule runs: ``step(model, batch) -> (output, loss_func)``.

Every training loss_func returns ``(sum, count, logs)`` and the engines set megatron's
``calculate_per_token_loss``: the schedule adds counts over micro-batches, ``finalize_model_grads`` all-reduces
them over data-parallel ranks and divides the gradients once, so the loss optimised is the global
``sum / count`` — the number logged — whatever the micro-batching and DP size. Logged values are
``[sum, count]`` pairs reduced the same way (:mod:`gad_megatron.trainer.metrics`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gad_megatron.models.logprobs import vocab_parallel_entropy, vocab_parallel_logprobs
from gad_megatron.algo.policy import aggregate, low_var_kl, ppo_clip_loss, tis_weights
from gad_megatron.models.discriminator import sequence_scores
from gad_megatron.models.forward import model_call


def _pair(total, count):
    # megatron adds the counts the loss_funcs return as int tensors; the logged pairs are float64.
    return torch.stack([total.detach().double(), torch.as_tensor(count).detach().double().to(total.device)])


def sft_step(model, batch):
    """Cross-entropy on the teacher's answer tokens only (the warmup's G loss, and SeqKD). The last stage's
    GPTModel computes it itself from the labels (megatron's vocab-parallel cross-entropy on its [s, b, V] logits,
    the same function at temperature 1): no [b, s, V] transpose copy and no scaled copy of the logits."""
    per_token_nll = model_call(model, batch, labels=batch["labels"])

    def loss_func(nll):
        mask = batch["loss_mask"].to(nll.device)
        total, n = (nll * mask).sum(), mask.sum()
        return total, n.to(torch.int), {"sft_loss": _pair(total, n)}

    return per_token_nll, loss_func


def logprob_step(temperature: float):
    """Forward only: per-position logprobs of the next token under ``softmax(logits / temperature)``."""

    def step(model, batch):
        logits = model_call(model, batch)

        def loss_func(logits):
            with torch.no_grad():
                logp = vocab_parallel_logprobs(logits, batch["labels"], temperature)
            return logp.sum() * 0.0, {"logp": logp.cpu()}

        return logits, loss_func

    return step


def batch_scores(per_token: torch.Tensor, batch: dict) -> torch.Tensor:
    """D's ``[b]`` sequence scores of a micro-batch, padded or packed: the head's output at each sequence's last
    token (``last_index``; a hand-made padded batch without it: its attention mask's last real token)."""
    if "last_index" not in batch:
        return sequence_scores(per_token, batch["attention_mask"].to(per_token.device))
    return per_token.reshape(-1)[batch["last_index"].to(per_token.device)]


def per_position(batch: dict, key: str, device) -> torch.Tensor:
    """A per-sequence value ``[b]`` laid over the positions: ``[b, 1]`` broadcasting over padded rows, or
    gathered by ``seq_index`` over a packed row."""
    v = batch[key].to(device)
    return v[batch["seq_index"].to(device)] if "seq_index" in batch else v.unsqueeze(1)


def score_step(model, batch):
    """Forward only: the discriminator's sequence score of every row."""
    per_token = model_call(model, batch)

    def loss_func(per_token):
        s = batch_scores(per_token, batch).detach()
        return s.sum() * 0.0, {"scores": s.float().cpu()}

    return per_token, loss_func


def bt_terms(scores: torch.Tensor, in_loss: torch.Tensor, length: torch.Tensor, group_size: int) -> tuple:
    """Bradley-Terry over whole groups ``[teacher, student_1..student_n]`` (``scores`` ``[G*(n+1)]``, in that
    order): each student sample is paired with its prompt's teacher answer; loss ``-log sigmoid(D(y_t) - D(y_s))``
    summed over pairs, the count is the number of pairs. Student rows with ``in_loss`` False (truncated samples)
    make no pair. ``d_acc`` counts a tie as 0.5 and ``d_tie_share`` logs how many pairs tied (a D whose scores tie
    is not ranking anything). ``length``: each row's answer length (the length buckets). (total, count, logs)."""
    g = scores.view(-1, group_size + 1)
    teacher, student = g[:, :1], g[:, 1:]
    keep = in_loss.to(scores.device).view(-1, group_size + 1)[:, 1:].float()
    margin = teacher - student
    total = -(F.logsigmoid(margin) * keep).sum()
    n = keep.sum().to(torch.int)
    won = (margin > 0).double() + 0.5 * (margin == 0).double()
    logs = {
        "d_loss": _pair(total, n),
        "d_acc": _pair((won * keep).sum(), n),
        "d_tie_share": _pair(((margin == 0).double() * keep).sum(), n),
        "teacher_score": _pair(teacher.sum(), teacher.numel()),
        "student_score": _pair(student.sum(), student.numel()),
        **d_acc_buckets(won, keep, length.to(scores.device).view(-1, group_size + 1)[:, 1:].double()),
    }
    return total, n, logs


def _row_lengths(batch) -> torch.Tensor:
    if "response_len" in batch:
        return batch["response_len"]
    return (batch["loss_mask"] if "loss_mask" in batch else batch["attention_mask"]).sum(1)  # answer (or whole)


def bt_step(group_size: int):
    """:func:`bt_terms` on micro-batches made of whole groups. Scores are fp32 (the head is)."""

    def step(model, batch):
        per_token = model_call(model, batch)

        def loss_func(per_token):
            scores = batch_scores(per_token, batch).float()
            in_loss = batch.get("in_d_loss", torch.ones(scores.shape[0], dtype=torch.bool))  # a hand-made batch: all
            return bt_terms(scores, in_loss, _row_lengths(batch), group_size)

        return per_token, loss_func

    return step


def bt_surrogate_step(model, batch):
    """Bradley-Terry through a surrogate, for groups split across micro-batches: each row carries
    ``score_grad`` = d(BT loss sum) / d(its score), taken from a scoring pass of the same weights over the whole
    groups. ``sum(score_grad x score)`` has BT's gradient; each student row in a pair counts one, so the counts
    add up to the whole batch's pairs and megatron divides by the same count as :func:`bt_step`. Logs nothing: the
    scoring pass logged the loss."""
    per_token = model_call(model, batch)

    def loss_func(per_token):
        scores = batch_scores(per_token, batch).float()
        total = (scores * batch["score_grad"].to(scores.device)).sum()
        pairs = (~batch["is_teacher"] & batch["in_d_loss"]).sum()
        return total, pairs.to(torch.int), {}

    return per_token, loss_func


D_ACC_LENGTH_BUCKETS = (16, 64, 256)  # response tokens: <= 16, <= 64, <= 256, longer
# (name, lower bound exclusive, upper bound inclusive or None) of each length bucket
_LENGTH_BUCKETS = [(f"d_acc_len_le{hi}", lo, hi) for lo, hi in zip((0,) + D_ACC_LENGTH_BUCKETS, D_ACC_LENGTH_BUCKETS)] \
    + [(f"d_acc_len_gt{D_ACC_LENGTH_BUCKETS[-1]}", D_ACC_LENGTH_BUCKETS[-1], None)]
# every [sum, count] pair bt_step logs (ranks without the last pipeline stage log these as zeros)
BT_LOG_NAMES = ["d_loss", "d_acc", "d_tie_share", "teacher_score", "student_score", "d_acc_finished",
                "d_acc_truncated"] + [name for name, _, _ in _LENGTH_BUCKETS]


def d_acc_buckets(won, keep, length) -> dict:
    """d_acc of the finished and of the truncated samples (the latter measured, not trained on), and by the
    student sample's length (``length`` ``[G, n]``): a length or end-token tell shows up here before anywhere
    else."""
    keep = keep.double()
    out = {"d_acc_finished": _pair((won * keep).sum(), keep.sum()),
           "d_acc_truncated": _pair((won * (1 - keep)).sum(), (1 - keep).sum())}
    for name, lo, hi in _LENGTH_BUCKETS:
        inside = ((length > lo) & (length <= hi) if hi is not None else length > lo).double()
        out[name] = _pair((won * inside).sum(), inside.sum())
    return out


def policy_step(temperature: float, algo):
    """GRPO's generator loss per token: PPO-clipped surrogate on the group advantage, plus the reward's per-token
    advantage where it gives one (times the truncated
    importance weight when ``algo.tis``), plus ``kl_coef`` x low_var_kl to the reference, minus
    ``entropy_coef`` x entropy; aggregated by ``algo.loss_agg_mode``."""

    def step(model, batch):
        logits = model_call(model, batch)

        def loss_func(logits):
            dev = logits.device
            mask = batch["loss_mask"].to(dev)
            logp = vocab_parallel_logprobs(logits, batch["labels"], temperature)
            # One pass (no separate old-logprob forward): the old policy is this forward's, detached.
            old = batch["old_logp"].to(dev) if "old_logp" in batch else logp.detach()
            ref = batch["ref_logp"].to(dev)
            adv = per_position(batch, "advantages", dev)
            if "token_adv" in batch:  # the reward's per-token channel (OPD): added at each sampled token
                adv = adv + batch["token_adv"].to(dev)
            pg, clipped = ppo_clip_loss(logp, old, adv, algo.clip_ratio, algo.clip_ratio_high, algo.dual_clip)
            if algo.tis:
                w, capped = tis_weights(old, batch["rollout_logp"].to(dev), algo.tis_cap)
                pg = pg * w
            else:
                capped = torch.zeros_like(pg)
            kl = low_var_kl(logp, ref, algo.kl_clamp)
            per_token = pg + algo.kl_coef * kl
            if algo.entropy_coef:
                entropy = vocab_parallel_entropy(logits, temperature)
                per_token = per_token - algo.entropy_coef * entropy
                entropy = entropy.detach()
            else:
                with torch.no_grad():
                    entropy = vocab_parallel_entropy(logits, temperature)
            rows = batch["seq_index"].to(dev) if "seq_index" in batch else None
            total, n = aggregate(per_token, mask, algo.loss_agg_mode, rows)
            tokens = mask.sum()
            logs = {
                "g_loss": _pair(total, n),
                "pg_loss": _pair(*aggregate(pg.detach(), mask, algo.loss_agg_mode, rows)),
                "kl": _pair((kl.detach() * mask).sum(), tokens),
                "entropy": _pair((entropy * mask).sum(), tokens),
                "pg_clipfrac": _pair((clipped * mask).sum(), tokens),
                "tis_clipfrac": _pair((capped * mask).sum(), tokens),
                "ratio": _pair((torch.exp(logp.detach() - old) * mask).sum(), tokens),
            }
            if "old_logp" not in batch:
                logs["logp"] = logp.detach().cpu()  # the old logprobs the separate forward would have given
            return total, n.to(torch.int), logs

        return logits, loss_func

    return step


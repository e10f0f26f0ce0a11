"""Loss steps for megatron's pipeline schedules (``step(model, batch) -> (output, loss_func)``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gad_megatron.models.discriminator import sequence_scores
from gad_megatron.models.forward import model_call


def lm_loss_step(model, batch):
    """Token-mean cross-entropy on ``labels`` where ``loss_mask`` is 1: the generator's warmup, i.e. SeqKD
    on teacher answers. Uses megatron's vocab-parallel cross-entropy (labels passed to the model)."""
    per_token = model_call(model, batch, labels=batch["labels"])

    def loss_func(losses):
        mask = batch["loss_mask"].to(device=losses.device, dtype=losses.dtype)
        total = (losses * mask).sum()
        n = mask.sum()
        return total, n.to(torch.int), {"lm_loss": torch.stack([total.detach(), n.detach()])}

    return per_token, loss_func


def bradley_terry(teacher_scores: torch.Tensor, student_scores: torch.Tensor, teacher_of: torch.Tensor):
    """Mean over student samples of ``-log sigmoid(D(y_t) - D(y_s))``; each student sample is paired with its
    prompt's teacher answer (``teacher_of[j]`` = row of that answer). Returns (loss, pairwise accuracy)."""
    margin = teacher_scores[teacher_of.to(teacher_scores.device)] - student_scores
    return -F.logsigmoid(margin).mean(), (margin > 0).float().mean()


def bt_loss_step(model, batch):
    """Discriminator step on a batch whose first ``n_teacher`` rows are teacher answers and the rest are
    student samples; ``teacher_of`` pairs every student row with its teacher row."""
    per_token = model_call(model, batch)

    def loss_func(out):
        scores = sequence_scores(out, batch["attention_mask"])
        n_t = int(batch["n_teacher"])
        loss, acc = bradley_terry(scores[:n_t], scores[n_t:], batch["teacher_of"])
        pairs = scores.shape[0] - n_t
        # (sum, count): the engines normalise by the global pair count (calculate_per_token_loss).
        return loss * pairs, torch.tensor(pairs, device=loss.device), {"bt_loss": loss.detach(), "d_acc": acc.detach()}

    return per_token, loss_func

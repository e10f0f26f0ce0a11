"""Sequences -> micro-batches for megatron's pipeline schedule.

A :class:`Seq` is one ``[prompt, response]`` token sequence plus whatever per-response-token values a step
needs (old / reference / rollout logprobs) and per-sequence values (advantage). Micro-batches are packed by
a token budget (rows x padded width <= ``budget``), each padded to its own width, so a batch of short answers
is not padded to the longest answer of the step. A unit (a D group: the teacher answer and its student
samples) goes into one micro-batch; a caller whose units do not fit the budget (:func:`fits`) splits them
(D scores the groups first and trains through a surrogate: ``steps.bt_surrogate_step``), so no micro-batch
is over the budget.

Position convention: ``labels[t] = tokens[t + 1]`` and ``loss_mask[t] = 1`` exactly where ``tokens[t + 1]`` is
a response token, so the value of response token ``k`` sits at position ``prompt_len - 1 + k``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

# per-response-token values a step may carry: G's and the reference's logprobs, the rollout engine's, a
# teacher's (OPD), and a per-token advantage added to the sequence's (a reward's token channel)
PER_TOKEN_KEYS = ("old_logp", "ref_logp", "rollout_logp", "teacher_logp", "token_adv")


@dataclass
class Seq:
    prompt: list
    response: list
    per_token: dict = field(default_factory=dict)  # key -> [len(response)] tensor (response-token order)
    advantage: float = 0.0
    is_teacher: bool = False
    in_d_loss: bool = True  # False: a sample D must not learn from (truncated: it has no end)
    score_grad: float = 0.0  # D's split-group surrogate: d(BT loss) / d(this row's score)

    @property
    def tokens(self) -> list:
        return list(self.prompt) + list(self.response)

    def __len__(self) -> int:
        return len(self.prompt) + len(self.response)


def pack_units(units: list, budget: int, pad_multiple: int = 1) -> list:
    """Greedy, order-preserving packing of units (lists of Seq) into micro-batches (lists of units) with
    rows x padded width <= budget. A unit larger than the budget goes alone (the config check guarantees a
    single longest sequence fits)."""
    out, cur, rows, width = [], [], 0, 0
    for unit in units:
        w = _round_up(max(len(s) for s in unit), pad_multiple)
        new_rows, new_width = rows + len(unit), max(width, w)
        if cur and new_rows * new_width > budget:
            out.append(cur)
            cur, rows, width = [], 0, 0
            new_rows, new_width = len(unit), w
        cur.append(unit)
        rows, width = new_rows, new_width
    if cur:
        out.append(cur)
    return out


def fits(units: list, budget: int, pad_multiple: int = 1) -> bool:
    """Every unit fits one micro-batch of ``budget`` (rows x padded width)."""
    return all(len(u) * _round_up(max(len(s) for s in u), pad_multiple) <= budget for u in units)


def pad_share(mbs: list) -> tuple:
    """(padding tokens, all tokens) of collated micro-batches: what the budget spends on padding."""
    real = sum(int(mb["attention_mask"].sum()) for mb in mbs)
    total = sum(mb["tokens"].numel() for mb in mbs)
    return total - real, total


def _round_up(n: int, m: int) -> int:
    return n if m <= 1 else -(-n // m) * m


def collate(seqs: list, pad_multiple: int = 1, pad_id: int = 0) -> dict:
    """Right-padded tensors for a list of Seq: tokens / labels / loss_mask / attention_mask ``[b, w]``,
    the per-token keys present on every Seq at their response positions, ``advantages`` ``[b]``."""
    width = _round_up(max(len(s) for s in seqs), pad_multiple)
    b = len(seqs)
    tokens = torch.full((b, width), pad_id, dtype=torch.long)
    labels = torch.zeros((b, width), dtype=torch.long)
    loss_mask = torch.zeros((b, width), dtype=torch.float32)
    attn = torch.zeros((b, width), dtype=torch.long)
    keys = [k for k in PER_TOKEN_KEYS if seqs and all(k in s.per_token for s in seqs)]
    extra = {k: torch.zeros((b, width), dtype=torch.float32) for k in keys}
    for i, s in enumerate(seqs):
        ids = torch.tensor(s.tokens, dtype=torch.long)
        n, p = len(ids), len(s.prompt)
        tokens[i, :n] = ids
        attn[i, :n] = 1
        labels[i, : n - 1] = ids[1:]
        if len(s.response):
            loss_mask[i, p - 1 : n - 1] = 1.0
        for k in keys:
            v = s.per_token[k]
            if len(v) != len(s.response):
                raise ValueError(f"per-token {k!r} has {len(v)} values for a {len(s.response)}-token response")
            extra[k][i, p - 1 : n - 1] = v.float()
    batch = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "attention_mask": attn,
             "advantages": torch.tensor([s.advantage for s in seqs], dtype=torch.float32),
             "is_teacher": torch.tensor([s.is_teacher for s in seqs], dtype=torch.bool),
             "in_d_loss": torch.tensor([s.in_d_loss for s in seqs], dtype=torch.bool),
             "score_grad": torch.tensor([s.score_grad for s in seqs], dtype=torch.float32)}
    batch.update(extra)
    return batch


def microbatches(units: list, budget: int, pad_multiple: int = 1) -> tuple:
    """(list of collated micro-batches, list of the Seq lists they hold, in order)."""
    packed = pack_units(units, budget, pad_multiple)
    seq_lists = [[s for unit in mb for s in unit] for mb in packed]
    return [collate(sl, pad_multiple) for sl in seq_lists], seq_lists


def response_values(per_pos: torch.Tensor, seqs: list) -> list:
    """Inverse of the collate layout: ``[b, w]`` position values -> per-Seq ``[len(response)]`` tensors."""
    out = []
    for i, s in enumerate(seqs):
        p, n = len(s.prompt), len(s)
        out.append(per_pos[i, p - 1 : n - 1].detach().cpu().clone())
    return out


def fill_per_token(seqs_per_mb: list, outputs: Optional[list], key: str) -> None:
    """Stores forward-pass outputs (``[b, w]`` per micro-batch, last pipeline stage only) on the Seqs; other
    stages never read them and get zeros so every rank builds the same micro-batch shapes."""
    for mb_i, seqs in enumerate(seqs_per_mb):
        if outputs is not None:
            vals = response_values(outputs[mb_i][key], seqs)
        else:
            vals = [torch.zeros(len(s.response)) for s in seqs]
        for s, v in zip(seqs, vals):
            s.per_token[key] = v

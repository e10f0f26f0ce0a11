"""Sequences -> micro-batches for megatron's pipeline schedule.

A :class:`Seq` is one ``[prompt, response]`` token sequence plus whatever per-response-token values a step
needs (old / reference / rollout logprobs) and per-sequence values (advantage). A :class:`MicroBatching` fills
micro-batches up to a token budget in one of two layouts:

- padded (``[b, w]``): rows x padded width <= ``budget``, each micro-batch padded to its own width, so a batch
  of short answers is not padded to the longest answer of the step;
- packed (THD, ``train.packed_sequences``): the sequences back to back in one row ``[1, T]``, T = their summed
  lengths <= ``budget`` (rounded up to the pad multiple), attention kept inside each sequence by megatron's
  ``PackedSeqParams`` (``cu_seqlens``): TE's fused kernels on GPU, a block-diagonal mask on the local spec
  (``models/sdpa_attention.py``). No padding but the round-up, and RoPE restarts at each sequence.

A unit (a D group: the teacher answer and its student samples) goes into one micro-batch; a caller whose units
do not fit the budget (:meth:`MicroBatching.fits`) splits them (D scores the groups first and trains through a
surrogate: ``steps.bt_surrogate_step``), so no micro-batch is over the budget.

Position convention (per sequence, at its offset in the micro-batch): ``labels[t] = tokens[t + 1]`` and
``loss_mask[t] = 1`` exactly where ``tokens[t + 1]`` is a response token, so the value of response token ``k``
sits at position ``start + prompt_len - 1 + k``. Every collated micro-batch also carries, per sequence,
``starts`` (flat offset of its first token), ``last_index`` (flat offset of its last token: D's score) and
``response_len``; a packed one carries ``seq_index`` (the sequence of each position) and ``cu_seqlens``.
"""

from __future__ import annotations

import itertools
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


def pack_units(units: list, budget: int, pad_multiple: int = 1, packed: bool = False) -> list:
    """Greedy, order-preserving packing of units (lists of Seq) into micro-batches (lists of units) whose cost
    (:func:`mb_tokens`) is <= budget. A unit larger than the budget goes alone (the config check guarantees a
    single longest sequence fits). The micro-batch being filled is kept as running totals (rows, longest,
    summed length), so each unit costs its own length."""
    out, cur, rows, longest, total = [], [], 0, 0, 0
    for unit in units:
        lengths = [len(s) for s in unit]
        grown = (rows + len(lengths), max(longest, max(lengths)), total + sum(lengths))
        if cur and _cost(*grown, pad_multiple, packed) > budget:
            out.append(cur)
            cur, grown = [], (len(lengths), max(lengths), sum(lengths))
        cur.append(unit)
        rows, longest, total = grown
    if cur:
        out.append(cur)
    return out


def _cost(rows: int, longest: int, total: int, pad_multiple: int, packed: bool) -> int:
    return _round_up(total, pad_multiple) if packed else rows * _round_up(longest, pad_multiple)


def mb_tokens(units: list, pad_multiple: int = 1, packed: bool = False) -> int:
    """Tokens a micro-batch of ``units`` occupies: rows x padded width, or (packed) the summed lengths rounded up
    to the pad multiple."""
    lengths = [len(s) for u in units for s in u]
    return _cost(len(lengths), max(lengths), sum(lengths), pad_multiple, packed)


def fits(units: list, budget: int, pad_multiple: int = 1, packed: bool = False) -> bool:
    """Every unit fits one micro-batch of ``budget``."""
    return all(mb_tokens([u], pad_multiple, packed) <= budget for u in units)


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
            extra[k][i, p - 1 : n - 1] = _checked(s, k).float()
    batch = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "attention_mask": attn, **extra}
    batch.update(_per_sequence(seqs, [i * width for i in range(b)]))
    return batch


def collate_packed(seqs: list, pad_multiple: int = 1, pad_id: int = 0) -> dict:
    """One row ``[1, T]`` holding ``seqs`` back to back (THD), T rounded up to ``pad_multiple`` (sequence
    parallel splits it over TP ranks); the tail's padding is a segment of its own in ``cu_seqlens`` (it attends
    to itself only and no loss reads it). ``position_ids`` restart at each sequence."""
    lengths = [len(s) for s in seqs]
    starts = [0, *itertools.accumulate(lengths)][:-1]
    real = sum(lengths)
    total = _round_up(real, pad_multiple)
    tokens = torch.full((1, total), pad_id, dtype=torch.long)
    labels = torch.zeros((1, total), dtype=torch.long)
    loss_mask = torch.zeros((1, total), dtype=torch.float32)
    attn = torch.zeros((1, total), dtype=torch.long)
    positions = torch.zeros((1, total), dtype=torch.long)
    seq_index = torch.zeros((1, total), dtype=torch.long)
    keys = [k for k in PER_TOKEN_KEYS if seqs and all(k in s.per_token for s in seqs)]
    extra = {k: torch.zeros((1, total), dtype=torch.float32) for k in keys}
    for i, (s, o) in enumerate(zip(seqs, starts)):
        ids = torch.tensor(s.tokens, dtype=torch.long)
        n, p = len(ids), len(s.prompt)
        tokens[0, o : o + n] = ids
        attn[0, o : o + n] = 1
        positions[0, o : o + n] = torch.arange(n)
        seq_index[0, o : o + n] = i
        labels[0, o : o + n - 1] = ids[1:]
        if len(s.response):
            loss_mask[0, o + p - 1 : o + n - 1] = 1.0
        for k in keys:
            extra[k][0, o + p - 1 : o + n - 1] = _checked(s, k).float()
    bounds = starts + [real] + ([total] if total > real else [])
    batch = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "attention_mask": attn,
             "position_ids": positions, "seq_index": seq_index,
             "cu_seqlens": torch.tensor(bounds, dtype=torch.int32), **extra}
    batch.update(_per_sequence(seqs, starts))
    return batch


def _checked(s: Seq, key: str) -> torch.Tensor:
    v = s.per_token[key]
    if len(v) != len(s.response):
        raise ValueError(f"per-token {key!r} has {len(v)} values for a {len(s.response)}-token response")
    return v


def _per_sequence(seqs: list, starts: list) -> dict:
    """The per-sequence tensors of a micro-batch (``[b]``), whatever its layout."""
    return {"advantages": torch.tensor([s.advantage for s in seqs], dtype=torch.float32),
            "is_teacher": torch.tensor([s.is_teacher for s in seqs], dtype=torch.bool),
            "in_d_loss": torch.tensor([s.in_d_loss for s in seqs], dtype=torch.bool),
            "score_grad": torch.tensor([s.score_grad for s in seqs], dtype=torch.float32),
            "starts": torch.tensor(starts, dtype=torch.long),
            "last_index": torch.tensor([o + len(s) - 1 for s, o in zip(seqs, starts)], dtype=torch.long),
            "response_len": torch.tensor([len(s.response) for s in seqs], dtype=torch.float32)}


@dataclass(frozen=True)
class MicroBatching:
    """How units become micro-batches: the token budget (``train.micro_batch_tokens``), the multiple a
    micro-batch's width (or packed length) is rounded up to (TP under sequence parallel), and the layout."""

    budget: int
    pad_multiple: int = 1
    packed: bool = False

    def fits(self, units: list) -> bool:
        return fits(units, self.budget, self.pad_multiple, self.packed)

    def microbatches(self, units: list) -> tuple:
        return microbatches(units, self.budget, self.pad_multiple, self.packed)


def microbatches(units: list, budget: int, pad_multiple: int = 1, packed: bool = False) -> tuple:
    """(list of collated micro-batches, list of the Seq lists they hold, in order)."""
    groups = pack_units(units, budget, pad_multiple, packed)
    seq_lists = [[s for unit in mb for s in unit] for mb in groups]
    return [(collate_packed if packed else collate)(sl, pad_multiple) for sl in seq_lists], seq_lists


def response_values(per_pos: torch.Tensor, seqs: list) -> list:
    """Inverse of the collate layouts: position values -> per-Seq ``[len(response)]`` tensors. A padded
    micro-batch has one row per sequence; a packed one is a single row with the sequences back to back (with
    one sequence the two layouts are the same)."""
    packed = per_pos.shape[0] != len(seqs)
    flat = per_pos.reshape(-1)
    out, o = [], 0
    for i, s in enumerate(seqs):
        start = o if packed else i * per_pos.shape[1]
        p, n = len(s.prompt), len(s)
        out.append(flat[start + p - 1 : start + n - 1].detach().cpu().clone())
        o += n
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

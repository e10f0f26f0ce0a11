"""The trainer's data: ``gad-collect`` rows (prompt + the teacher's answer), tokenised once, split, sampled.

Rows are ``{"id", "messages" | "prompt" | "conversation", "teacher_response"}`` in JSONL (read here, so an
error names the line) or parquet / a saved ``datasets`` directory (through HF ``datasets``). The chat template
is applied once (:mod:`gad_megatron.data.chat`). Prompt / response limits have an explicit policy, ``drop``
or ``truncate``, and every row it touches is counted in :class:`DataStats`.

:class:`EpochSampler` gives each step its global batch of prompt indices (a deterministic shuffle per epoch)
and each data-parallel rank its contiguous share; its position is two integers, so a run resumes exactly,
also at another DP size.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional

import torch

from gad_megatron.data.chat import prompt_ids, response_ids
from gad_megatron.data.prompts import PromptFormatError, iter_rows, to_item


class DataError(ValueError):
    """A malformed data row or file; the message names the file and line."""


@dataclass
class Example:
    id: str
    messages: list
    prompt: list  # token ids (chat template applied, generation prompt included)
    response: list  # the teacher's answer as token ids (end-of-turn token included unless truncated)


@dataclass
class DataStats:
    rows: int = 0
    kept: int = 0
    skipped_bad: int = 0
    dropped_prompt_too_long: int = 0
    dropped_response_too_long: int = 0
    truncated_prompt: int = 0
    truncated_response: int = 0
    duplicate_ids: int = 0
    bad_examples: list = field(default_factory=list)  # first few "file:line: why" of skipped rows

    def summary(self) -> dict:
        d = asdict(self)
        d["bad_examples"] = d["bad_examples"][:5]
        return d


def _iter_rows(path: str) -> Iterator[tuple]:
    if not os.path.exists(path):
        raise DataError(f"{path}: data file not found")
    try:
        for where, row in iter_rows(path):
            yield where, DataError(str(row)) if isinstance(row, Exception) else row
    except PromptFormatError as e:
        raise DataError(str(e)) from None


def _parse(where: str, row: dict) -> dict:
    try:
        item = to_item(row, where)
    except PromptFormatError as e:
        raise DataError(str(e)) from None
    answer = row.get("teacher_response")
    if not isinstance(answer, str) or not answer.strip():
        raise DataError(f"{where}: 'teacher_response' must be a non-empty string (the teacher's answer)")
    item["teacher_response"] = answer
    return item


def read_rows(path: str, bad_rows: str = "error", stats: Optional[DataStats] = None) -> list:
    """Parsed rows ``{"id", "messages", "teacher_response"}``; a bad row raises (``error``) or is counted
    (``skip``). A row repeating an earlier row (same id, prompt and answer) is counted and dropped; a row that
    reuses an earlier row's id for another prompt or answer is a bad row naming both lines (two files numbered
    alike and concatenated: dropping it would silently lose half of the data)."""
    stats = stats if stats is not None else DataStats()
    out, seen = [], {}
    for where, row in _iter_rows(path):
        stats.rows += 1
        try:
            if isinstance(row, Exception):
                raise row
            item = _parse(where, row)
            first = seen.get(item["id"])
            if first is not None and first[1] != item:
                raise DataError(f"{where}: id {item['id']!r} was already used by {first[0]} for another prompt or "
                                "answer: ids must be unique (sources numbered alike? give each its own prefix)")
        except DataError as e:
            if bad_rows == "error":
                raise
            stats.skipped_bad += 1
            stats.bad_examples.append(str(e))
            continue
        if first is not None:  # the same row again
            stats.duplicate_ids += 1
            continue
        seen[item["id"]] = (where, item)
        out.append(item)
    if not out:
        raise DataError(f"{path}: no usable rows ({stats.rows} read, {stats.skipped_bad} bad)")
    return out


def tokenize_rows(rows: list, tokenizer, max_prompt: int, max_response: int, overlong: str = "drop",
                  stats: Optional[DataStats] = None) -> list:
    """Rows -> :class:`Example` under the length policy. ``truncate`` keeps a prompt's *last* tokens (the
    generation prompt and the latest turn) and a response's *first* tokens; ``drop`` drops the row."""
    stats = stats if stats is not None else DataStats()
    out = []
    for r in rows:
        p = prompt_ids(tokenizer, r["messages"])
        a = response_ids(tokenizer, r["teacher_response"])
        if len(p) > max_prompt:
            if overlong == "drop":
                stats.dropped_prompt_too_long += 1
                continue
            p = p[-max_prompt:]
            stats.truncated_prompt += 1
        if len(a) > max_response:
            if overlong == "drop":
                stats.dropped_response_too_long += 1
                continue
            a = a[:max_response]
            stats.truncated_response += 1
        out.append(Example(r["id"], r["messages"], p, a))
    stats.kept += len(out)
    return out


def split_heldout(rows: list, size: int, seed: int) -> tuple:
    """(train, heldout): ``size`` rows chosen by a hash of (seed, id), independent of file order."""
    if size <= 0:
        return rows, []
    if size >= len(rows):
        raise DataError(f"data.heldout_size={size} leaves no training rows ({len(rows)} rows)")
    key = lambda r: hashlib.sha256(f"{seed}:{r['id']}".encode()).hexdigest()  # noqa: E731
    held = {r["id"] for r in sorted(rows, key=key)[:size]}
    return [r for r in rows if r["id"] not in held], [r for r in rows if r["id"] in held]


class EpochSampler:
    """Global batches of ``batch`` indices into ``n`` examples; epoch ``e`` is a permutation seeded by
    (seed, e); an incomplete last batch is left out. Position = (epoch, examples taken in that epoch), so the
    batch size may change between stages (``gad_stage.batch_prompts``) without repeating or skipping data."""

    def __init__(self, n: int, batch: int, seed: int, shuffle: bool = True):
        if n < batch:
            raise DataError(f"{n} training examples is fewer than one batch of train.batch_prompts={batch}")
        self.n, self.batch, self.seed, self.shuffle = n, batch, seed, shuffle
        self.epoch, self.pos = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.batch

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))

    def next_batch(self) -> list:
        if self.pos + self.batch > self.n:
            self.epoch, self.pos = self.epoch + 1, 0
        idx = self._order(self.epoch)[self.pos : self.pos + self.batch].tolist()
        self.pos += self.batch
        return idx

    @staticmethod
    def dp_share(global_batch: list, dp_rank: int, dp_size: int) -> list:
        """This data-parallel rank's contiguous share of a global batch (whole prompts, so GRPO groups stay
        on one rank)."""
        per = len(global_batch) // dp_size
        return global_batch[dp_rank * per : (dp_rank + 1) * per]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n, "batch": self.batch, "seed": self.seed}

    def load_state_dict(self, sd: dict) -> None:
        if (sd["n"], sd["batch"], sd["seed"]) != (self.n, self.batch, self.seed):
            raise ValueError(f"data position was saved for n={sd['n']} batch={sd['batch']} seed={sd['seed']}, "
                             f"this run has n={self.n} batch={self.batch} seed={self.seed}")
        self.epoch = sd["epoch"]
        self.pos = sd["pos"] if "pos" in sd else sd["offset"] * sd["batch"]  # checkpoints before 0.1.1: batches

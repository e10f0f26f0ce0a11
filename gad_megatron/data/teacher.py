"""The trainer's data: ``gad-collect`` rows (prompt + the teacher's answer), tokenised once, split, sampled.

Rows come in three shapes (:class:`RowShape`; ``data.format`` names one or ``auto`` tells them apart by their
keys), in JSONL (read here, so an error names the line) or parquet / a saved ``datasets`` directory (through HF
``datasets``):

- ``native``: gad-collect's rows, ``{"id", "messages" | "prompt" | "conversation", "teacher_response"}``;
- ``chat``: ``{"messages": [..., {"role": "assistant", "content": <the teacher's answer>}]}`` (TRL's
  conversational rows; ``conversation`` too): the last turn is the answer, the turns before it the prompt;
- ``columns``: a prompt and a response column, named by ``data.prompt_key`` / ``data.response_key``
  (default ``prompt`` / ``response``; an optional ``system`` column).

The chat template
is applied once (:mod:`gad_megatron.data.chat`). Prompt / response limits have an explicit policy, ``drop``
or ``truncate``, and every row it touches is counted in :class:`DataStats`.

:class:`EpochSampler` gives each step its global batch of prompt indices (a deterministic shuffle per epoch)
and each data-parallel rank its contiguous share; its position is two integers, so a run resumes exactly,
also at another DP size.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional

import torch

from gad_megatron.data.chat import prompt_ids, response_ids
from gad_megatron.data.prompts import PromptFormatError, content_text, iter_rows, to_item

FORMATS = ("auto", "native", "chat", "columns")


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


@dataclass(frozen=True)
class RowShape:
    """Which keys of a row hold the prompt and the teacher's answer (``data.format`` / ``prompt_key`` /
    ``response_key``)."""
    format: str = "auto"
    prompt_key: str = "prompt"
    response_key: str = "response"

    def of(self, row: dict) -> Optional[str]:
        """The shape of ``row`` (``format``, or for ``auto`` the first that fits its keys); None if none does."""
        if self.format != "auto":
            return self.format
        if "teacher_response" in row:
            return "native"
        turns = row.get("messages", row.get("conversation"))
        if isinstance(turns, list) and turns and isinstance(turns[-1], dict) and turns[-1].get("role") == "assistant":
            return "chat"
        if self.prompt_key in row and self.response_key in row:
            return "columns"
        return None

    def wanted(self) -> str:
        return {"native": "'teacher_response' with 'messages', 'conversation' or 'prompt' (gad-collect's rows)",
                "chat": "'messages' (or 'conversation') whose last turn is the assistant's answer (chat rows)",
                "columns": f"{self.prompt_key!r} and {self.response_key!r} (data.prompt_key / data.response_key)",
                }.get(self.format) or ("one of: 'teacher_response' with 'messages' or 'prompt' (gad-collect's rows); "
                                       "'messages' ending in the assistant's answer (chat rows); "
                                       f"{self.prompt_key!r} and {self.response_key!r} (data.prompt_key / data.response_key)")


def _refuse(where: str, row: dict, shape: RowShape, why: str = "") -> DataError:
    fmt = f"data.format={shape.format}"
    return DataError(f"{where}: {why or 'cannot tell the row shape'} ({fmt}): the row has keys {sorted(row)}, "
                     f"wanted {shape.wanted()}")


def _answer(where: str, value, key: str) -> str:
    text = content_text(value, where) if isinstance(value, (str, list)) else None
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: {key!r} must be a non-empty string (the teacher's answer)")
    return text


def _ids(row: dict) -> dict:
    return {k: row[k] for k in ("id", "conversation_id", "question_id") if row.get(k) is not None}


def _parse(where: str, row: dict, shape: RowShape = RowShape()) -> dict:
    """One row -> ``{"id", "messages", "teacher_response"}`` (``messages`` up to the last user turn)."""
    fmt = shape.of(row)
    try:
        if fmt == "native":
            if "teacher_response" not in row:
                raise _refuse(where, row, shape, "no 'teacher_response'")
            item, answer = to_item(row, where), _answer(where, row["teacher_response"], "teacher_response")
        elif fmt == "chat":
            turns = row.get("messages", row.get("conversation"))
            if not (isinstance(turns, list) and turns and isinstance(turns[-1], dict)
                    and turns[-1].get("role") == "assistant"):
                raise _refuse(where, row, shape, "no chat turns ending in the assistant's answer")
            answer = _answer(where, turns[-1].get("content"), "messages[-1].content")
            if len(turns) < 2:
                raise DataError(f"{where}: chat row has no user turn before the assistant's answer")
            item = to_item({**_ids(row), "messages": turns[:-1]}, where)
        elif fmt == "columns":
            if shape.prompt_key not in row or shape.response_key not in row:
                raise _refuse(where, row, shape, "missing prompt or response column")
            prompt = row[shape.prompt_key]  # a string, or chat turns (verl's prompt column)
            item = to_item({**_ids(row), "system": row.get("system"),
                            ("messages" if isinstance(prompt, list) else "prompt"): prompt}, where)
            answer = _answer(where, row[shape.response_key], shape.response_key)
        else:
            raise _refuse(where, row, shape)
    except PromptFormatError as e:
        raise DataError(str(e)) from None
    item["teacher_response"] = answer
    return item


def read_rows(path: str, bad_rows: str = "error", stats: Optional[DataStats] = None,
              shape: RowShape = RowShape()) -> list:
    """Parsed rows ``{"id", "messages", "teacher_response"}`` of any :class:`RowShape`; a bad row raises (``error``) or is counted
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
            item = _parse(where, row, shape)
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


def heldout_subset(held: list, max_prompts: int, seed: int) -> list:
    """At most ``max_prompts`` of the held-out examples (0: all): a subset drawn with ``seed``, in file order,
    the same at every evaluation and every start."""
    if not max_prompts or len(held) <= max_prompts:
        return held
    keep = sorted(random.Random(seed).sample(range(len(held)), max_prompts))
    return [held[i] for i in keep]


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

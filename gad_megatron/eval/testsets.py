"""Loaders for the paper's four test sets from local files in their public formats.

- ``lmsys``: LMSYS-Chat prompts held out from training: the rows of an LMSYS-format prompt file whose ids are
  not in the training file (the gad-collect output), first ``n`` after a seeded shuffle (paper: 500).
- ``dolly``: databricks-dolly-15k JSONL (``instruction``, ``context``, ``response``, ``category``).
- ``selfinst``: Self-Instruct user-oriented JSONL (``instruction``, ``instances: [{input, output}]``).
- ``vicuna``: Vicuna-80 questions JSONL (``question_id``, ``text`` or ``turns``, ``category``).
Each item: ``{"id", "dataset", "messages"}``.
"""

from __future__ import annotations

import random
from typing import Optional

from gad_megatron.data.jsonl import iter_jsonl
from gad_megatron.data.prompts import PromptFormatError, load_prompts

DATASETS = ("lmsys", "dolly", "selfinst", "vicuna")


def _jsonl(path: str):
    """(line number, row) of a test-set JSONL; the first bad line raises naming it."""
    for where, row in iter_jsonl(path, PromptFormatError):
        if isinstance(row, Exception):
            raise row
        yield int(where.rsplit(":", 1)[1]), row


def _need(row: dict, key: str, where: str, kind=str):
    if key not in row:
        raise PromptFormatError(f"{where}: missing field {key!r}")
    if not isinstance(row[key], kind):
        raise PromptFormatError(f"{where}: field {key!r} must be a {kind.__name__}, got {type(row[key]).__name__}")
    return row[key]


def _opt(row: dict, key: str, where: str, kind=str, default=None):
    return default if row.get(key) in (None, "") else _need(row, key, where, kind)


def load_testset(name: str, path: str, train_file: Optional[str] = None, n: Optional[int] = None, seed: int = 0) -> list:
    if name not in DATASETS:
        raise ValueError(f"unknown test set {name!r} (one of {', '.join(DATASETS)})")
    items = []
    if name == "lmsys":
        seen = set()
        if train_file:
            seen = {row["id"] for _, row in _jsonl(train_file)}
        pool = [it for it in load_prompts(path) if it["id"] not in seen]
        random.Random(seed).shuffle(pool)
        items = [{"id": it["id"], "dataset": name, "messages": it["messages"]} for it in pool[: n or 500]]
        return items
    for i, row in _jsonl(path):
        where = f"{path}:{i}"
        if name == "dolly":
            text = _need(row, "instruction", where)
            context = _opt(row, "context", where)
            if context:
                text = f"{text}\n\n{context}"
            rid = row.get("id", f"dolly-{i}")
        elif name == "selfinst":
            text = _need(row, "instruction", where)
            instances = _opt(row, "instances", where, list, [{}])
            inst = instances[0] if instances else {}
            if not isinstance(inst, dict):
                raise PromptFormatError(f"{where}: 'instances' must hold objects with 'input'")
            inp = _opt(inst, "input", where)
            if inp:
                text = f"{text}\n\n{inp}"
            rid = row.get("id", f"selfinst-{i}")
        else:
            if row.get("text") is not None:
                text = _need(row, "text", where)
            else:
                turns = _opt(row, "turns", where, list, [])
                text = turns[0] if turns else None
                if not isinstance(text, str) or not text:
                    raise PromptFormatError(f"{where}: missing field 'text' (or 'turns': [string, ...])")
            rid = row.get("question_id", f"vicuna-{i}")
        items.append({"id": str(rid), "dataset": name, "messages": [{"role": "user", "content": text}]})
    return items[:n] if n else items

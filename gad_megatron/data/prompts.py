"""Prompt sets: JSONL, parquet or a saved HF ``datasets`` directory, in the LMSYS-Chat-1M conversation format
or with a plain ``prompt`` field. Every row becomes ``{"id", "messages"}`` (messages up to the last user turn;
the teacher answers that turn).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterator, Optional

from gad_megatron.data.jsonl import iter_jsonl


class PromptFormatError(ValueError):
    pass


def _stable_id(messages: list) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def content_text(content, where: str) -> str:
    """A turn's content: a string, or OpenAI-style parts ``[{"type": "text", "text": ...}]`` joined (a part of
    another type, e.g. an image, cannot be trained on a text model: refused)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise PromptFormatError(f"{where}: content part of type {kind!r}: only text parts are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise PromptFormatError(f"{where}: content must be a string or a list of text parts, got {type(content).__name__}")


def to_item(row: dict, where: str, id_field: Optional[str] = None) -> dict:
    """One raw row -> {"id", "messages"}; ``where`` names the file and line for errors."""
    if "conversation" in row or "messages" in row:
        conv = row.get("conversation", row.get("messages"))
        if not isinstance(conv, list) or not conv:
            raise PromptFormatError(f"{where}: 'conversation' must be a non-empty list of {{role, content}}")
        messages = []
        for turn in conv:
            if not isinstance(turn, dict) or "content" not in turn or turn.get("role") not in ("system", "user", "assistant"):
                raise PromptFormatError(f"{where}: each turn needs role (system|user|assistant) and content")
            messages.append({"role": turn["role"], "content": content_text(turn["content"], where)})
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()  # the teacher answers the last user turn; a recorded answer is dropped
        if not messages or messages[-1]["role"] != "user":
            raise PromptFormatError(f"{where}: conversation has no user turn to answer")
    elif "prompt" in row:
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise PromptFormatError(f"{where}: 'prompt' must be a non-empty string")
        messages = [{"role": "user", "content": row["prompt"]}]
        if row.get("system"):
            messages.insert(0, {"role": "system", "content": str(row["system"])})
    else:
        raise PromptFormatError(f"{where}: expected a 'conversation' (LMSYS), 'messages' or 'prompt' field")
    for key in ([id_field] if id_field else []) + ["id", "conversation_id", "question_id"]:
        if key and row.get(key) is not None:
            return {"id": str(row[key]), "messages": messages}
    return {"id": _stable_id(messages), "messages": messages}


def iter_rows(path: str, split: str = "train") -> Iterator[tuple]:
    """(where, row) for each row of a JSONL file (read here, so ``where`` is ``file:line``), a parquet file or
    a saved ``datasets`` directory; a row that is not a JSON object comes as a PromptFormatError instead."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.endswith((".jsonl", ".json")) and os.path.isfile(path):
        yield from iter_jsonl(path, PromptFormatError)
        return
    import datasets

    if path.endswith(".parquet"):
        ds = datasets.load_dataset("parquet", data_files=path, split="train")
    elif os.path.isdir(path):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
    else:
        raise PromptFormatError(f"{path}: not a .jsonl / .parquet file or a saved datasets directory")
    for i, row in enumerate(ds):
        yield f"{path}[{i}]", dict(row)


def iter_prompts(path: str, id_field: Optional[str] = None, split: str = "train") -> Iterator[tuple]:
    """(where, {"id", "messages"}) per row."""
    for where, row in iter_rows(path, split):
        if isinstance(row, Exception):
            raise row
        yield where, to_item(row, where, id_field)


def load_prompts(path: str, id_field: Optional[str] = None, limit: Optional[int] = None,
                 stats: Optional[dict] = None) -> list:
    """The prompts, each id once. The same prompt twice is asked once (counted in ``stats["duplicates"]``);
    one id for two different prompts is an error naming both lines (keeping either would drop the other)."""
    items, first = [], {}
    dups = 0
    for where, item in iter_prompts(path, id_field):
        seen = first.get(item["id"])
        if seen is not None:
            if seen[1] != item["messages"]:
                raise PromptFormatError(f"{where}: id {item['id']!r} is already used by {seen[0]} for a different "
                                        f"prompt (ids must be unique; --id-field picks another field)")
            dups += 1
            continue
        first[item["id"]] = (where, item["messages"])
        items.append(item)
        if limit and len(items) >= limit:
            break
    if stats is not None:
        stats["duplicates"] = dups
    return items

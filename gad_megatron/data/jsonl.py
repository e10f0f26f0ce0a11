"""JSONL files: the one reader of row files (train data, prompts, eval answers), and the resumable append-only
writer's pieces (recover a file an interrupted run left, lock it against a second writer)."""

from __future__ import annotations

import json
import os


def iter_jsonl(path: str, error=ValueError):
    """``(where, row)`` for every non-blank line of ``path`` (``where`` = ``file:line``). A line that is not a
    JSON object (bad JSON, bad UTF-8, a list...) comes as an ``error`` instance naming the file and line, so a
    caller can raise it or count and skip it and read on. Lines are decoded one by one: a bad byte spoils its
    line only."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield where, error(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})")
                continue
            except json.JSONDecodeError as e:
                yield where, error(f"{where}: not valid JSON ({e.msg})")
                continue
            yield where, row if isinstance(row, dict) else error(
                f"{where}: expected a JSON object, got {type(row).__name__}")


def read_jsonl(path: str, error=ValueError) -> list:
    """Every row of ``path``; the first bad line raises ``error`` naming it."""
    rows = []
    for _, row in iter_jsonl(path, error):
        if isinstance(row, Exception):
            raise row
        rows.append(row)
    return rows


def recover_output(path: str, on_row=None, repair: bool = True) -> tuple:
    """Ids already written and whether a torn last line was dropped.

    Only a last line without its final newline is torn (a kill mid-write); with ``repair`` the file is
    truncated to the end of the last whole line. Any whole line that is not a JSON object with an ``"id"`` is
    an error naming the line: the file is never shortened for it (it may not be ours at all).
    ``on_row(row)`` sees every whole row (e.g. to add up the ``usage`` already paid for)."""
    done, torn = set(), False
    if not os.path.exists(path):
        return done, torn
    with open(path, "rb") as f:
        data = f.read()
    good_end = 0
    for line_no, line in enumerate(data.splitlines(keepends=True), 1):
        if not line.endswith(b"\n"):
            torn = True
            break
        if line.strip():
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                row = None
            if not isinstance(row, dict) or "id" not in row:
                raise ValueError(f"{path}: line {line_no} is not a row (a JSON object with 'id'); not a gad-megatron "
                                 f"output, or edited by hand: fix or move the file")
            done.add(row["id"])
            if on_row is not None:
                on_row(row)
        good_end += len(line)
    if torn and repair:
        with open(path, "rb+") as f:
            f.truncate(good_end)
    return done, torn


class OutputBusy(RuntimeError):
    pass


def lock_output(f, path: str) -> None:
    """An exclusive lock on the open output: a second gad-collect on the same ``--out`` would pay for every
    prompt again."""
    import fcntl

    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OutputBusy(f"{path} is being written by another running gad-collect (it holds the lock); two runs "
                         f"on one output would pay twice for every prompt") from None

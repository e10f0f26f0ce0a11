"""``gad-collect``: teacher answers from an OpenAI-compatible endpoint, appended as the rows the trainer reads.

Row: ``{"id", "messages", "teacher_response", "model", "usage", "finish_reason"}`` (one JSON object per line).

- asyncio with a bound on requests in flight and on requests / tokens per minute;
- retries with exponential backoff + jitter on 429, 5xx, timeouts, connection drops, malformed replies and
  truncated streams, honouring Retry-After;
- resumable: ids already in the output (or in the ``.rejected.jsonl`` beside it) are never requested again;
  a torn last line (kill -9 mid-write) is dropped and reported; lines are written whole and flushed, fsync'd
  every ``fsync_every`` rows;
- cost tally from ``usage`` with a per-model price table and a ``--max-cost`` stop;
- the paper's filters (empty / refused answers, length limits) as explicit, counted options;
- the API key is read from the environment and never printed, logged or written.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import sys
from typing import Optional

from gad_megatron.data.jsonl import OutputBusy, lock_output, recover_output
from gad_megatron.data.openai_chat import (  # noqa: F401  (CollectConfig and the errors are this tool's API too)
    CollectConfig,
    FatalReply,
    RateLimiter,
    RequestFailed,
    RetryingChat,
    redact_key,
)
from gad_megatron.data.prompts import PromptFormatError, load_prompts
from gad_megatron.runtime.outputs import check_not_an_input, read_json

log = logging.getLogger("gad_megatron.collect")

REFUSAL_PATTERNS = (
    r"^\s*(i'?m sorry|i am sorry|sorry,)",
    r"^\s*i (can ?not|can't|won't|am unable to|'m unable to) (help|assist|comply|provide)",
    r"^\s*as an ai( language model)?,? i (can ?not|can't)",
)


def load_prices(path: str) -> dict:
    """The price table, checked whole before the first request: {model: {"input": $/1M, "output": $/1M}}."""
    table = read_json(path)
    if not isinstance(table, dict):
        raise ValueError(f"{path}: expected an object {{model: {{\"input\": $/1M tokens, \"output\": $/1M tokens}}}}")
    for model, p in table.items():
        if not isinstance(p, dict) or set(p) != {"input", "output"}:
            raise ValueError(f"{path}: {model!r} must be {{\"input\": number, \"output\": number}} ($ per 1M tokens)")
        for k, v in p.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
                raise ValueError(f"{path}: {model!r}.{k} = {v!r} is not a non-negative number")
    return table


class Collector:
    def __init__(self, cfg: CollectConfig, out_path: str):
        self.cfg = cfg
        self.out_path = out_path
        self.rejected_path = out_path + ".rejected.jsonl"
        self.counts = {"written": 0, "skipped_done": 0, "retries": 0, "failed": 0, "filtered_empty": 0,
                       "filtered_refusal": 0, "filtered_too_short": 0, "filtered_too_long": 0,
                       "stopped_by_cost": 0, "torn_line_dropped": 0}
        self.cost = 0.0  # spent, this run and earlier runs on this output (seeded from their rows' usage)
        self.cost_before = 0.0
        self.reserved = 0.0  # the worst-case cost of the requests in flight
        self.tokens = {"prompt": 0, "completion": 0}
        self._refusal = [re.compile(p, re.IGNORECASE) for p in REFUSAL_PATTERNS]
        if cfg.max_cost is not None:
            if cfg.model not in cfg.prices:
                raise ValueError(f"--max-cost needs the price of {cfg.model!r} (--prices): without it nothing can "
                                 f"be counted against the cap")
            if not cfg.max_tokens:
                raise ValueError("--max-cost needs --max-tokens: each request's cost is reserved at its worst case "
                                 "(prompt + max-tokens) before it is sent, so the cap holds at any concurrency")

    # -- pieces --------------------------------------------------------------------------------------------
    def price(self, usage: dict) -> float:
        p = self.cfg.prices.get(self.cfg.model)
        if p is None:
            return 0.0
        return (int(usage.get("prompt_tokens", 0) or 0) * p["input"]
                + int(usage.get("completion_tokens", 0) or 0) * p["output"]) / 1e6

    def worst_case_cost(self, messages: list) -> float:
        """An upper bound of one request's cost: byte-level BPE never makes more tokens than UTF-8 bytes, plus
        the chat template's few tokens per message; the answer is at most ``max_tokens``."""
        prompt = sum(len(m["content"].encode("utf-8")) + 8 for m in messages) + 8
        return self.price({"prompt_tokens": prompt, "completion_tokens": self.cfg.max_tokens or 0})

    def filter_reason(self, text: str) -> Optional[str]:
        if self.cfg.drop_empty and not text.strip():
            return "filtered_empty"
        if self.cfg.drop_refusals and any(r.search(text) for r in self._refusal):
            return "filtered_refusal"
        if self.cfg.min_chars and len(text) < self.cfg.min_chars:
            return "filtered_too_short"
        if self.cfg.max_chars and len(text) > self.cfg.max_chars:
            return "filtered_too_long"
        return None

    # -- the run -------------------------------------------------------------------------------------------
    async def run(self, items: list) -> dict:
        out = open(self.out_path, "a", encoding="utf-8")
        try:
            lock_output(out, self.out_path)
            return await self._run_locked(items, out)
        finally:
            out.close()

    async def _run_locked(self, items: list, out) -> dict:
        todo = self._resume(items)
        run = _Run(self, out, todo)
        try:
            await run.all(todo)
        finally:
            await run.close()
        if run.interrupted:
            raise KeyboardInterrupt
        return {**self.counts, "cost": round(self.cost, 6), "cost_this_run": round(self.cost - self.cost_before, 6),
                "tokens": self.tokens}

    def _resume(self, items: list) -> list:
        """What earlier runs on this output did: their rows' cost seeds the tally; their ids are not asked again."""
        def seed(row):
            self.cost_before += self.price(row.get("usage") or {})

        done, torn = recover_output(self.out_path, on_row=seed)
        rejected, torn_r = recover_output(self.rejected_path, on_row=seed)
        self.cost = self.cost_before
        if torn or torn_r:
            self.counts["torn_line_dropped"] = int(torn) + int(torn_r)
            log.warning("dropped a torn last line left by an interrupted run (%s)", self.out_path if torn else self.rejected_path)
        if self.cost_before:
            log.info("earlier runs on %s spent %.4f (counted against --max-cost)", self.out_path, self.cost_before)
        todo = [it for it in items if it["id"] not in done and it["id"] not in rejected]
        self.counts["skipped_done"] = len(items) - len(todo)
        return todo


class _Run:
    """One run's moving parts: the client, the two output files, the cost reservations, the workers."""

    def __init__(self, c: Collector, out, todo: list):
        self.c, self.cfg, self.out = c, c.cfg, out
        self.chat = RetryingChat(self.cfg)
        self.client = self.chat.client()
        self.limiter = RateLimiter(self.cfg.requests_per_minute, self.cfg.tokens_per_minute)
        self.stop = asyncio.Event()
        self.budget = asyncio.Condition()
        self.rej = open(c.rejected_path, "a", encoding="utf-8")
        self.since_sync = 0
        self.interrupted = False
        self.tasks = []
        self.bar = None
        if self.cfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=len(todo), desc="gad-collect", unit="req", file=sys.stderr, dynamic_ncols=True)

    def write(self, f, row) -> None:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")  # one whole line per write
        f.flush()
        self.since_sync += 1
        if self.since_sync >= self.cfg.fsync_every:
            os.fsync(self.out.fileno())
            os.fsync(self.rej.fileno())
            self.since_sync = 0

    async def reserve(self, item) -> Optional[float]:
        """Reserves the request's worst-case cost against the cap, waiting for requests in flight to settle
        when it does not fit yet; None when it cannot fit even with nothing in flight (the run stops)."""
        if self.cfg.max_cost is None:
            return 0.0
        c, worst = self.c, self.c.worst_case_cost(item["messages"])
        async with self.budget:
            while not self.stop.is_set() and c.cost + c.reserved + worst > self.cfg.max_cost:
                if c.reserved == 0:
                    log.warning("spent %.4f: the next request could pass --max-cost %.4f; stopping", c.cost,
                                self.cfg.max_cost)
                    self.stop.set()
                    self.budget.notify_all()
                    break
                await self.budget.wait()
            if self.stop.is_set():
                return None
            c.reserved += worst
        return worst

    async def settle(self, worst: float) -> None:
        if self.cfg.max_cost is not None:
            async with self.budget:
                self.c.reserved -= worst
                self.budget.notify_all()

    async def one(self, item) -> None:
        c = self.c
        if self.stop.is_set():
            if not self.interrupted:
                c.counts["stopped_by_cost"] += 1
            return
        est = sum(len(m["content"]) for m in item["messages"]) // 4 + (self.cfg.max_tokens or 512)
        await self.limiter.acquire(est)
        worst = await self.reserve(item)
        if worst is None:
            c.counts["stopped_by_cost"] += 1
            return
        try:
            got = await self.chat.ask(self.client, item["messages"])
        except RequestFailed:
            got = None
        except BaseException:
            await self.settle(worst)
            raise
        c.counts["retries"] = self.chat.retries
        if got is None:
            c.counts["failed"] += 1
            await self.settle(worst)
        else:
            await self.record(item, got, est, worst)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(cost=f"${c.cost:.4f}", retries=self.chat.retries, refresh=False)

    async def record(self, item, got, est: int, worst: float) -> None:
        c = self.c
        text, finish, usage, model = got
        reason = c.filter_reason(text)
        row = {"id": item["id"], "messages": item["messages"], "teacher_response": text, "model": model,
               "usage": usage, "finish_reason": finish}
        # A paid answer is written first, then accounted: nothing after the reply can lose it.
        if reason:
            c.counts[reason] += 1
            self.write(self.rej, {**row, "rejected": reason})
        else:
            c.counts["written"] += 1
            self.write(self.out, row)
        self.limiter.settle(est, int(usage.get("total_tokens", est) or est))
        c.cost += c.price(usage)
        await self.settle(worst)  # the real cost replaces the reservation in one step
        c.tokens["prompt"] += int(usage.get("prompt_tokens", 0) or 0)
        c.tokens["completion"] += int(usage.get("completion_tokens", 0) or 0)

    def on_interrupt(self) -> None:
        # Ctrl-C: no new request, the ones in flight are cancelled. (Left to asyncio's default, the
        # cancellation can be swallowed inside the HTTP client and the run would simply go on.)
        self.interrupted = True
        self.stop.set()
        for task in self.tasks:
            task.cancel()

    async def all(self, todo: list) -> None:
        queue = iter(todo)

        async def worker():
            # max_in_flight workers pull prompts: memory stays flat however many prompts there are.
            for item in queue:
                await self.one(item)

        self.tasks = [asyncio.ensure_future(worker()) for _ in range(max(1, min(self.cfg.max_in_flight, len(todo))))]
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGINT, self.on_interrupt)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread / no signals here
            pass
        try:
            results = await asyncio.gather(*self.tasks, return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                    raise r
        finally:
            try:
                loop.remove_signal_handler(signal.SIGINT)
            except (NotImplementedError, RuntimeError, ValueError):
                pass

    async def close(self) -> None:
        self.out.flush(), self.rej.flush()
        os.fsync(self.out.fileno()), os.fsync(self.rej.fileno())
        self.rej.close()
        if self.bar is not None:
            self.bar.close()
        await self.client.close()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gad-collect", description="Collect black-box teacher answers.")
    p.add_argument("--prompts", required=True, help=".jsonl / .parquet / saved datasets dir (LMSYS or 'prompt' rows)")
    p.add_argument("--out", required=True, help="JSONL the trainer reads (appended; resumable)")
    p.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"))
    p.add_argument("--model", default=os.environ.get("GAD_TEACHER_MODEL", "gpt-5-chat-latest"))
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="name of the variable holding the key")
    p.add_argument("--id-field", default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max-in-flight", type=int, default=16)
    p.add_argument("--rpm", type=float, default=0.0)
    p.add_argument("--tpm", type=float, default=0.0)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--max-retries", type=int, default=8)
    p.add_argument("--backoff-base", type=float, default=0.5)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--prices", default=None, help='JSON file: {"model": {"input": $/1M, "output": $/1M}}')
    p.add_argument("--max-cost", type=float, default=None)
    p.add_argument("--keep-empty", action="store_true")
    p.add_argument("--drop-refusals", action="store_true")
    p.add_argument("--min-chars", type=int, default=0)
    p.add_argument("--max-chars", type=int, default=0)
    p.add_argument("--fsync-every", type=int, default=32)
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "openai"):  # one INFO line per request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    items = []
    try:
        # Everything that can be wrong with the input is found before the first (paid) request.
        check_not_an_input(a.out, {"--prompts": a.prompts, "--prices": a.prices})
        check_not_an_input(a.out + ".rejected.jsonl", {"--prompts": a.prompts})
        prices = load_prices(a.prices) if a.prices else {}
        cfg = CollectConfig(
            base_url=a.base_url, model=a.model, api_key_env=a.api_key_env, max_in_flight=a.max_in_flight,
            requests_per_minute=a.rpm, tokens_per_minute=a.tpm, max_tokens=a.max_tokens, temperature=a.temperature,
            timeout_s=a.timeout, max_retries=a.max_retries, backoff_base_s=a.backoff_base, stream=a.stream,
            prices=prices, max_cost=a.max_cost, drop_empty=not a.keep_empty, drop_refusals=a.drop_refusals,
            min_chars=a.min_chars, max_chars=a.max_chars, fsync_every=a.fsync_every, progress=not a.no_progress,
        )
        if prices and a.model not in prices:
            log.warning("no price for model %s in %s: its cost counts as 0", a.model, a.prices)
        stats: dict = {}
        items = load_prompts(a.prompts, a.id_field, a.limit, stats=stats)
        collector = Collector(cfg, a.out)
        summary = asyncio.run(collector.run(items))
    except (PromptFormatError, FatalReply, ValueError, OSError, OutputBusy) as e:
        print(f"gad-collect: error: {redact_key(str(e), a.api_key_env)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gad-collect: interrupted: every answer received is written; run the same command to resume",
              file=sys.stderr)
        return 130
    print(json.dumps({"prompts": len(items), "duplicate_prompts_skipped": stats.get("duplicates", 0), **summary}))
    answered = summary["written"] + sum(v for k, v in summary.items() if k.startswith("filtered_"))
    if summary["failed"] and not answered:
        print(f"gad-collect: error: all {summary['failed']} requests failed; nothing was collected", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

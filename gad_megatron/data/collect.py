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
import random
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

log = logging.getLogger("gad_megatron.collect")

REFUSAL_PATTERNS = (
    r"^\s*(i'?m sorry|i am sorry|sorry,)",
    r"^\s*i (can ?not|can't|won't|am unable to|'m unable to) (help|assist|comply|provide)",
    r"^\s*as an ai( language model)?,? i (can ?not|can't)",
)


@dataclass
class CollectConfig:
    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    max_in_flight: int = 16
    requests_per_minute: float = 0.0  # 0: unlimited
    tokens_per_minute: float = 0.0
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    timeout_s: float = 120.0
    max_retries: int = 8
    backoff_base_s: float = 0.5
    backoff_max_s: float = 60.0
    stream: bool = False
    prices: dict = field(default_factory=dict)  # model -> {"input": $/1M tokens, "output": $/1M tokens}
    max_cost: Optional[float] = None
    drop_empty: bool = True
    drop_refusals: bool = False
    min_chars: int = 0
    max_chars: int = 0  # 0: no limit
    fsync_every: int = 32
    progress: bool = True


class RetryableReply(Exception):
    """A reply that arrived but cannot be used (malformed, truncated): ask again."""


class FatalReply(Exception):
    """A reply that asking again will not fix (bad request, bad key)."""


class RateLimiter:
    """Requests-per-minute and tokens-per-minute budgets (token buckets refilled continuously)."""

    def __init__(self, rpm: float, tpm: float):
        self.rpm, self.tpm = rpm, tpm
        self._req = rpm
        self._tok = tpm
        self._t = time.monotonic()
        self._lock = asyncio.Lock()

    def _refill(self):
        now = time.monotonic()
        dt, self._t = now - self._t, now
        if self.rpm:
            self._req = min(self.rpm, self._req + dt * self.rpm / 60.0)
        if self.tpm:
            self._tok = min(self.tpm, self._tok + dt * self.tpm / 60.0)

    async def acquire(self, est_tokens: int):
        if not (self.rpm or self.tpm):
            return
        async with self._lock:
            while True:
                self._refill()
                ok_r = not self.rpm or self._req >= 1
                ok_t = not self.tpm or self._tok >= min(est_tokens, self.tpm)
                if ok_r and ok_t:
                    self._req -= 1 if self.rpm else 0
                    self._tok -= est_tokens if self.tpm else 0
                    return
                need = 0.0
                if not ok_r:
                    need = max(need, (1 - self._req) * 60.0 / self.rpm)
                if not ok_t:
                    need = max(need, (min(est_tokens, self.tpm) - self._tok) * 60.0 / self.tpm)
                await asyncio.sleep(max(need, 0.001))

    def settle(self, est_tokens: int, actual_tokens: int):
        if self.tpm:
            self._tok += est_tokens - actual_tokens  # refund / charge the estimate's error


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


class RequestFailed(Exception):
    """Asking again did not help (retries exhausted) or cannot help (a bad request); ``str`` says why."""


def describe_error(err: BaseException, key_env: str = "OPENAI_API_KEY") -> str:
    """What went wrong, named by its root cause: the openai client reports a refused connection as a
    timeout; the chain of causes says what really happened."""
    chain, x = [], err
    while x is not None and len(chain) < 8:
        chain.append(x)
        x = x.__cause__ or x.__context__
    for x in chain:
        if isinstance(x, ConnectionRefusedError):
            return f"connection refused ({_safe(str(x), key_env)[:160]})"
    for x in chain:
        if isinstance(x, OSError) and not isinstance(x, TimeoutError) and x.errno is not None:
            return f"connection failed: {_safe(str(x), key_env)[:160]}"
    return f"{type(err).__name__}: {_safe(str(err), key_env)[:200]}"


def load_prices(path: str) -> dict:
    """The price table, checked whole before the first request: {model: {"input": $/1M, "output": $/1M}}."""
    from gad_megatron.runtime.outputs import read_json

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


class RetryingChat:
    """Chat completions with our own retry policy (backoff + jitter, Retry-After, malformed / truncated replies
    asked again); shared by gad-collect and the gad-eval judge. The key stays inside the openai client."""

    def __init__(self, cfg: "CollectConfig"):
        self.cfg = cfg
        self.retries = 0

    def client(self):
        from openai import AsyncOpenAI

        key = os.environ.get(self.cfg.api_key_env)
        if not key:
            raise FatalReply(f"environment variable {self.cfg.api_key_env} is not set (it holds the API key)")
        # Retries are ours (they honour Retry-After and count); the client must not retry on its own.
        kw = {}
        try:
            # The aiohttp transport costs a fraction of httpx's CPU per request: at high concurrency on a small
            # machine the client, not the server, was the bottleneck (benchmarks/collect.py).
            from openai import DefaultAioHttpClient

            kw["http_client"] = DefaultAioHttpClient(timeout=self.cfg.timeout_s)
        except (ImportError, RuntimeError):
            pass
        return AsyncOpenAI(base_url=self.cfg.base_url, api_key=key, max_retries=0, timeout=self.cfg.timeout_s, **kw)

    async def _ask_once(self, client, messages: list) -> tuple:
        kw = {"model": self.cfg.model, "messages": messages}
        if self.cfg.max_tokens:
            kw["max_tokens"] = self.cfg.max_tokens
        if self.cfg.temperature is not None:
            kw["temperature"] = self.cfg.temperature
        if not self.cfg.stream:
            resp = await client.chat.completions.create(**kw)
            if not getattr(resp, "choices", None) or resp.choices[0].message is None:
                raise RetryableReply("reply without choices")
            text = resp.choices[0].message.content
            if text is None:
                raise RetryableReply("reply without content")
            usage = resp.usage.model_dump() if resp.usage else {}
            return text, resp.choices[0].finish_reason, usage, resp.model or self.cfg.model
        stream = await client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
        parts, finish, usage, model = [], None, {}, self.cfg.model
        async for chunk in stream:
            model = chunk.model or model
            if chunk.usage:
                usage = chunk.usage.model_dump()
            for ch in chunk.choices or []:
                if ch.delta and ch.delta.content:
                    parts.append(ch.delta.content)
                if ch.finish_reason:
                    finish = ch.finish_reason
        if finish is None:
            raise RetryableReply("stream ended without a finish_reason (truncated)")
        return "".join(parts), finish, usage, model

    def _retry_delay(self, attempt: int, err: Exception) -> float:
        retry_after = None
        resp = getattr(err, "response", None)
        if resp is not None:
            ra = resp.headers.get("retry-after") if hasattr(resp, "headers") else None
            try:
                retry_after = float(ra) if ra is not None else None
            except ValueError:
                retry_after = None
        if retry_after is not None:
            return retry_after + random.uniform(0, 0.1 * retry_after + 0.01)
        base = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * (2 ** attempt))
        return random.uniform(0.5 * base, base)  # jitter

    @staticmethod
    def _classify(err: Exception) -> str:
        import openai

        if isinstance(err, RetryableReply):
            return "retry"
        if isinstance(err, openai.APIStatusError):
            if err.status_code == 429 or err.status_code >= 500 or err.status_code == 408:
                return "retry"
            return "fatal_request" if err.status_code in (400, 404, 413, 422) else "fatal_run"
        if isinstance(err, (openai.APITimeoutError, openai.APIConnectionError, openai.APIResponseValidationError,
                            json.JSONDecodeError)):
            return "retry"
        if type(err).__module__.startswith(("httpx", "httpcore", "h11")):
            return "retry"
        return "fatal_run"

    async def ask(self, client, messages: list) -> tuple:
        """(text, finish_reason, usage, model), or RequestFailed."""
        for attempt in range(self.cfg.max_retries + 1):
            try:
                return await self._ask_once(client, messages)
            except Exception as err:  # noqa: BLE001  (classified below; unknown errors stop the run)
                kind = self._classify(err)
                if kind == "fatal_run":
                    raise FatalReply(f"{type(err).__name__}: {_safe(str(err), self.cfg.api_key_env)}") from None
                if kind == "fatal_request" or attempt == self.cfg.max_retries:
                    why = describe_error(err, self.cfg.api_key_env)
                    log.warning("giving up on a request after %d attempts: %s", attempt + 1, why)
                    raise RequestFailed(f"{why} (after {attempt + 1} attempts)") from None
                self.retries += 1
                await asyncio.sleep(self._retry_delay(attempt, err))
        raise RequestFailed("no attempt made (max_retries < 0)")


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
        chat = RetryingChat(self.cfg)
        client = chat.client()
        limiter = RateLimiter(self.cfg.requests_per_minute, self.cfg.tokens_per_minute)
        stop = asyncio.Event()
        rej = open(self.rejected_path, "a", encoding="utf-8")
        since_sync = 0
        bar = None
        if self.cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc="gad-collect", unit="req", file=sys.stderr, dynamic_ncols=True)

        def write(f, row):
            nonlocal since_sync
            f.write(json.dumps(row, ensure_ascii=False) + "\n")  # one whole line per write
            f.flush()
            since_sync += 1
            if since_sync >= self.cfg.fsync_every:
                os.fsync(out.fileno())
                os.fsync(rej.fileno())
                since_sync = 0

        budget = asyncio.Condition()

        async def reserve(item) -> Optional[float]:
            """Reserves the request's worst-case cost against the cap, waiting for requests in flight to settle
            when it does not fit yet; None when it cannot fit even with nothing in flight (the run stops)."""
            if self.cfg.max_cost is None:
                return 0.0
            worst = self.worst_case_cost(item["messages"])
            async with budget:
                while not stop.is_set() and self.cost + self.reserved + worst > self.cfg.max_cost:
                    if self.reserved == 0:
                        log.warning("spent %.4f: the next request could pass --max-cost %.4f; stopping", self.cost,
                                    self.cfg.max_cost)
                        stop.set()
                        budget.notify_all()
                        break
                    await budget.wait()
                if stop.is_set():
                    return None
                self.reserved += worst
            return worst

        async def settle(worst: float):
            if self.cfg.max_cost is not None:
                async with budget:
                    self.reserved -= worst
                    budget.notify_all()

        interrupted = False

        async def one(item):
            if stop.is_set():
                if not interrupted:
                    self.counts["stopped_by_cost"] += 1
                return
            est = sum(len(m["content"]) for m in item["messages"]) // 4 + (self.cfg.max_tokens or 512)
            await limiter.acquire(est)
            worst = await reserve(item)
            if worst is None:
                self.counts["stopped_by_cost"] += 1
                return
            try:
                got = await chat.ask(client, item["messages"])
            except RequestFailed:
                got = None
            except BaseException:
                await settle(worst)
                raise
            self.counts["retries"] = chat.retries
            if got is None:
                self.counts["failed"] += 1
                await settle(worst)
            else:
                text, finish, usage, model = got
                reason = self.filter_reason(text)
                row = {"id": item["id"], "messages": item["messages"], "teacher_response": text, "model": model,
                       "usage": usage, "finish_reason": finish}
                # A paid answer is written first, then accounted: nothing after the reply can lose it.
                if reason:
                    self.counts[reason] += 1
                    write(rej, {**row, "rejected": reason})
                else:
                    self.counts["written"] += 1
                    write(out, row)
                limiter.settle(est, int(usage.get("total_tokens", est) or est))
                self.cost += self.price(usage)
                await settle(worst)  # the real cost replaces the reservation in one step
                self.tokens["prompt"] += int(usage.get("prompt_tokens", 0) or 0)
                self.tokens["completion"] += int(usage.get("completion_tokens", 0) or 0)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(cost=f"${self.cost:.4f}", retries=chat.retries, refresh=False)

        queue = iter(todo)

        async def worker():
            # max_in_flight workers pull prompts: memory stays flat however many prompts there are.
            for item in queue:
                await one(item)

        tasks = [asyncio.ensure_future(worker()) for _ in range(max(1, min(self.cfg.max_in_flight, len(todo))))]

        def on_interrupt():
            # Ctrl-C: no new request, the ones in flight are cancelled. (Left to asyncio's default, the
            # cancellation can be swallowed inside the HTTP client and the run would simply go on.)
            nonlocal interrupted
            interrupted = True
            stop.set()
            for task in tasks:
                task.cancel()

        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGINT, on_interrupt)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread / no signals here
            pass
        try:
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                    raise r
        finally:
            try:
                loop.remove_signal_handler(signal.SIGINT)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
            out.flush(), rej.flush()
            os.fsync(out.fileno()), os.fsync(rej.fileno())
            rej.close()
            if bar is not None:
                bar.close()
            await client.close()
        if interrupted:
            raise KeyboardInterrupt
        return {**self.counts, "cost": round(self.cost, 6), "cost_this_run": round(self.cost - self.cost_before, 6),
                "tokens": self.tokens}


def _safe(text: str, key_env: str = "OPENAI_API_KEY") -> str:
    """Error texts can echo request headers; never let the key through (the configured variable's too)."""
    for name in {"OPENAI_API_KEY", key_env}:
        key = os.environ.get(name)
        if key:
            text = text.replace(key, "***")
    return re.sub(r"(Bearer\s+)\S+", r"\1***", text)


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
    from gad_megatron.data.prompts import PromptFormatError, load_prompts
    from gad_megatron.runtime.outputs import check_not_an_input

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
        print(f"gad-collect: error: {_safe(str(e), a.api_key_env)}", file=sys.stderr)
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

"""Chat completions from an OpenAI-compatible endpoint with our own retry policy: the client gad-collect and the
gad-eval judge share (backoff + jitter, Retry-After, malformed / truncated replies asked again, rate limits).
The API key is read from the environment, stays inside the openai client and is redacted from every error."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import time
from dataclasses import dataclass, field
from typing import Optional

log = logging.getLogger("gad_megatron.collect")


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
            return f"connection refused ({redact_key(str(x), key_env)[:160]})"
    for x in chain:
        if isinstance(x, OSError) and not isinstance(x, TimeoutError) and x.errno is not None:
            return f"connection failed: {redact_key(str(x), key_env)[:160]}"
    return f"{type(err).__name__}: {redact_key(str(err), key_env)[:200]}"


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
                    raise FatalReply(f"{type(err).__name__}: {redact_key(str(err), self.cfg.api_key_env)}") from None
                if kind == "fatal_request" or attempt == self.cfg.max_retries:
                    why = describe_error(err, self.cfg.api_key_env)
                    log.warning("giving up on a request after %d attempts: %s", attempt + 1, why)
                    raise RequestFailed(f"{why} (after {attempt + 1} attempts)") from None
                self.retries += 1
                await asyncio.sleep(self._retry_delay(attempt, err))
        raise RequestFailed("no attempt made (max_retries < 0)")


def redact_key(text: str, key_env: str = "OPENAI_API_KEY") -> str:
    """Error texts can echo request headers; never let the key through (the configured variable's too)."""
    for name in {"OPENAI_API_KEY", key_env}:
        key = os.environ.get(name)
        if key:
            text = text.replace(key, "***")
    return re.sub(r"(Bearer\s+)\S+", r"\1***", text)

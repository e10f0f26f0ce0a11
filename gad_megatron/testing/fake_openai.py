"""A small, real OpenAI-compatible chat-completions server for tests and benchmarks (aiohttp, 127.0.0.1).

Answers deterministically ("teacher answer to: <last user message>"), counts requests per prompt, and can
inject faults: 429 with Retry-After, 500, a hang past the client's timeout, malformed JSON, and a truncated
stream. Faults are planned per prompt: the first k requests for a prompt fail (cycling through the kinds)
when the prompt's text contains ``[fault:k]``, or for every prompt with ``--fault-first k``.

Judge mode: when the system message asks for a reference answer or for scores (the judge prompts of
``gad_megatron.eval``), it answers in the judge formats, so gad-eval can be tested end to end.

    python -m gad_megatron.testing.fake_openai --port 8123 [--fault-first 0] [--latency-ms 0] [--max-rps 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import time
from collections import Counter

from gad_megatron.eval import judge_prompts as J

FAULT_KINDS = ("429", "500", "timeout", "malformed", "truncated")


class FakeOpenAI:
    def __init__(self, fault_first: int = 0, latency_ms: float = 0.0, hang_s: float = 30.0, max_rps: float = 0.0,
                 judge_garbage_first: int = 0, hold_file: str = ""):
        self.fault_first = fault_first
        # While this file exists every request waits before answering: a test can keep a client mid-run for
        # exactly as long as it needs (a latency only makes that likely, and a loaded machine beats it).
        self.hold_file = hold_file
        self.latency = latency_ms / 1000.0
        self.hang_s = hang_s
        self.max_rps = max_rps
        self.judge_garbage_first = judge_garbage_first
        self.requests = Counter()  # prompt text -> requests received
        self.successes = Counter()  # prompt text -> successful answers
        self.total = 0
        self.auth_headers = set()
        self._next_slot = 0.0

    # -- planning --------------------------------------------------------------------------------------
    def _fault_for(self, prompt: str, attempt: int):
        m = re.search(r"\[fault:(\d+)\]", prompt)
        k = int(m.group(1)) if m else self.fault_first
        if attempt < k:
            return FAULT_KINDS[attempt % len(FAULT_KINDS)]
        return None

    async def _pace(self):
        if self.max_rps <= 0:
            return
        now = time.monotonic()
        slot = max(now, self._next_slot)
        self._next_slot = slot + 1.0 / self.max_rps
        await asyncio.sleep(slot - now)

    # -- answers ---------------------------------------------------------------------------------------
    @staticmethod
    def _system(body: dict) -> str:
        return next((m["content"] for m in body.get("messages", []) if m.get("role") == "system"), "")

    def _answer(self, body: dict, prompt: str) -> str:
        system = self._system(body)
        if system == J.REFERENCE_SYSTEM:
            return f"reference answer to: {prompt}"
        if system == J.SCORE_SYSTEM:
            n = self.successes[("score", prompt)]
            if n < self.judge_garbage_first or "[judge-garbage]" in prompt:
                return "I cannot decide."
            m = re.search(r"\[want:(\d+(?:\.\d+)?),(\d+(?:\.\d+)?)\]", prompt)
            a, b = (m.group(1), m.group(2)) if m else ("7", "8")
            return f"The first answer is fine.\nScore A: {a}\nScore B: {b}"
        if "[empty]" in prompt:
            return ""
        if "[refuse]" in prompt:
            return "I'm sorry, I can't help with that."
        return f"teacher answer to: {prompt}"

    async def handle(self, request):
        from aiohttp import web

        body = await request.json()
        msgs = body.get("messages", [])
        prompt = next((m["content"] for m in reversed(msgs) if m.get("role") == "user"), "")
        self.auth_headers.add(request.headers.get("Authorization", ""))
        attempt = self.requests[prompt]
        self.requests[prompt] += 1
        self.total += 1
        while self.hold_file and os.path.exists(self.hold_file):
            await asyncio.sleep(0.02)
        await self._pace()
        if self.latency:
            await asyncio.sleep(self.latency)
        fault = self._fault_for(prompt, attempt)
        stream = bool(body.get("stream"))
        if fault == "429":
            return web.json_response({"error": {"message": "rate limited", "type": "rate_limit"}}, status=429,
                                     headers={"Retry-After": "0.05"})
        if fault == "500":
            return web.json_response({"error": {"message": "boom", "type": "server_error"}}, status=500)
        if fault == "timeout":
            await asyncio.sleep(self.hang_s)
        if fault == "malformed" and not stream:
            return web.Response(text='{"id": "x", "choices": [', content_type="application/json")
        text = self._answer(body, prompt)

        key = ("score", prompt) if self._system(body) == J.SCORE_SYSTEM else prompt
        model = body.get("model", "fake-teacher")
        usage = {"prompt_tokens": len(prompt.split()) + 3, "completion_tokens": len(text.split()),
                 "total_tokens": len(prompt.split()) + 3 + len(text.split())}
        if stream:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            words = text.split(" ")
            for i, w in enumerate(words):
                chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": model,
                         "choices": [{"index": 0, "delta": {"content": w if i == 0 else " " + w}, "finish_reason": None}]}
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
                if fault in ("truncated", "malformed") and i == len(words) // 2:
                    # Connection drops mid-answer: no finish_reason, no [DONE].
                    request.transport.close() if request.transport else None
                    return resp
            last = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": model,
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": usage}
            await resp.write(f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n".encode())
            await resp.write_eof()
            self.successes[key] += 1
            return resp
        if fault == "truncated":
            full = json.dumps({"id": "x", "choices": [{"message": {"content": text}}]})
            return web.Response(text=full[: len(full) // 2], content_type="application/json")
        self.successes[key] += 1
        return web.json_response({
            "id": "cmpl-1", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": usage,
        })

    async def stats(self, request):
        from aiohttp import web

        return web.json_response({"total": self.total, "requests": dict(self.requests), "auth": sorted(self.auth_headers),
                                  "successes": {str(k): v for k, v in self.successes.items()}})

    def app(self):
        from aiohttp import web

        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        app.router.add_get("/stats", self.stats)
        return app


def main() -> None:
    from aiohttp import web

    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--fault-first", type=int, default=0)
    ap.add_argument("--latency-ms", type=float, default=0.0)
    ap.add_argument("--hang-s", type=float, default=30.0)
    ap.add_argument("--max-rps", type=float, default=0.0)
    ap.add_argument("--judge-garbage-first", type=int, default=0)
    ap.add_argument("--hold-file", default="", help="requests wait while this file exists")
    a = ap.parse_args()
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("the fake server binds to loopback only")
    srv = FakeOpenAI(a.fault_first, a.latency_ms, a.hang_s, a.max_rps, a.judge_garbage_first, a.hold_file)
    app = srv.app()
    app.on_startup.append(_exit_with_parent)
    web.run_app(app, host=a.host, port=a.port, print=lambda *_: print(f"ready on {a.host}:{a.port}", flush=True))


async def _exit_with_parent(app) -> None:
    """A test started this server in a session of its own: if the test's process dies (a timeout, a killed
    worker) before stopping it, nothing else would; it exits once it has been handed to another parent."""
    parent = os.getppid()

    async def watch():
        while os.getppid() == parent:
            await asyncio.sleep(0.5)
        os._exit(0)

    app["parent_watch"] = asyncio.get_running_loop().create_task(watch())


if __name__ == "__main__":
    main()

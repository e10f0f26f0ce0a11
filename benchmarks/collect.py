#!/usr/bin/env python
"""gad-collect throughput against the local fake OpenAI server at concurrency 1, 8 and 64, next to a bare
aiohttp client, measured side by side in one run.

The server answers after a fixed latency (default 20 ms) and serves at most --max-rps requests/s (an API's
rate limit), so its own limit at concurrency c is min(c / latency, max_rps). Goal (issue 4): gad-collect
>= 90 % of that limit, i.e. the client is not the bottleneck. The bare client shows what this machine's CPU
allows a minimal client (the server shares the machine's 2 cores).

    python benchmarks/collect.py [--latency-ms 20] [--max-rps 300] [--requests 400]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def bare_client(url: str, prompts: list, concurrency: int) -> float:
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer bench"}) as s:
        async def one(p):
            async with sem:
                async with s.post(url + "/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": p}]}) as r:
                    await r.json()

        t0 = time.perf_counter()
        await asyncio.gather(*(one(p) for p in prompts))
        return time.perf_counter() - t0


def collector(url: str, prompts: list, concurrency: int, out: str) -> float:
    from gad_megatron.data.collect import CollectConfig, Collector

    os.environ["BENCH_KEY"] = "bench"
    cfg = CollectConfig(base_url=url, model="m", api_key_env="BENCH_KEY", max_in_flight=concurrency, progress=False,
                        fsync_every=64)
    items = [{"id": f"{concurrency}-{i}", "messages": [{"role": "user", "content": p}]} for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    summary = asyncio.run(Collector(cfg, out).run(items))
    dt = time.perf_counter() - t0
    assert summary["written"] == len(prompts), summary
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--max-rps", type=float, default=300.0)
    ap.add_argument("--requests", type=int, default=400)
    a = ap.parse_args()
    port = free_port()
    srv = subprocess.Popen([sys.executable, "-m", "gad_megatron.testing.fake_openai", "--port", str(port),
                            "--latency-ms", str(a.latency_ms), "--max-rps", str(a.max_rps)], env={**os.environ, "PYTHONPATH": ROOT},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        work = tempfile.mkdtemp(prefix="gad-bench-collect-")
        # Warm-up outside the timings: imports, first connections.
        asyncio.run(bare_client(url, [f"warm {i}" for i in range(20)], 4))
        collector(url, [f"warm {i}" for i in range(20)], 4, os.path.join(work, "warm.jsonl"))
        print(f"server latency {a.latency_ms:.0f} ms; requests per measurement: 1x{a.requests // 5}, "
              f"8x{a.requests}, 64x{a.requests * 4}")
        print(f"{'concurrency':>11} {'server limit':>12} {'bare req/s':>11} {'gad-collect req/s':>18} "
              f"{'vs limit':>9} {'vs bare':>8}")
        for c in (1, 8, 64):
            n = {1: a.requests // 5, 8: a.requests, 64: a.requests * 4}[c]
            base = asyncio.run(bare_client(url, [f"bare {c} {i}" for i in range(n)], c))
            ours = collector(url, [f"ours {c} {i}" for i in range(n)], c, os.path.join(work, f"c{c}.jsonl"))
            limit = min(c / (a.latency_ms / 1000.0), a.max_rps) if a.max_rps else c / (a.latency_ms / 1000.0)
            print(f"{c:>11} {limit:12.1f} {n / base:11.1f} {n / ours:18.1f} {n / ours / limit:9.2f} {base / ours:8.2f}")
        print(json.dumps({"goal": "gad-collect >= 0.9 x server limit"}))
    finally:
        os.killpg(srv.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()

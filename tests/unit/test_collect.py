"""gad-collect against a real local HTTP server that injects faults; resumability across kill -9."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import KEY, ROOT, free_port

from gad_megatron.data.jsonl import recover_output
from gad_megatron.data.prompts import PromptFormatError, load_prompts

def write_prompts(path, prompts):
    with open(path, "w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"id": f"p{i}", "prompt": p}) + "\n")
    return str(path)


# The client's timeout is far above any answer's time under load, and the server's hang (the timeout fault) far
# above it: with 1.5 s against a 5 s hang, a plain answer slowed past 1.5 s on a loaded machine was retried and
# the exact request counts below failed (#24 item 26).
CLIENT_TIMEOUT_S, HANG_S = "10", "120"


def collect(server, prompts_file, out, *extra, timeout=300, wait=True):
    cmd = [sys.executable, "-m", "gad_megatron.data.collect", "--prompts", prompts_file, "--out", str(out),
           "--base-url", server.url, "--model", "fake-teacher", "--timeout", CLIENT_TIMEOUT_S, "--backoff-base", "0.02",
           *extra]
    env = {**os.environ, "PYTHONPATH": ROOT, "OPENAI_API_KEY": KEY}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def rows(path):
    with open(path) as f:
        return [json.loads(l) for l in f]


@pytest.mark.parametrize("stream, latency_ms", [(False, 0), (True, 0), (False, 2500)], ids=["json", "stream", "slow"])
def test_every_fault_is_retried_and_each_prompt_written_once(server_factory, tmp_path, stream, latency_ms):
    """``slow``: every answer takes 2.5 s, as on a loaded machine, and is still asked for exactly once."""
    srv = server_factory("--hang-s", HANG_S, "--latency-ms", str(latency_ms))
    prompts = [f"question {i} [fault:5]" for i in range(6)] + [f"plain question {i}" for i in range(6)]
    pf = write_prompts(tmp_path / "p.jsonl", prompts)
    r = collect(srv, pf, tmp_path / "out.jsonl", *(["--stream"] if stream else []))
    got = rows(tmp_path / "out.jsonl")
    assert sorted(x["id"] for x in got) == sorted(f"p{i}" for i in range(12))
    for x in got:
        assert set(x) == {"id", "messages", "teacher_response", "model", "usage", "finish_reason"}
        assert x["teacher_response"] == "teacher answer to: " + x["messages"][-1]["content"]
        assert x["finish_reason"] == "stop" and x["usage"]["completion_tokens"] > 0
    st = srv.stats()
    for p in prompts[:6]:  # 429, 500, timeout, malformed, truncated: then the answer
        assert st["requests"][p] == 6
    for p in prompts[6:]:
        assert st["requests"][p] == 1
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["written"] == 12 and summary["retries"] == 30 and summary["failed"] == 0


def test_kill9_then_restart_pays_each_prompt_once(server_factory, tmp_path):
    srv = server_factory("--latency-ms", "400")  # 18 answers still to come take >= 3.6 s after the 6th is seen
    prompts = [f"slow question {i}" for i in range(24)]
    pf = write_prompts(tmp_path / "p.jsonl", prompts)
    out = tmp_path / "out.jsonl"
    proc = collect(srv, pf, out, "--max-in-flight", "2", "--fsync-every", "1", wait=False)
    deadline = time.time() + 60
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 6):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {x["id"] for x in rows(out)}
    assert 6 <= len(before) < 24
    with open(out, "a") as f:
        f.write('{"id": "p23", "messages": [{"role": "us')  # a torn line, as a kill mid-write leaves
    r = collect(srv, pf, out)
    assert "torn" in r.stderr
    got = rows(out)
    ids = [x["id"] for x in got]
    assert sorted(ids) == sorted(f"p{i}" for i in range(24)) and len(ids) == len(set(ids))
    st = srv.stats()
    for i in range(24):
        if f"p{i}" in before:
            assert st["requests"][prompts[i]] == 1, f"p{i} was asked again after it was written"


def test_filters_cost_and_max_cost(server_factory, tmp_path):
    srv = server_factory()
    prompts = ["ok one", "give nothing [empty]", "please [refuse]", "ok two", "ok three"]
    pf = write_prompts(tmp_path / "p.jsonl", prompts)
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"fake-teacher": {"input": 1000.0, "output": 2000.0}}))
    out = tmp_path / "out.jsonl"
    r = collect(srv, pf, out, "--drop-refusals", "--prices", str(prices), "--max-in-flight", "1")
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["written"] == 3 and s["filtered_empty"] == 1 and s["filtered_refusal"] == 1
    used = [x["usage"] for x in rows(out)] + [x["usage"] for x in rows(str(out) + ".rejected.jsonl")]
    want = sum(u["prompt_tokens"] * 1000.0 + u["completion_tokens"] * 2000.0 for u in used) / 1e6
    assert abs(s["cost"] - want) < 1e-9
    # A rerun pays for nothing: written and rejected ids are both done.
    total = srv.stats()["total"]
    collect(srv, pf, out)
    assert srv.stats()["total"] == total
    # --max-cost stops early, never above the cap.
    out2 = tmp_path / "out2.jsonl"
    r = collect(srv, write_prompts(tmp_path / "q.jsonl", [f"q{i}" for i in range(10)]), out2, "--prices", str(prices),
                "--max-cost", "0.1", "--max-tokens", "16", "--max-in-flight", "1")
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert 1 <= s["written"] < 10 and s["stopped_by_cost"] > 0 and s["cost"] <= 0.1


def test_api_key_never_printed_or_written(server_factory, tmp_path):
    srv = server_factory()
    pf = write_prompts(tmp_path / "p.jsonl", ["a [fault:3]" + str(i) for i in range(3)] + ["x"])
    out = tmp_path / "out.jsonl"
    r = collect(srv, pf, out)
    blob = r.stdout + r.stderr + out.read_text()
    if os.path.exists(str(out) + ".rejected.jsonl"):
        blob += open(str(out) + ".rejected.jsonl").read()
    assert KEY not in blob
    assert f"Bearer {KEY}" in srv.stats()["auth"]  # the key was really sent, as the Authorization header
    # An unreachable endpoint's errors must not echo it either.
    bad = subprocess.run([sys.executable, "-m", "gad_megatron.data.collect", "--prompts", pf, "--out", str(tmp_path / "o2"),
                          "--base-url", f"http://127.0.0.1:{free_port()}/v1", "--max-retries", "1", "--timeout", "0.5",
                          "--backoff-base", "0.01"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT, "OPENAI_API_KEY": KEY}, timeout=60)
    assert KEY not in bad.stdout + bad.stderr


def test_missing_key_is_one_clear_error(server_factory, tmp_path):
    srv = server_factory()
    pf = write_prompts(tmp_path / "p.jsonl", ["x"])
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    r = subprocess.run([sys.executable, "-m", "gad_megatron.data.collect", "--prompts", pf, "--out", str(tmp_path / "o"),
                        "--base-url", srv.url], capture_output=True, text=True, env={**env, "PYTHONPATH": ROOT}, timeout=60)
    assert r.returncode == 2 and "OPENAI_API_KEY is not set" in r.stderr


def test_prompt_formats_and_bad_line(tmp_path):
    f = tmp_path / "lmsys.jsonl"
    f.write_text(
        json.dumps({"conversation_id": "c1", "conversation": [{"role": "user", "content": "hi"},
                                                              {"role": "assistant", "content": "hello"}]}) + "\n"
        + json.dumps({"prompt": "plain", "system": "be brief"}) + "\n"
        + json.dumps({"prompt": "plain", "system": "be brief"}) + "\n"
    )
    items = load_prompts(str(f))
    assert items[0] == {"id": "c1", "messages": [{"role": "user", "content": "hi"}]}
    assert items[1]["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "plain"}]
    assert len(items) == 2  # the duplicate prompt is asked once
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(PromptFormatError, match=r"bad\.jsonl:2: not valid JSON"):
        load_prompts(str(bad))
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(PromptFormatError, match=r"bad\.jsonl:2: expected a 'conversation'"):
        load_prompts(str(bad))


def test_recover_output_drops_only_a_torn_last_line(tmp_path):
    p = tmp_path / "o.jsonl"
    p.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "mess')
    done, torn = recover_output(str(p))
    assert done == {"a", "b"} and torn and p.read_text() == '{"id": "a"}\n{"id": "b"}\n'
    p.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ValueError, match="line 2 is not a row"):
        recover_output(str(p))

"""End to end with real vLLM: gad-collect against vLLM's own OpenAI server, gad-eval generating with vLLM."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import KEY, Server, free_port
from hf_fixtures import VLLM_SHAPE, make_hf_model, make_tokenizer
from test_collect import rows, write_prompts

from gad_megatron.rollout.vllm_engine import vllm_unavailable_reason

from conftest import ROOT  # noqa: E402  (the repository root)

pytestmark = pytest.mark.vllm  # beyond its folder's markers


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    reason = vllm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    d = str(tmp_path_factory.mktemp("chatmodel") / "m")
    make_hf_model("qwen2_tied", d, seed=4, **VLLM_SHAPE)
    make_tokenizer(d)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["eos_token_id"] = 1  # <|end|>
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    return d


def test_collect_against_vllm_openai_server(tiny_chat_model, tmp_path):
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    srv = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_chat_model,
                            "--served-model-name", "tiny-teacher", "--host", "127.0.0.1", "--port", str(port),
                            "--dtype", "float32", "--max-model-len", "128", "--enforce-eager", "--api-key", KEY],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if srv.poll() is not None:
                    raise AssertionError("vLLM server exited:\n" + srv.stdout.read()[-4000:])
                time.sleep(1)
        else:
            raise AssertionError("vLLM server did not become healthy")
        pf = write_prompts(tmp_path / "p.jsonl", ["hello how are you", "write a poem about the sea", "thanks"])
        out = tmp_path / "out.jsonl"
        r = subprocess.run([sys.executable, "-m", "gad_megatron.data.collect", "--prompts", pf, "--out", str(out),
                            "--base-url", f"http://127.0.0.1:{port}/v1", "--model", "tiny-teacher", "--max-tokens", "16",
                            "--temperature", "0", "--keep-empty"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": ROOT, "OPENAI_API_KEY": KEY}, timeout=180)
        assert r.returncode == 0, r.stderr[-3000:]
        got = rows(out)
        assert sorted(x["id"] for x in got) == ["p0", "p1", "p2"]
        for x in got:
            assert x["model"] == "tiny-teacher" and x["usage"]["completion_tokens"] >= 1
            assert x["finish_reason"] in ("stop", "length")
        assert KEY not in r.stdout + r.stderr + out.read_text()
    finally:
        if srv.poll() is None:
            os.killpg(srv.pid, signal.SIGKILL)
        srv.wait()


def test_eval_generates_with_vllm_and_judges(tiny_chat_model, tmp_path):
    judge = Server()
    try:
        ds = tmp_path / "vicuna.jsonl"
        ds.write_text("".join(json.dumps({"question_id": i, "text": t}) + "\n"
                              for i, t in enumerate(["hello how are you [want:6,4]", "write a poem [want:3,7]"])))
        out = tmp_path / "res" / "student.jsonl"
        cmd = [sys.executable, "-m", "gad_megatron.eval.run", "run", "--model", tiny_chat_model, "--engine", "vllm",
               "--testset", f"vicuna:{ds}", "--out", str(out), "--max-tokens", "12", "--max-model-len", "128",
               "--base-url", judge.url, "--judge-model", "judge-x", "--timeout", "5", "--backoff-base", "0.01",
               "--run-name", "student"]
        env = {**os.environ, "PYTHONPATH": ROOT, "OPENAI_API_KEY": KEY, "VLLM_CPU_KVCACHE_SPACE": "1"}
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
        assert r.returncode == 0, r.stderr[-4000:]
        res = rows(out)
        assert sorted(x["score"] for x in res) == [30.0, 60.0]
        answers = rows(str(out) + ".answers.jsonl")
        assert len(answers) == 2 and all(1 <= a["response_tokens"] <= 12 for a in answers)
        summary = json.load(open(out.parent / "summary.json"))
        assert summary["runs"]["student"]["vicuna"]["score"] == 45.0
        assert (out.parent / "scores.png").exists() and "| student | 45.0 |" in r.stdout
        # Resumed run: nothing regenerated, nothing re-judged.
        total = judge.stats()["total"]
        r2 = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=200)
        assert r2.returncode == 0 and judge.stats()["total"] == total
        assert len(rows(str(out) + ".answers.jsonl")) == 2
    finally:
        judge.stop()

"""gad-collect and gad-eval as an untrusting user's tools (#9): spending cap, data never lost, never paid
twice, judge outages, duplicate ids, wrong-model results, exit codes, one-line errors. Real processes, real
files, the local fake OpenAI server."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import KEY, ROOT, free_port

from gad_megatron.data.prompts import PromptFormatError
from gad_megatron.eval.run import resolve_max_model_len
from gad_megatron.eval.testsets import load_testset


def write_prompts(path, prompts, ids=None):
    with open(path, "w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"id": ids[i] if ids else f"p{i}", "prompt": p}) + "\n")
    return str(path)


def collect(url, prompts_file, out, *extra, wait=True):
    cmd = [sys.executable, "-m", "gad_megatron.data.collect", "--prompts", str(prompts_file), "--out", str(out),
           "--base-url", url, "--model", "fake-teacher", "--timeout", "2", "--backoff-base", "0.02", "--no-progress",
           *map(str, extra)]
    env = {**os.environ, "PYTHONPATH": ROOT, "OPENAI_API_KEY": KEY}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)


def summary(r):
    return json.loads(r.stdout.strip().splitlines()[-1])


def one_line_error(r, tool, *needles, rc=2):
    assert r.returncode == rc, (r.returncode, r.stdout[-1000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [l for l in r.stderr.splitlines() if l.startswith(f"{tool}: error:")]
    assert len(lines) == 1, r.stderr[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def prices(tmp_path):
    p = tmp_path / "prices.json"
    p.write_text(json.dumps({"fake-teacher": {"input": 100000.0, "output": 200000.0}}))  # $0.1 / $0.2 a token
    return p


# ---- gad-collect --------------------------------------------------------------------------------------------


def test_max_cost_needs_a_price_and_a_bound(server_factory, tmp_path, prices):
    """Item 3: --max-cost without --prices, without the model's price, or without --max-tokens used to do
    nothing, silently; a bad price table is found before the first request (item 5, 12)."""
    srv = server_factory()
    pf = write_prompts(tmp_path / "p.jsonl", ["a", "b"])
    one_line_error(collect(srv.url, pf, tmp_path / "o", "--max-cost", 5), "gad-collect", "needs the price of 'fake-teacher'")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"gpt-x": {"input": 1, "output": 2}}))
    one_line_error(collect(srv.url, pf, tmp_path / "o", "--max-cost", 5, "--max-tokens", 8, "--prices", other),
                   "gad-collect", "needs the price of 'fake-teacher'")
    one_line_error(collect(srv.url, pf, tmp_path / "o", "--max-cost", 5, "--prices", prices), "gad-collect",
                   "--max-cost needs --max-tokens")
    for bad, needle in (('{"fake-teacher": {"input": 1,', "not valid JSON"),
                        ('{"fake-teacher": {"input": 1}}', "must be {"),
                        ('{"fake-teacher": {"input": -1, "output": 2}}', "'fake-teacher'.input = -1"),
                        ('{"fake-teacher": {"input": "1", "output": 2}}', "not a non-negative number"),
                        ('[]', "expected an object")):
        other.write_text(bad)
        one_line_error(collect(srv.url, pf, tmp_path / "o", "--prices", other), "gad-collect", "other.json", needle)
    assert srv.stats()["total"] == 0


def test_max_cost_holds_at_any_concurrency_and_across_resumes(server_factory, tmp_path, prices):
    """Item 3: 8 requests in flight under a cap of 10 (each costs ~1.5): spending stays <= 10 (was: 8 requests
    sent together overshoot); a rerun with the same cap spends nothing more (the tally is seeded from the
    rows already written); a higher cap continues and holds too."""
    srv = server_factory("--latency-ms", "200")
    pf = write_prompts(tmp_path / "p.jsonl", [f"question number {i}" for i in range(40)])
    out = tmp_path / "out.jsonl"

    def spent():
        rows = [json.loads(l) for l in open(out)]
        return sum(r["usage"]["prompt_tokens"] * 0.1 + r["usage"]["completion_tokens"] * 0.2 for r in rows)

    r = collect(srv.url, pf, out, "--prices", prices, "--max-cost", 10, "--max-tokens", 8, "--max-in-flight", 8)
    assert r.returncode == 0, r.stderr[-2000:]
    s = summary(r)
    assert 1 <= s["written"] < 40 and s["stopped_by_cost"] > 0
    assert s["cost"] == pytest.approx(spent()) and spent() <= 10
    total = srv.stats()["total"]
    r = collect(srv.url, pf, out, "--prices", prices, "--max-cost", 10, "--max-tokens", 8, "--max-in-flight", 8)
    s = summary(r)
    assert srv.stats()["total"] == total and s["cost_this_run"] == 0 and s["cost"] == pytest.approx(spent())
    r = collect(srv.url, pf, out, "--prices", prices, "--max-cost", 25, "--max-tokens", 8, "--max-in-flight", 8)
    assert summary(r)["cost_this_run"] > 0 and spent() <= 25


def test_a_complete_last_line_is_never_truncated(server_factory, tmp_path):
    """Item 4: a whole last line that is not a row is an error, the file untouched (was: truncated); --out
    pointing at the prompts file is refused (was: overwritten); gad-eval report never writes its inputs."""
    srv = server_factory()
    pf = write_prompts(tmp_path / "p.jsonl", ["a", "b"])
    out = tmp_path / "out.jsonl"
    for last in ('{"summary": 1}\n', "[]\n"):
        out.write_text('{"id": "p0", "teacher_response": "x"}\n' + last)
        before = out.read_bytes()
        one_line_error(collect(srv.url, pf, out), "gad-collect", "out.jsonl: line 2 is not a row")
        assert out.read_bytes() == before
    before = open(pf, "rb").read()
    one_line_error(collect(srv.url, pf, pf), "gad-collect", "overlaps the input --prompts")
    assert open(pf, "rb").read() == before and srv.stats()["total"] == 0
    summ = tmp_path / "summary.json"
    summ.write_text(json.dumps({"runs": {"gad": {}}}) + "\n")
    r = subprocess.run([sys.executable, "-m", "gad_megatron.eval.run", "report", str(summ), "--out-dir", str(tmp_path / "rep")],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    one_line_error(r, "gad-eval", "summary.json: line 1 is not a row")
    assert summ.read_text() == json.dumps({"runs": {"gad": {}}}) + "\n"


def test_two_runs_on_one_output_pay_once(server_factory, tmp_path):
    """Item 5: a second gad-collect on the same --out is refused while the first runs. The server holds the
    first run's first request until the second has been refused: the first is mid-run for certain (CI once
    saw a 300 ms latency x 10 prompts finish before the second process had started)."""
    hold = tmp_path / "hold"
    hold.write_text("")
    srv = server_factory("--hold-file", str(hold))
    prompts = [f"slow {i}" for i in range(10)]
    pf = write_prompts(tmp_path / "p.jsonl", prompts)
    out = tmp_path / "out.jsonl"
    first = collect(srv.url, pf, out, "--max-in-flight", 1, "--timeout", 300, wait=False)
    deadline = time.time() + 120
    while time.time() < deadline and srv.stats()["total"] == 0:
        time.sleep(0.05)
    assert srv.stats()["total"] == 1 and first.poll() is None
    second = collect(srv.url, pf, out)
    one_line_error(second, "gad-collect", "being written by another running gad-collect")
    assert first.poll() is None and srv.stats()["total"] == 1
    hold.unlink()
    first.communicate(timeout=120)
    assert first.returncode == 0
    assert all(srv.stats()["requests"][p] == 1 for p in prompts)
    assert len(open(out).read().splitlines()) == 10


def test_duplicate_ids(server_factory, tmp_path):
    """Item 7: one id for two different prompts is refused (was: the second silently dropped); the same
    prompt twice is asked once and counted."""
    srv = server_factory()
    pf = write_prompts(tmp_path / "p.jsonl", ["first", "second", "first"], ids=["x", "x", "y"])
    one_line_error(collect(srv.url, pf, tmp_path / "o.jsonl"), "gad-collect",
                   "p.jsonl:2: id 'x' is already used by", "p.jsonl:1")
    pf = write_prompts(tmp_path / "q.jsonl", ["same", "same", "other"], ids=["x", "x", "z"])
    r = collect(srv.url, pf, tmp_path / "o.jsonl")
    assert r.returncode == 0 and summary(r)["duplicate_prompts_skipped"] == 1 and summary(r)["written"] == 2


def test_all_failed_exits_nonzero_and_ctrl_c_is_one_line(server_factory, tmp_path):
    """Items 11, 12: every request failing exits 1 (a refused connection named as such); a missing prompts
    file says so; Ctrl-C is one line, exit 130, and what was written stays."""
    pf = write_prompts(tmp_path / "p.jsonl", ["a", "b"])
    dead = f"http://127.0.0.1:{free_port()}/v1"
    r = collect(dead, pf, tmp_path / "o.jsonl", "--max-retries", 1)
    one_line_error(r, "gad-collect", "all 2 requests failed", rc=1)
    assert "connection refused" in r.stderr and "timed out" not in r.stderr
    one_line_error(collect(dead, tmp_path / "nope.jsonl", tmp_path / "o.jsonl"), "gad-collect",
                   "nope.jsonl: no such file")
    srv = server_factory("--latency-ms", "400")
    pf = write_prompts(tmp_path / "q.jsonl", [f"q{i}" for i in range(30)])
    out = tmp_path / "o2.jsonl"
    proc = collect(srv.url, pf, out, "--max-in-flight", 2, "--fsync-every", 1, wait=False)
    deadline = time.time() + 60
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 2):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and "gad-collect: interrupted" in err, err[-2000:]
    assert len(out.read_text().splitlines()) >= 2 and out.read_text().endswith("\n")


# ---- gad-eval -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    from gad_megatron.data.demo import make_student

    return make_student(str(tmp_path_factory.mktemp("eval") / "student"))  # context 256 tokens


def gad_eval(model, out, judge_url, *extra):
    cmd = [sys.executable, "-m", "gad_megatron.eval.run", "run", "--model", str(model), "--engine", "megatron",
           "--out", str(out), "--max-tokens", "4", "--base-url", judge_url, "--judge-model", "judge-x",
           "--timeout", "3", "--backoff-base", "0.01", "--no-plot", *map(str, extra)]
    env = {**os.environ, "PYTHONPATH": ROOT, "OPENAI_API_KEY": KEY, "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_eval_outage_retry_ids_per_set_and_model_identity(server_factory, student, tmp_path):
    """Items 1, 6, 7, 11: a judge outage fails every item (exit 1, 'connection refused', not 'timeout'); the
    rerun asks the judge again for each of them; items of two test sets with the same id are both judged;
    the same --out with another model or other settings is refused instead of reporting the old answers."""
    dolly = tmp_path / "dolly.jsonl"
    dolly.write_text(json.dumps({"id": "1", "instruction": "one [want:6,4]"}) + "\n")
    vicuna = tmp_path / "vicuna.jsonl"
    vicuna.write_text(json.dumps({"question_id": 1, "text": "two [want:3,7]"}) + "\n")
    sets = ["--testset", f"dolly:{dolly}", "--testset", f"vicuna:{vicuna}"]
    out = tmp_path / "res" / "student.jsonl"
    r = gad_eval(student, out, f"http://127.0.0.1:{free_port()}/v1", *sets, "--run-name", "s")
    one_line_error(r, "gad-eval", "all 2 judgements failed", "connection refused", rc=1)
    assert "timed out" not in r.stderr.split("gad-eval: error:")[1]
    judge = server_factory()
    r = gad_eval(student, out, judge.url, *sets, "--run-name", "s")
    assert r.returncode == 0, r.stderr[-3000:]
    summ = json.load(open(out.parent / "summary.json"))["runs"]["s"]
    assert summ["dolly"]["score"] == 60.0 and summ["vicuna"]["score"] == 30.0
    assert summ["dolly"]["failed"] == 0 and summ["vicuna"]["failed"] == 0
    answers = [json.loads(l) for l in open(str(out) + ".answers.jsonl")]
    assert sorted((a["dataset"], a["id"]) for a in answers) == [("dolly", "1"), ("vicuna", "1")]
    # Another model, or other generation settings, into the same --out: refused, nothing judged.
    from gad_megatron.data.demo import make_student

    other = make_student(str(tmp_path / "other"), seed=1)
    total = judge.stats()["total"]
    r = gad_eval(other, out, judge.url, *sets, "--run-name", "s")
    one_line_error(r, "gad-eval", "holds results for model=")
    r = gad_eval(student, out, judge.url, *sets, "--run-name", "s", "--max-tokens", "8")
    one_line_error(r, "gad-eval", "max_tokens")
    assert judge.stats()["total"] == total


def test_eval_input_errors_are_one_line(student, tmp_path):
    """Item 12: --testset without a path; rows of the wrong type; a --max-model-len beyond the model's context
    (and the default follows the model's context: 256 here, was a fixed 4096)."""
    r = gad_eval(student, tmp_path / "r.jsonl", "http://127.0.0.1:1/v1", "--testset", "dolly")
    one_line_error(r, "gad-eval", "--testset dolly: expected NAME:PATH")
    ds = tmp_path / "d.jsonl"
    ds.write_text(json.dumps({"instruction": "ok"}) + "\n" + json.dumps({"instruction": ["not", "text"]}) + "\n")
    r = gad_eval(student, tmp_path / "r.jsonl", "http://127.0.0.1:1/v1", "--testset", f"dolly:{ds}")
    one_line_error(r, "gad-eval", "d.jsonl:2: field 'instruction' must be a str, got list")
    ds.write_text("[1, 2]\n")
    with pytest.raises(PromptFormatError, match=r"d\.jsonl:1: expected a JSON object, got list"):
        load_testset("vicuna", str(ds))
    assert resolve_max_model_len(student) == 256
    ds.write_text(json.dumps({"instruction": "ok"}) + "\n")
    r = gad_eval(student, tmp_path / "r.jsonl", "http://127.0.0.1:1/v1", "--testset", f"dolly:{ds}",
                 "--max-model-len", "4096")
    one_line_error(r, "gad-eval", "--max-model-len 4096 is longer than the model's context (max_position_embeddings=256")
    assert not os.path.exists(tmp_path / "r.jsonl")

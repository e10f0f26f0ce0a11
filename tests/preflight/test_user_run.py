"""A user's own run (#31 items 4 and 5): a recipe that runs from its YAML alone (or says which command makes its
student), a scorer given by file path, a capped held-out evaluation that reads the same prompts every time."""

import os

import pytest
from conftest import ROOT

from gad_megatron.trainer.config import ConfigError, load_config

RECIPE = os.path.join(ROOT, "examples", "smollm2", "gad.yaml")


def test_the_smollm2_recipe_names_the_command_that_makes_its_student(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("GAD_SMOLLM2", raising=False)
    monkeypatch.setenv("GAD_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError) as e:
        load_config(RECIPE)
    msg = str(e.value)
    assert "model.student" in msg and "run `gad-convert smollm2` once" in msg and "\n" not in msg
    made = tmp_path / "cache" / "smollm2-135m-instruct"  # what gad-convert smollm2 leaves: the recipe finds it
    made.mkdir(parents=True)
    (made / "config.json").write_text("{}")
    from safetensors.torch import save_file
    import torch

    save_file({"w": torch.zeros(4)}, str(made / "model.safetensors"))
    assert load_config(RECIPE).model.student == str(made)
    monkeypatch.setenv("GAD_SMOLLM2", "/somewhere/else")  # the old way still wins
    assert load_config(RECIPE).model.student == "/somewhere/else"


def test_a_scorer_given_by_file_path_imports(tmp_path, monkeypatch):
    from gad_megatron.trainer.rewards import load_scorer

    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "my_task.py").write_text(
        "def score(messages, text):\n    return float(text == messages[-1]['content'][::-1])\n")
    monkeypatch.chdir(tmp_path)
    for spec in ("task/my_task.py:score", str(tmp_path / "task" / "my_task.py") + ":score"):
        fn = load_scorer(spec)
        assert fn([{"role": "user", "content": "abc"}], "cba") == 1.0 and fn([{"role": "user", "content": "a"}], "b") == 0.0
    assert load_scorer("task/my_task.py:score") is load_scorer(str(tmp_path / "task" / "my_task.py") + ":score")
    with pytest.raises(FileNotFoundError, match="no such scorer file"):
        load_scorer("task/missing.py:score")
    with pytest.raises(AttributeError):
        load_scorer("task/my_task.py:nothing")


def test_a_capped_evaluation_reads_a_fixed_subset():
    from gad_megatron.data.teacher import heldout_subset

    held = list(range(240))
    a = heldout_subset(held, 48, seed=7)
    assert len(a) == 48 and a == sorted(a) and a == heldout_subset(held, 48, seed=7)
    assert a != heldout_subset(held, 48, seed=8)
    assert heldout_subset(held, 0, 7) == held and heldout_subset(held, 500, 7) == held
    with pytest.raises(ConfigError, match="eval.max_prompts"):
        load_config(None, ["model.student=/x", "data.train=/y", "eval.max_prompts=-1"])


def test_the_whole_run_is_said_before_it_starts_and_refused_beyond_max_run_hours(tmp_path):
    """#31 item 3: --check prints the run by parts (step kinds, evaluations, saves, disk); a run estimated
    beyond train.max_run_hours is one error line with those figures."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": ROOT, "GAD_DEMO_DIR": str(tmp_path / "demo")}
    cmd = [sys.executable, "-m", "gad_megatron.trainer.cli", "--demo", "--check"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    line = next(x for x in p.stderr.splitlines() if "the whole run:" in x)
    # the demo: 150 steps, 120 of warmup (critic_warmup 5: D every warmup step), 3 evaluations, saves at 40 80 120
    # 150 and the reference at 120
    assert "120 warmup with D steps" in line and "30 GAD steps" in line and "3 evaluations" in line
    assert "5 checkpoint saves" in line and "GB at once" in line
    p = subprocess.run(cmd + ["train.max_run_hours=0.0001"], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=300)
    assert p.returncode == 2 and "beyond train.max_run_hours=0.0001" in p.stderr and "the whole run:" in p.stderr
    assert len([x for x in p.stderr.splitlines() if "error" in x]) == 1 and "Traceback" not in p.stderr


def test_step_kinds_and_evaluations_follow_the_schedule_rules():
    from gad_megatron.trainer.run_estimate import count_evaluations, count_steps

    cfg = load_config(None, ["model.student=/x", "data.train=/y", "train.critic_warmup=3", "train.d_warmup_last=10",
                             "eval.heldout_every=25"])
    assert count_steps(cfg, 100, 130, has_d=True) == {"SeqKD": 88, "warmup with D": 12, "GAD": 30}
    assert count_steps(cfg, 100, 130, has_d=False) == {"SeqKD": 100, "warmup with D": 0, "GAD": 30}
    assert count_evaluations(cfg, 100, 130, heldout=64) == 1 + 1 + 5 + 1  # before, after warmup, 25..125, after
    assert count_evaluations(cfg, 100, 130, heldout=0) == 0


def test_rows_dropped_for_their_length_are_said_on_screen(tmp_path):
    """#32 item 25: rows over data.max_response_tokens were dropped with no line (only data_stats.json)."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": ROOT, "GAD_DEMO_DIR": str(tmp_path / "demo")}
    short = ["data.max_response_tokens=3", "eval.max_tokens=3", "rollout.max_tokens=3"]
    cmd = [sys.executable, "-m", "gad_megatron.trainer.cli", "--demo", "--check", *short]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "94 training rows dropped (384 read): 0 with a prompt longer than data.max_prompt_tokens=48, 94 with an " \
           "answer longer than data.max_response_tokens=3" in p.stderr, p.stderr[-2000:]
    p = subprocess.run(cmd + ["data.overlong=truncate"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert "0 prompts and 94 answers cut to" in p.stderr and "dropped" not in p.stderr, p.stderr[-2000:]


def test_a_scorer_may_return_numpy_and_torch_scalars():
    """#32 item 18: np.float32(0.0) was refused as 'expected a finite number'."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from gad_megatron.trainer.rewards import ScorerError, call_scorer

    ex = SimpleNamespace(messages=[{"role": "user", "content": "q"}], id="q1")
    for v, want in ((np.float32(0.25), 0.25), (np.float64(1), 1.0), (np.int64(1), 1.0), (torch.tensor(0.5), 0.5),
                    (np.array(0.75), 0.75), (1, 1.0), (0.0, 0.0)):
        got = call_scorer(lambda m, t, v=v: v, "eval.scorer=x", ex, "a")
        assert got == want and type(got) is float, (v, got)
    for v in (True, np.bool_(True), "1", [1.0], np.array([1.0]), torch.tensor([1.0]), float("nan"), np.float32("inf"),
              None):
        with pytest.raises(ScorerError, match="expected a finite number"):
            call_scorer(lambda m, t, v=v: v, "eval.scorer=x", ex, "a")


def test_two_evaluations_compare_prompt_by_prompt(tmp_path, capsys):
    """eval/paired.py: the change between two evaluations over their common prompts and its paired standard
    error (the oracle search's verdict, docs/oracle_search_smollm2/PLAN.md)."""
    import json

    from gad_megatron.eval import paired

    for run, name, scores in (("warm", "after_step0000060", [0.1, 0.2, 0.3, 0.4]),
                              ("var", "after_step0000092", [0.3, 0.35, 0.5, 0.6])):
        (tmp_path / run / "heldout").mkdir(parents=True)
        (tmp_path / run / "heldout" / f"{name}.jsonl").write_text(
            "".join(json.dumps({"id": f"p{i}", "greedy": 0.0, "sampled": x}) + "\n" for i, x in enumerate(scores)))
    c = paired.change_between(str(tmp_path / "warm"), "after", str(tmp_path / "var"), "after")
    assert c.prompts == 4 and c.change == pytest.approx(0.1875) and c.before == pytest.approx(0.25)
    d = [0.2, 0.15, 0.2, 0.2]
    m = sum(d) / 4
    assert c.se == pytest.approx((sum((x - m) ** 2 for x in d) / 3 / 4) ** 0.5)
    assert paired.main([str(tmp_path / "warm"), "after", str(tmp_path / "var"), "after"]) == 0
    assert capsys.readouterr().out.strip().endswith(": learns")  # 0.1875 > 2 x 0.0125 (its standard error)
    with pytest.raises(FileNotFoundError, match="no per-prompt scores of the 'before' evaluation"):
        paired.change_between(str(tmp_path / "warm"), "before", str(tmp_path / "var"), "after")


def test_check_under_torchrun_estimates_with_the_launchers_world(tmp_path):
    """#32 item 16: `torchrun --nproc-per-node 2 ... --check parallel.tensor_parallel=2` (parallel.nproc left at 1)
    was a ZeroDivisionError on every rank: the estimates used parallel.nproc, not the launcher's world size."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": ROOT, "GAD_DEMO_DIR": str(tmp_path / "demo")}
    cmd = [sys.executable, "-m", "gad_megatron.trainer.cli", "--demo", "--check"]
    assert subprocess.run(cmd, capture_output=True, cwd=ROOT, env=env, timeout=300).returncode == 0  # makes the student
    rank0 = {**env, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}
    p = subprocess.run(cmd + ["parallel.nproc=1", "parallel.tensor_parallel=2"], capture_output=True, text=True,
                       cwd=ROOT, env=rank0, timeout=300)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "the whole run:" in p.stderr  # rank 0 of a launcher that is not gad-train's own says it


def test_a_converted_cache_cut_short_is_not_taken_for_the_student(tmp_path, monkeypatch):
    """#32 item 5: a `gad-convert smollm2` cache with config.json and half a model.safetensors was printed as the
    student (only config.json was checked). Now it is converted again; the recipe does not take it meanwhile."""
    import torch
    from safetensors.torch import save_file

    from gad_megatron.convert.smollm2 import cache_problem

    out = tmp_path / "cache" / "smollm2-135m-instruct"
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    save_file({"a": torch.zeros(1000), "b": torch.ones(500)}, str(out / "model.safetensors"))
    assert cache_problem(str(out)) == ""
    whole = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(whole[: len(whole) // 2])
    assert "cut short" in cache_problem(str(out))
    (out / "model.safetensors").write_bytes(whole[:20])
    assert "not a whole safetensors file" in cache_problem(str(out))
    monkeypatch.delenv("GAD_SMOLLM2", raising=False)
    monkeypatch.setenv("GAD_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match="run `gad-convert smollm2` once"):
        load_config(RECIPE)


def test_an_opd_teacher_that_is_no_model_is_one_line_naming_opd_teacher(tmp_path):
    """#32 items 6, 7: a missing opd.teacher said "Repo id must be in the form 'repo_name'...", an empty folder
    gave a multi-line tokenizer error, a folder without weights passed --check and died after G was built."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": ROOT, "GAD_DEMO_DIR": str(tmp_path / "demo")}
    empty, no_weights = tmp_path / "empty", tmp_path / "no_weights"
    empty.mkdir()
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    for teacher, needle in ((tmp_path / "missing", "no such folder"), (empty, "holds no config.json"),
                            (no_weights, "holds no weights")):
        p = subprocess.run([sys.executable, "-m", "gad_megatron.trainer.cli", "--demo", "--check",
                            "reward.source=opd", f"opd.teacher={teacher}"], capture_output=True, text=True, cwd=ROOT,
                           env=env, timeout=300)
        err = [x for x in p.stderr.splitlines() if "error" in x]
        assert p.returncode == 2 and len(err) == 1 and f"opd.teacher={teacher}: {needle}" in err[0], p.stderr[-2000:]


@pytest.mark.parametrize("key,inside", [("opd.teacher", "hf_student"), ("opd.teacher", "checkpoints/student"),
                                        ("model.student", "checkpoints/student"), ("model.student", "hf_student/x")])
def test_an_input_inside_what_the_run_writes_is_refused(tmp_path, key, inside):
    """#32 items 8, 15: opd.teacher=<run_dir>/hf_student or <run_dir>/checkpoints/student, and
    model.student=<run_dir>/checkpoints/student with checkpoint.resume=none, were accepted: the run rewrites its
    own input."""
    run = tmp_path / "run"
    over = {"log.run_dir": run, "checkpoint.resume": "none", "model.student": tmp_path / "student",
            "data.train": "t.jsonl", "reward.source": "opd", "opd.teacher": tmp_path / "teacher"}
    with pytest.raises(ConfigError) as e:
        load_config(base={}, overrides=[f"{k}={v}" for k, v in {**over, key: run / inside}.items()])
    assert f"{key}=" in str(e.value) and f"sits in this run's own {inside.split('/')[0]}" in str(e.value)
    load_config(base={}, overrides=[f"{k}={v}" for k, v in over.items()])  # outside the run's outputs: accepted


@pytest.mark.parametrize("over,key", [
    (["reward.source=opd", "opd.coef=0"], "opd.coef"),
    (["reward.source=gad+opd", "opd.weight=0", "opd.weight_discriminator=0"], "opd.weight"),
    (["reward.source=gad+opd", "opd.coef=0", "opd.weight_discriminator=0"], "opd.weight")])
def test_opd_weights_that_zero_every_advantage_are_refused(tmp_path, over, key):
    """#32 item 9: gad+opd with opd.weight=0 opd.weight_discriminator=0, and opd with opd.coef=0, trained with every
    advantage 0 (the mixed reward's zero weights were refused)."""
    base = ["model.student=s", "data.train=t.jsonl", f"opd.teacher={tmp_path / 't'}"]
    with pytest.raises(ConfigError, match=f"{key}=.*every advantage would be 0"):
        load_config(base={}, overrides=base + over)
    load_config(base={}, overrides=base + over[:1])  # the default weights: accepted


def _http_server(answer):
    """A local HTTP server whose answer to (path, body) is ``answer(path, body) -> bytes``; (server, url)."""
    import http.server
    import json
    import threading

    class H(http.server.BaseHTTPRequestHandler):
        def _reply(self):
            n = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(n)) if n else None
            out = answer(self.path, body)
            self.send_response(200)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_POST = _reply

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/v1"


def test_an_opd_server_that_is_not_a_vllm_server_is_one_line_naming_opd_url(tmp_path):
    """#32 items 10, 11: an opd.url answering 200 with HTML or nothing said "Expecting value: line 1 column 1",
    JSON without tokens was a KeyError traceback, and a server that tokenizes right but returns no prompt logprobs
    passed --check and died at the first OPD step."""
    import json

    from transformers import AutoTokenizer

    from gad_megatron.data import demo
    from gad_megatron.trainer.opd import TeacherMismatch, check_server_tokenizer

    student = demo.make_student(str(tmp_path / "student"), seed=3)
    tok = AutoTokenizer.from_pretrained(student)

    def vllm_like(logprobs: bool):
        def answer(path, body):
            if path == "/tokenize":
                return json.dumps({"tokens": tok(body["prompt"], add_special_tokens=False)["input_ids"]}).encode()
            if path == "/v1/models":
                return b'{"data": [{"id": "teacher"}]}'
            lp = [None] + [{"1": {"logprob": -1.0}}] * (len(body["prompt"]) - 1) if logprobs else None
            return json.dumps({"choices": [{"index": 0, "text": "x", "prompt_logprobs": lp}]}).encode()
        return answer

    cases = [(lambda p, b: b"<html><body>proxy login</body></html>", "/tokenize answered '<html><body>proxy login"),
             (lambda p, b: b"", "/tokenize answered 'nothing', not JSON"),
             (lambda p, b: b'{"count": 3}', "/tokenize answered without 'tokens'"),
             (vllm_like(False), "came back without prompt logprobs (none)")]
    for answer, needle in cases:
        srv, url = _http_server(answer)
        try:
            with pytest.raises(TeacherMismatch) as e:
                check_server_tokenizer(student, url)
            assert str(e.value).startswith(f"opd.url={url}: ") and needle in str(e.value) and "\n" not in str(e.value)
        finally:
            srv.shutdown()
    srv, url = _http_server(vllm_like(True))
    try:
        check_server_tokenizer(student, url)  # tokenizes as the student and gives prompt logprobs: accepted
    finally:
        srv.shutdown()


def test_samples_are_checked_against_the_process_and_job_memory_limits(tmp_path):
    """#32 item 17: rollout.n=100000 in a run of D-warmup steps passed (22.9 GiB of samples against the machine's
    24 GiB) under a 6 GiB address-space limit and died in its first step. The least of the machine's RAM, ulimit -v,
    the cgroup's memory.max and Slurm's --mem is the budget, named in the refusal."""
    import shlex
    import subprocess
    import sys

    from gad_megatron.runtime.parallel import host_memory_limit

    cmd = (f"ulimit -v {6 * 2**20}; exec {shlex.quote(sys.executable)} -m gad_megatron.trainer.cli "
           "--demo --check rollout.n=100000 train.warmup_steps=4 train.total_steps=4 train.d_warmup_last=4")
    p = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "GAD_DEMO_DIR": str(tmp_path / "demo"), "PYTHONPATH": ROOT})
    err = [x for x in p.stderr.splitlines() if "error" in x]  # --check lists every refusal; the memory one first
    assert p.returncode == 2 and err and all("rollout.n=100000" in x for x in err), p.stderr[-2000:]
    assert "about 22.9 GiB" in err[0] and "this process's address-space limit (ulimit -v) allows 6.0 GiB" in err[0]
    (tmp_path / "cg").mkdir()
    (tmp_path / "cg" / "memory.max").write_text("4294967296\n")
    assert host_memory_limit({}, str(tmp_path / "cg")) == (4 * 2**30, "the cgroup's memory.max")
    assert host_memory_limit({"SLURM_MEM_PER_NODE": "2048"}, str(tmp_path / "cg")) == (2 * 2**30,
                                                                                       "the Slurm job's memory (--mem)")
    (tmp_path / "cg" / "memory.max").write_text("max\n")  # no limit
    assert host_memory_limit({}, str(tmp_path / "cg"))[1] in ("the machine's RAM",
                                                             "this process's address-space limit (ulimit -v)")


@pytest.mark.parametrize("over,needle", [
    (["reward.source=scorer"], "reward.scorer=None: reward.source=scorer needs a scorer: module:function"),
    (["reward.source=mixed", "reward.scorer=m:f", "reward.weight_scorer=0", "reward.weight_discriminator=0"],
     "reward.weight_scorer=0.0: and reward.weight_discriminator are both 0"),
    (["reward.source=opd"], "opd.teacher=None: reward.source=opd needs one teacher"),
    (["reward.source=gad+opd", "opd.url=http://x/v1", "opd.teacher=t"], "reward.source=gad+opd needs one teacher")])
def test_each_reward_says_its_own_config_rules(over, needle):
    """#34: the rules of a reward live on its class (Reward.validate), not in lists of reward names in the
    config code; each is one line naming the key."""
    with pytest.raises(ConfigError) as e:
        load_config(base={}, overrides=["model.student=s", "data.train=t.jsonl"] + over)
    assert needle in str(e.value), str(e.value)

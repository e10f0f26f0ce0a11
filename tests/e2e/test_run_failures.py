"""Trustworthy runs at the process level (#17): single-rank runs on one host do not collide on a port; a
checkpoint saved before G's first step resumes."""

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import HERE, ROOT

HOLD = """
import sys, time
from gad_megatron.runtime import ParallelConfig, initialize, destroy
initialize(ParallelConfig(device="cpu"))
print("up", flush=True)
time.sleep(6)
destroy()
"""


def test_two_single_rank_runs_on_one_host_do_not_collide():
    """#17 5: each plain single-rank process used to bind port 29500; the second one failed."""
    env = {"PYTHONPATH": ROOT, "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, "-c", HOLD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    time.sleep(0.5)
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "up" in out, err[-2000:]


def test_a_batch_scripts_own_slurm_ntasks_is_not_a_world_to_wait_for(monkeypatch):
    """#17 5: SLURM_NTASKS set but no srun step: one rank (it used to wait up to 30 minutes for 3 more)."""
    from gad_megatron.runtime import launch, parallel

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "2")
    assert parallel._env_world() == (0, 1, 0) and not launch.under_launcher()
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")  # inside `srun`
    assert parallel._env_world() == (2, 4, 0) and launch.under_launcher()


def _ckpt_tree(root, steps, latest=None):
    for s in steps:
        for part in ("student", "trainer"):
            os.makedirs(os.path.join(root, part, f"iter_{s:07d}"))
    if latest is not None:
        open(os.path.join(root, "latest"), "w").write(str(latest))


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    """#17 2: a run resumed at step 10 of a run that reached 30 writes 12; with keep_last 2 it used to delete
    12 at once (newest two by number: 20, 30) while `latest` named it."""
    from gad_megatron.trainer.checkpoint import _prune

    _ckpt_tree(tmp_path, [10, 20, 30, 12], latest=12)
    _prune(str(tmp_path), 2, ["student"], 12)
    kept = sorted(os.listdir(tmp_path / "trainer"))
    assert kept == ["iter_0000010", "iter_0000012", "iter_0000020", "iter_0000030"]
    _ckpt_tree(tmp_path, [14], latest=14)
    _prune(str(tmp_path), 2, ["student"], 14)
    assert sorted(os.listdir(tmp_path / "student")) == ["iter_0000012", "iter_0000014", "iter_0000020", "iter_0000030"]


def test_checkpoints_without_latest_are_an_error_not_a_fresh_start(tmp_path):
    from gad_megatron.trainer.checkpoint import latest_step

    assert latest_step(str(tmp_path)) is None  # nothing saved: a fresh start is right
    _ckpt_tree(tmp_path, [2, 4])
    with pytest.raises(FileNotFoundError, match="latest: missing, but .* holds iter_0000002, iter_0000004"):
        latest_step(str(tmp_path))


def test_a_damaged_trainer_state_is_one_error_naming_the_file(tmp_path):
    from gad_megatron.trainer.checkpoint import load

    _ckpt_tree(tmp_path, [2], latest=2)
    (tmp_path / "trainer" / "iter_0000002" / "state.json").write_text('{"step": 2, "sampler":')
    with pytest.raises(ValueError, match=r"iter_0000002/state.json: damaged trainer state"):
        load(str(tmp_path), 2, {})


def test_resumed_run_logs_each_evaluation_once(tmp_path):
    """#17 2: the end-of-warmup evaluation is logged after the checkpoint at its step: a resume there used to
    log it twice."""
    from gad_megatron.trainer.metrics import _truncate_after

    rows = [{"step": 0, "eval": "before", "heldout_ce": 5.0}, {"step": 1, "sft_loss": 4.0}, {"step": 2, "sft_loss": 3.0},
            {"step": 2, "eval": "after_warmup", "heldout_ce": 3.0}, {"step": 3, "g_loss": 0.1}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows) + '{"step": 4, "g_lo')
    _truncate_after(str(path), 2)
    assert [json.loads(x) for x in path.read_text().splitlines()] == rows[:3]


@pytest.mark.parametrize("override, needle", [
    ("algo.kl_coef=nan", "algo.kl_coef=nan: must be a finite number"),
    ("train.max_skipped_steps=-1", "train.max_skipped_steps=-1: must be >= 0"),
    ("log.run_dir=FILE", "log.run_dir='FILE': is a file"),
    ("model.student=RUN/hf_student", "sits in this run's own hf_student"),
])
def test_config_values_that_cannot_work_are_one_error(tmp_path, override, needle):
    from gad_megatron.trainer.config import ConfigError, load_config

    (tmp_path / "FILE").write_text("x")
    over = [override.replace("FILE", str(tmp_path / "FILE")).replace("RUN", str(tmp_path / "run"))]
    if override.startswith("model.student"):
        over.append(f"log.run_dir={tmp_path / 'run'}")
    with pytest.raises(ConfigError) as e:
        load_config(base={"model": {"student": "s"}, "data": {"train": "d"}}, overrides=over)
    assert needle.replace("FILE", str(tmp_path / "FILE")) in str(e.value)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from gad_megatron.data import demo

    return demo.make_student(str(tmp_path_factory.mktemp("tiny") / "student"), seed=2)


def gad_train(tmp_path, tiny, rows, *over, raw=None):
    data = tmp_path / "data.jsonl"
    if raw is not None:
        data.write_bytes(raw)
    else:
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [sys.executable, "-m", "gad_megatron.trainer.cli", "--config",
           os.path.join(ROOT, "gad_megatron", "assets", "demo", "demo.yaml"), f"model.student={tiny}",
           f"data.train={data}", "parallel.nproc=1", f"log.run_dir={tmp_path / 'run'}", *over, "--check"]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": f"{ROOT}:{HERE}"},
                          timeout=300)


def _row(i, content="copy: a b", answer="a b"):
    return {"id": f"r{i}", "messages": [{"role": "user", "content": content}], "teacher_response": answer}


def test_bad_data_and_settings_are_one_line_before_any_model(tiny, tmp_path):
    """#17 4, through gad-train itself (``--check``: every check of a real start, no model built)."""
    ok = [_row(i) for i in range(100)]
    r = gad_train(tmp_path, tiny, ok, "eval.scorer=no_such_module:score")
    assert r.returncode == 2 and "eval.scorer='no_such_module:score': cannot be imported" in r.stderr
    assert "Traceback" not in r.stderr
    r = gad_train(tmp_path, tiny, ok, "data.max_prompt_tokens=4000", "train.micro_batch_tokens=8192")
    assert r.returncode == 2 and "beyond the student's max_position_embeddings" in r.stderr
    long = [_row(i, content="copy: " + " ".join(["shovel"] * 60)) for i in range(100)]
    r = gad_train(tmp_path, tiny, long, "data.heldout_size=0")
    assert r.returncode == 2 and "100 with a prompt longer than data.max_prompt_tokens=48" in r.stderr, r.stderr
    r = gad_train(tmp_path, tiny, ok + [_row(5)] * 20)
    assert r.returncode == 0 and "20 rows repeat an id seen before" in r.stderr, r.stderr


def test_content_parts_are_joined_and_other_parts_refused(tmp_path):
    from gad_megatron.data.prompts import PromptFormatError, to_item

    parts = [{"type": "text", "text": "copy: "}, {"type": "text", "text": "a b"}]
    item = to_item({"id": "1", "messages": [{"role": "user", "content": parts}]}, "f.jsonl:3")
    assert item["messages"][0]["content"] == "copy: a b"
    with pytest.raises(PromptFormatError, match=r"f.jsonl:3: content part of type 'image_url'"):
        to_item({"id": "1", "messages": [{"role": "user", "content": parts + [{"type": "image_url"}]}]}, "f.jsonl:3")


def test_a_non_utf8_line_is_named_and_skippable(tmp_path):
    from gad_megatron.data.teacher import DataError, DataStats, read_rows

    good = json.dumps(_row(1)).encode() + b"\n"
    path = tmp_path / "t.jsonl"
    path.write_bytes(good + b'{"id": "x\xff"}\n' + json.dumps(_row(2)).encode() + b"\n")
    with pytest.raises(DataError, match=r"t.jsonl:2: not UTF-8"):
        read_rows(str(path), "error")
    stats = DataStats()
    assert [r["id"] for r in read_rows(str(path), "skip", stats)] == ["r1", "r2"] and stats.skipped_bad == 1


@pytest.mark.parametrize("args, needle", [(["--tp", "0"], "--tp 0: must be >= 1"), (["--mfu", "-1"], "--mfu -1.0"),
                                          (["--nodes", "0"], "--nodes 0: must be >= 1")])
def test_gad_plan_refuses_impossible_arguments(args, needle):
    """#17 5: --tp 0 was taken as not given, --mfu -1 predicted negative hours, zero GPUs was a traceback."""
    r = subprocess.run([sys.executable, "-m", "gad_megatron.plan", "--model", "qwen2.5-7b", *args], capture_output=True,
                       text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_ctrl_c_is_a_clean_stop_with_exit_130(tiny, tmp_path):
    """#17 4: Ctrl-C (SIGINT to the process group) gave a 37-frame traceback."""
    import signal

    from test_gad_train import _wait_for_step, write_config

    cfg = write_config(tmp_path / "c.yaml", tiny, tmp_path / "run", **{"parallel.nproc": 1, "train.total_steps": 40})
    log = open(tmp_path / "c.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "gad_megatron.trainer.cli", "--config", str(cfg)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}, start_new_session=True,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for_step(tmp_path / "run", 4, proc)  # past the first checkpoint (its helper process is up)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = open(tmp_path / "c.log").read()
    assert "gad-train: interrupted" in out and "Traceback" not in out, out[-3000:]


def test_one_owner_per_run_directory(tiny, tmp_path):
    """#17 2: a second gad-train on a live run's directory deleted the first's in-progress checkpoint as a
    leftover and crashed it. Now the second one stops at once, naming the owner; the first runs on."""
    import signal

    from test_gad_train import _wait_for_step, write_config

    cfg = write_config(tmp_path / "a.yaml", tiny, tmp_path / "run", **{"parallel.nproc": 1, "train.total_steps": 40})
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "gad_megatron.trainer.cli", "--config", str(cfg)], cwd=ROOT,
                             env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_step(tmp_path / "run", 2, first)
        second = subprocess.run([sys.executable, "-m", "gad_megatron.trainer.cli", "--config", str(cfg)], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2 and "in use by a running gad-train (pid" in second.stderr, second.stderr[-2000:]
        _wait_for_step(tmp_path / "run", 6, first)  # the first run goes on, its checkpoints intact
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


def test_a_seqkd_run_resumes(tiny, tmp_path):
    """#17 2: resuming a SeqKD run failed ("checkpoint damaged": the resume looked for a discriminator)."""
    from test_gad_train import lines, run_train, write_config

    over = {"parallel.nproc": 1, "train.stage": "seqkd", "train.total_steps": 4, "checkpoint.save_every": 2}
    first = run_train(write_config(tmp_path / "a.yaml", tiny, tmp_path / "run", **over, **{"train.stop_after": 2}))
    assert "Traceback" not in first.stdout
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "discriminator")
    again = run_train(write_config(tmp_path / "a.yaml", tiny, tmp_path / "run", **over))
    assert "resumed from" in again.stdout and "at step 2" in again.stdout
    steps = [json.loads(x)["step"] for x in lines(tmp_path / "run") if b"eval" not in x]
    assert steps == [1, 2, 3, 4]


def test_ctrl_c_lets_a_forked_checkpoint_writer_finish():
    """#17 4: Ctrl-C reaches the whole process group, megatron's forked checkpoint writers included. A writer
    that exited on it left the trainer blocked forever on the writer's result queue (the flaky hang of the
    Ctrl-C test). A forked child now finishes its work; the trainer alone decides how to stop."""
    code = (
        "import os, signal, time\n"
        "from gad_megatron.trainer.run import StopSignal\n"
        "stop = StopSignal()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(0.2)\n"
        "    os._exit(7)  # the write finished\n"
        "_, status = os.waitpid(pid, 0)\n"
        "print(os.waitstatus_to_exitcode(status), stop.interrupted)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.stdout.split() == ["7", "False"], r.stdout + r.stderr[-2000:]


def test_a_run_whose_updates_were_all_skipped_is_an_error():
    """#17 4: every update skipped (non-finite) exited 0 with the start model."""
    from gad_megatron.trainer.run import check_some_update_ran

    with pytest.raises(FloatingPointError, match="all 6 steps skipped their update"):
        check_some_update_ran({"skipped_steps": 6}, 6)
    check_some_update_ran({"skipped_steps": 5}, 6)  # one update ran
    check_some_update_ran({"skipped_steps": 0}, 0)  # nothing to run (resumed at the end)


def test_disk_full_while_saving_is_one_line_naming_the_path_and_bytes(tiny, tmp_path):
    """#17 4: a checkpoint write that runs out of space said "unexpected pos 704 vs 598" in a traceback. Here the
    file-size limit (EFBIG) stands in for a full disk; the partial checkpoint is removed."""
    import resource
    import signal

    from test_gad_train import write_config

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny, run, **{"parallel.nproc": 1, "train.total_steps": 2,
                                                          "train.warmup_steps": 2})
    r = subprocess.run([sys.executable, "-m", "gad_megatron.trainer.cli", "--config", str(cfg)], cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       preexec_fn=small_files, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    line = next(x for x in r.stderr.splitlines() if x.startswith("gad-train: error:"))
    assert f"{run}/checkpoints: writing the step-2 checkpoint failed after" in line and "bytes free" in line, line
    leftovers = [str(p) for p in (run / "checkpoints").rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers and not (run / "checkpoints" / "latest").exists()


def test_rollout_beyond_memory_is_one_line_before_any_model(tiny, tmp_path):
    """#17 4: rollout.n far beyond memory ran into an out-of-memory. The samples a step keeps must fit the host,
    and one batch of the megatron engine's KV cache the device (the formula gad-plan uses)."""
    ok = [_row(i) for i in range(100)]
    r = gad_train(tmp_path, tiny, ok, "rollout.n=100000000")
    assert r.returncode == 2 and "rollout.n=100000000:" in r.stderr and "GiB of host memory" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = gad_train(tmp_path, tiny, ok, "rollout.engine=megatron", "rollout.max_batch_tokens=1000000000000")
    assert r.returncode == 2 and "rollout.max_batch_tokens=1000000000000: one batch of the megatron engine's KV" \
        in r.stderr, r.stderr
    assert gad_train(tmp_path, tiny, ok, "rollout.engine=megatron").returncode == 0


def test_a_forked_helper_does_not_keep_the_run_directory_locked(tmp_path):
    """#17 2: the lock is a flock on an open file, which fork shares. A checkpoint writer forked by a rank that was
    then killed kept the directory "in use" (seen as a flaky kill -9 + resume test)."""
    code = (
        "import os, sys, time\n"
        "from gad_megatron.runtime.outputs import lock_directory\n"
        "f = lock_directory(sys.argv[1])\n"
        "if os.fork() == 0:\n"
        "    time.sleep(15)\n"  # the orphaned helper, still writing
        "    os._exit(0)\n"
        "os._exit(0)\n"  # the rank dies without closing anything
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                   timeout=60, check=True)
    from gad_megatron.runtime.outputs import lock_directory

    lock_directory(str(tmp_path)).close()  # was: DirectoryBusy while the helper lived

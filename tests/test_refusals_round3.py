"""#24 (trustworthy runs, round 3): config values that passed `--check` and then ran silently wrong or died
after the models were built. Each is now one error naming the key, before any model is built. (Each test
fails without its fix: the value was accepted.)"""

import pytest

from gad_megatron.data import demo
from gad_megatron.data.teacher import DataError
from gad_megatron.trainer.build import plan_steps
from gad_megatron.trainer.preflight import Findings, check_config, check_positions
from gad_megatron.trainer.config import ConfigError, load_config


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return demo.make_student(str(tmp_path_factory.mktemp("demo") / "student"), seed=5)


def config(student, tmp_path, *over):
    return load_config(None, [f"model.student={student}", f"data.train={demo.ASSET}", f"log.run_dir={tmp_path}/run",
                              "parallel.device=cpu", "parallel.nproc=2", "train.batch_prompts=8",
                              "data.max_prompt_tokens=48", "data.max_response_tokens=12", "rollout.engine=megatron",
                              *over])


@pytest.mark.parametrize("over, needle", [
    # item 5: both weights of a mixed reward 0 -> every reward 0
    (["reward.source=mixed", "reward.scorer=gad_megatron.data.demo:score", "reward.weight_discriminator=0",
      "reward.weight_scorer=0"], "reward.weight_scorer=0.0: and reward.weight_discriminator are both 0"),
    # item 6: allow_changes naming keys that do not exist
    (["checkpoint.allow_changes=[g_optim.lrr,no_such.key,g_optim]"],
     "checkpoint.allow_changes=['g_optim.lrr', 'no_such.key', 'g_optim']: names no config key or section: "
     "['g_optim.lrr', 'no_such.key']"),
    # item 7: the GAD stage's batch not divisible by DP (2 ranks here)
    (["gad_stage.batch_prompts=3"], "gad_stage.batch_prompts=3: must be divisible by data-parallel size 2"),
    # item 8
    (["rollout.top_k=-5"], "rollout.top_k=-5: must be -1 (off) or >= 1"),
    # item 11: the GAD stage's min_lr above its lr (a bare megatron AssertionError at the first GAD step)
    (["gad_stage.g_lr=1e-4", "gad_stage.g_min_lr=0.01"], "gad_stage.g_min_lr=0.01: must be <= gad_stage.g_lr"),
    # item 18
    (["checkpoint.resume_step=-1"], "checkpoint.resume_step=-1: must be >= 0"),
])
def test_refused_by_the_config_check(student, tmp_path, over, needle):
    with pytest.raises(ConfigError) as e:
        config(student, tmp_path, *over)
    assert needle in str(e.value)


def test_accepted_neighbours_of_the_refused_values(student, tmp_path):
    config(student, tmp_path, "rollout.top_k=5", "checkpoint.allow_changes=[g_optim,train.total_steps]",
           "gad_stage.batch_prompts=4", "gad_stage.g_lr=1e-4", "gad_stage.g_min_lr=1e-5", "checkpoint.resume_step=0",
           "reward.source=mixed", "reward.scorer=gad_megatron.data.demo:score", "reward.weight_discriminator=0")


def test_gad_stage_batch_beyond_the_training_rows(student, tmp_path):
    """Item 7: gad_stage.batch_prompts=100000 with 320 training rows."""
    cfg = config(student, tmp_path, "gad_stage.batch_prompts=100000")
    with pytest.raises(DataError, match=r"gad_stage.batch_prompts=100000 is more than the 320 training examples"):
        plan_steps(cfg, 320)


SCORER_LIST = [1, 2, 3]  # item 14: reward.scorer naming something that is not callable


def test_a_scorer_that_is_not_a_function(student, tmp_path):
    cfg = config(student, tmp_path, "reward.source=scorer", "reward.scorer=test_refusals_round3:SCORER_LIST")
    with pytest.raises(ConfigError, match=r"reward.scorer='test_refusals_round3:SCORER_LIST': is a list, not a function"):
        check_config(cfg, Findings())


def test_eval_tokens_beyond_the_students_positions(student, tmp_path):
    """Item 4: 48 prompt + 250 eval tokens with a 256-position student decoded to ~275 positions, exit 0."""
    with pytest.raises(ConfigError, match=r"data.max_prompt_tokens \+ eval.max_tokens = 298 is beyond the student's "
                                          r"max_position_embeddings=256"):
        check_positions(config(student, tmp_path, "eval.max_tokens=250"), Findings())
    check_positions(config(student, tmp_path, "eval.max_tokens=200"), Findings())


def test_metrics_jsonl_is_strict_json(student, tmp_path):
    """Item 9: a step with nothing to measure d_acc on (every sample truncated) logged a bare NaN."""
    import json

    from gad_megatron.trainer.metrics import RunLog

    cfg = config(student, tmp_path, "log.tensorboard=false")
    log = RunLog(cfg, str(tmp_path / "run"), rank=0)
    log.step(1, {"d_acc": float("nan"), "d_loss": float("inf"), "g_loss": 0.5, "nested": [float("-inf"), 1.0]},
             {"step_seconds": 1.0})
    log.close()

    def strict(text):
        raise ValueError(f"not JSON: {text}")

    row = json.loads(open(tmp_path / "run" / "metrics.jsonl").read(), parse_constant=strict)
    assert row == {"step": 1, "d_acc": None, "d_loss": None, "g_loss": 0.5, "nested": [None, 1.0]}


@pytest.mark.parametrize("name, said", [("nan_on_count", "returned nan"), ("none_on_count", "returned None"),
                                        ("raises_on_count", "raised KeyError: 'no rule for count'")])
def test_a_scorer_failing_on_a_row_is_one_line_naming_it_and_the_row(student, tmp_path, name, said):
    """Items 15 and 16: a scorer raising, returning None, or NaN on some rows: a traceback naming neither the
    scorer nor the row, or every update skipped ending in 'all steps skipped'."""
    import os
    import subprocess
    import sys

    from conftest import ROOT
    from test_gad_train import write_config

    cfg = write_config(tmp_path / "c.yaml", student, tmp_path / "run", **{
        "parallel.nproc": 1, "reward.source": "scorer", "reward.scorer": f"scorers:{name}", "train.warmup_steps": 0,
        "train.critic_warmup": 0, "train.total_steps": 2, "eval.at_start": False, "data.heldout_size": 8})
    p = subprocess.run([sys.executable, "-m", "gad_megatron.trainer.cli", "--config", str(cfg)], cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": f"{ROOT}:{os.path.join(ROOT, 'tests')}", "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"gad-train: error: reward.scorer=scorers:{name} {said}") and "prompt id 'demo-" in last, last
    assert "Traceback" not in p.stderr, p.stderr[-3000:]


def _fake_ckpt(root, steps, latest, state=None):
    """A checkpoint root as the trainer leaves it (directories only; state.json for the latest)."""
    import json
    import os

    for step in steps:
        for part in ("student", "trainer"):
            os.makedirs(os.path.join(root, part, f"iter_{step:07d}"))
    with open(os.path.join(root, "latest"), "w") as f:
        f.write(str(latest))
    if state is not None:
        with open(os.path.join(root, "trainer", f"iter_{latest:07d}", "state.json"), "w") as f:
            json.dump(state, f)
    return str(root)


def test_resume_from_a_run_directory_is_not_a_silent_fresh_start(tmp_path):
    """Item 1: checkpoint.resume=<run dir> (not its checkpoints/) trained from step 1 without a word."""
    from omegaconf import OmegaConf

    from gad_megatron.trainer.run_checkpoints import resume_root

    run = tmp_path / "warm"
    _fake_ckpt(run / "checkpoints", [2], 2)
    cfg = OmegaConf.create({"checkpoint": {"resume": str(run)}})
    with pytest.raises(FileNotFoundError, match=rf"checkpoint.resume={run}: holds no checkpoint \(no latest\): it is a "
                                                rf"run directory, its checkpoints are in {run}/checkpoints"):
        resume_root(cfg, str(tmp_path / "own" / "checkpoints"))
    cfg.checkpoint.resume = str(run / "checkpoints")
    assert resume_root(cfg, str(tmp_path / "own" / "checkpoints")) == str(run / "checkpoints")


def test_a_pruned_resume_step_says_it_was_pruned_and_lists_the_kept_ones(tmp_path):
    """Item 17: 'the checkpoint was damaged after it was written' for a step keep_last had pruned."""
    from gad_megatron.trainer.checkpoint import latest_step

    root = _fake_ckpt(tmp_path / "ckpt", [4, 6], 6)
    with pytest.raises(FileNotFoundError, match=r"step 2 is not kept there \(checkpoint.keep_last prunes older ones\); "
                                                r"kept: 4, 6"):
        latest_step(root, 2, roles=("student",))
    assert latest_step(root, 4, roles=("student",)) == 4


def test_a_state_without_a_config_mapping(student, tmp_path, caplog):
    """Item 19: a config that is not a mapping was a TypeError traceback; item 3: no config at all resumed
    with changed settings and no word that nothing was compared."""
    import logging

    from gad_megatron.trainer.run_checkpoints import check_config_against

    cfg = config(student, tmp_path)
    bad = _fake_ckpt(tmp_path / "bad", [2], 2, state={"config": [1, 2], "step": 2})
    with pytest.raises(ValueError, match=r"bad/trainer/iter_0000002/state.json: not a trainer state \(its config is a "
                                         r"list, not a mapping\)"):
        check_config_against(cfg, bad, 2)
    bare = _fake_ckpt(tmp_path / "bare", [2], 2, state={"step": 2})
    with caplog.at_level(logging.WARNING, logger="gad_megatron"):
        check_config_against(cfg, bare, 2)
    assert "records no config: the resume cannot compare" in caplog.text


def test_ablate_checks_its_arguments_and_names_a_bad_summary(tmp_path, capsys):
    """Items 20 and 21: `ablate.py local --warmup-steps 0` said only 'warm start of seed 1 failed; see <log>';
    `ablate.py report` over a truncated summary.json was a JSONDecodeError traceback."""
    import os
    import sys

    from conftest import ROOT

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import ablate

    with pytest.raises(SystemExit) as e:
        ablate.main(["local", "--out", str(tmp_path / "a"), "--warmup-steps", "0"])
    assert e.value.code == 2 and "--warmup-steps 0 / --steps 40: each must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    run = tmp_path / "r" / "gad" / "seed1"
    run.mkdir(parents=True)
    (run / "summary.json").write_text('{"steps": 3, "evals": {"aft')
    assert ablate.main(["report", "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert f"ablate: {run}/summary.json: not valid JSON" in err and "Traceback" not in err


def test_training_rows_whose_ids_collide(tmp_path):
    """Item 24: two sources concatenated, both numbered from 0: half of the rows were dropped with exit 0."""
    import json

    from gad_megatron.data.teacher import DataStats, read_rows

    def row(i, prompt):
        return json.dumps({"id": f"r{i}", "messages": [{"role": "user", "content": prompt}], "teacher_response": "ok"})

    path = tmp_path / "t.jsonl"
    path.write_text("\n".join([row(0, "a"), row(1, "b"), row(0, "c")]) + "\n")
    with pytest.raises(DataError, match=rf"{path}:3: id 'r0' was already used by {path}:1 for another prompt or answer"):
        read_rows(str(path))
    stats = DataStats()
    assert len(read_rows(str(path), "skip", stats)) == 2 and stats.skipped_bad == 1  # skip: counted as a bad row
    path.write_text("\n".join([row(0, "a"), row(1, "b"), row(0, "a")]) + "\n")  # the same row twice: one kept
    stats = DataStats()
    assert len(read_rows(str(path), "error", stats)) == 2 and stats.duplicate_ids == 1


def test_a_rewritten_heldout_file_is_a_change_on_resume(student, tmp_path):
    """Item 2: only the training file's sha256 was recorded; a data.heldout rewritten under the same name was
    accepted on resume, changing every held-out number."""
    import json
    import shutil

    from gad_megatron.trainer.run_checkpoints import _plain_config, check_config_against
    from gad_megatron.trainer.drift import ResumeConfigError, data_digest

    held = tmp_path / "held.jsonl"
    shutil.copy(demo.ASSET, held)
    cfg = config(student, tmp_path, f"data.heldout={held}")
    state = {"config": json.loads(json.dumps(_plain_config(cfg))), "data_sha256": data_digest(demo.ASSET),
             "heldout_sha256": data_digest(str(held))}
    root = _fake_ckpt(tmp_path / "ckpt", [2], 2, state=state)
    check_config_against(cfg, root, 2)  # unchanged: accepted
    with open(held, "a") as f:
        f.write(open(demo.ASSET).readline())
    with pytest.raises(ResumeConfigError, match="heldout_sha256"):
        check_config_against(cfg, root, 2)
    check_config_against(config(student, tmp_path, f"data.heldout={held}", "checkpoint.allow_changes=[heldout_sha256]"),
                         root, 2)


def test_another_model_under_the_same_opd_teacher_path_is_a_change_on_resume(student, tmp_path):
    """#32 item 12: resuming with the same opd.teacher path now holding another model (2 x 128 became 3 x 64) was
    silent. The teacher folder's identity (names, sizes, configs, safetensors headers) is compared like the data."""
    import json
    import shutil

    from gad_megatron.trainer.run_checkpoints import _plain_config, check_config_against
    from gad_megatron.trainer.drift import ResumeConfigError, data_digest, model_digest

    teacher = tmp_path / "teacher"
    shutil.copytree(student, teacher)
    cfg = config(student, tmp_path, "reward.source=opd", f"opd.teacher={teacher}")
    state = {"config": json.loads(json.dumps(_plain_config(cfg))), "data_sha256": data_digest(demo.ASSET),
             "heldout_sha256": None, "teacher_sha256": model_digest(str(teacher))}
    root = _fake_ckpt(tmp_path / "ckpt", [2], 2, state=state)
    check_config_against(cfg, root, 2)  # unchanged: accepted
    hf = json.load(open(teacher / "config.json"))  # another architecture under the same path
    json.dump({**hf, "num_hidden_layers": hf["num_hidden_layers"] + 1}, open(teacher / "config.json", "w"))
    with pytest.raises(ResumeConfigError, match="teacher_sha256"):
        check_config_against(cfg, root, 2)
    check_config_against(config(student, tmp_path, "reward.source=opd", f"opd.teacher={teacher}",
                                "checkpoint.allow_changes=[teacher_sha256]"), root, 2)


def test_a_checkpoint_of_another_architecture_is_named_before_any_model_is_built(student, tmp_path):
    """Item 13: resuming from a checkpoint of another architecture was a 20-frame CheckpointingException
    ('Global shape mismatch') after the models were built."""
    import json
    import os

    from gad_megatron.trainer.run_checkpoints import check_config_against

    root = _fake_ckpt(tmp_path / "ckpt", [2], 2, state={"step": 2})
    os.makedirs(os.path.join(root, "student", "hf"))
    hf = json.load(open(os.path.join(student, "config.json")))
    json.dump({**hf, "num_hidden_layers": 3, "hidden_size": 256}, open(os.path.join(root, "student", "hf", "config.json"), "w"))
    with pytest.raises(ValueError, match=r"the student in .* is another architecture than .*\(num_layers 3 vs 2; "
                                         r"hidden_size 256 vs 128; kv_channels 64 vs 32\)"):
        check_config_against(config(student, tmp_path), root, 2)
    json.dump(hf, open(os.path.join(root, "student", "hf", "config.json"), "w"))
    check_config_against(config(student, tmp_path), root, 2)


def test_a_new_group_size_with_an_old_replay_buffer(student, tmp_path):
    """Item 10: rollout.n changed under allow_changes with a replay buffer of the old group size died at step 7
    in loss_func ("shape '[-1, 4]' is invalid for input of size 6")."""
    import json

    from gad_megatron.trainer.run_checkpoints import _plain_config, check_config_against
    from gad_megatron.trainer.drift import data_digest

    old = config(student, tmp_path, "reward.replay_steps=2", "rollout.n=4")
    state = {"config": json.loads(json.dumps(_plain_config(old))), "data_sha256": data_digest(demo.ASSET),
             "reward": {"replay": {"fifo": [[[[1, 2], [3], [[[4], 1], [[5], 1], [[6], 1], [[7], 1]]]]]}}}
    root = _fake_ckpt(tmp_path / "ckpt", [2], 2, state=state)
    changed = config(student, tmp_path, "reward.replay_steps=2", "rollout.n=6", "checkpoint.allow_changes=[rollout.n]")
    with pytest.raises(ValueError, match=r"rollout.n=6: .*state.json holds D's replay buffer of groups of 4 samples"):
        check_config_against(changed, root, 2)
    check_config_against(config(student, tmp_path, "reward.replay_steps=0", "rollout.n=6",
                                "checkpoint.allow_changes=[rollout.n,reward.replay_steps]"), root, 2)


def test_a_fake_server_does_not_outlive_the_test_that_started_it(tmp_path):
    """Item 26: a fake OpenAI server was seen running 20 minutes after the suite, its parent gone (a test
    process killed before its fixture could stop it)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil
    from conftest import HERE

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from conftest import Server; s = Server(); print(s.proc.pid, flush=True); time.sleep(600)",
                               HERE], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.path.dirname(HERE)})
    server = psutil.Process(int(holder.stdout.readline()))
    assert server.is_running()
    os.kill(holder.pid, signal.SIGKILL)  # the test process dies without a teardown
    holder.wait()
    deadline = time.time() + 15
    while time.time() < deadline and server.is_running() and server.status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.2)
    alive = server.is_running() and server.status() != psutil.STATUS_ZOMBIE
    if alive:
        server.kill()
    assert not alive, "the fake server outlived the process that started it"


def test_ctrl_c_while_a_scorer_hangs_says_so_at_once(student, tmp_path):
    """Item 22: the first Ctrl-C was swallowed without a word for as long as the scorer ran."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT
    from test_gad_train import write_config

    cfg = write_config(tmp_path / "c.yaml", student, tmp_path / "run", **{
        "parallel.nproc": 1, "reward.source": "scorer", "reward.scorer": "scorers:slow_on_count",
        "train.warmup_steps": 0, "train.critic_warmup": 0, "train.total_steps": 2, "eval.at_start": False})
    marker, err = tmp_path / "scoring", open(tmp_path / "err", "w")
    p = subprocess.Popen([sys.executable, "-m", "gad_megatron.trainer.cli", "--config", str(cfg)], cwd=ROOT, stderr=err,
                         stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": f"{ROOT}:{os.path.join(ROOT, 'tests')}",
                                                         "OMP_NUM_THREADS": "1", "GAD_TEST_MARKER": str(marker)})
    try:
        deadline = time.time() + 240
        while not marker.exists() and time.time() < deadline and p.poll() is None:
            time.sleep(0.2)
        assert marker.exists(), open(tmp_path / "err").read()[-3000:]
        p.send_signal(signal.SIGINT)
        time.sleep(3)
        said = open(tmp_path / "err").read()
        assert "gad-train: Ctrl-C: stopping when this step ends" in said and p.poll() is None, said[-2000:]
        p.send_signal(signal.SIGINT)  # the second one stops at once
        assert p.wait(timeout=30) == 130
    finally:
        if p.poll() is None:
            p.kill()


def test_a_step_that_cannot_finish_is_refused_saying_what_it_would_generate(student, tmp_path):
    """Item 25: rollout.n=100000 passed every check and the first step ran for hours. Now gad-train says what a
    step generates and holds and the planner's time for it, and refuses a step beyond train.max_step_hours."""
    import subprocess
    import sys

    base = [sys.executable, "-m", "gad_megatron.trainer.cli", "--check", f"model.student={student}", f"data.train={demo.ASSET}",
            f"log.run_dir={tmp_path}/run", "parallel.device=cpu", "parallel.nproc=2", "train.batch_prompts=8",
            "data.max_prompt_tokens=48", "data.max_response_tokens=12", "rollout.n=4"]
    ok = subprocess.run(base, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "one GAD step generates 32 samples (up to 384 new tokens) and holds up to 2,400 tokens" in ok.stderr
    assert "the planner's model (cpu, MFU 0.35) estimates" in ok.stderr
    # the case: the demo's 32 prompts a step, rollout.n=100000
    big = subprocess.run(base + ["train.batch_prompts=32", "rollout.n=100000"], capture_output=True, text=True,
                         timeout=300)
    assert big.returncode == 2, big.stderr
    err = big.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in big.stderr, big.stderr
    assert err[0].startswith("gad-train: error: 32 prompts x rollout.n=100000: 3,200,000 samples, up to 38,400,000 new "
                             "tokens a step; the planner's model (cpu, MFU 0.35) estimates ~"), err[0]
    assert "beyond train.max_step_hours=1.0" in err[0]
    assert not (tmp_path / "run").exists()


def test_the_step_estimate_grows_with_the_step_and_meets_the_limits(student, tmp_path):
    """Item 25, the numbers behind the refusal: samples / tokens exact, seconds from the planner's model rising
    with rollout.n; a limit of null lets it through; a Slurm job ending before one step could finish refuses it."""
    import time

    from gad_megatron.models.hf_config import arch_spec_from_dir
    from gad_megatron.trainer.build import load_data
    from gad_megatron.trainer.step_estimate import check_step_time, estimate_step

    arch = arch_spec_from_dir(student)
    cfg4 = config(student, tmp_path, "rollout.n=4")
    data = load_data(cfg4)
    e4 = estimate_step(cfg4, arch, data.train)
    e4000 = estimate_step(config(student, tmp_path, "rollout.n=4000"), arch, data.train)
    assert (e4.samples, e4.new_tokens_max, e4.tokens_held) == (32, 384, 8 * 4 * 60 + 8 * 60)
    assert (e4000.samples, e4000.new_tokens_max) == (32000, 384000)
    assert 0 < e4.gad_step_s < e4000.gad_step_s and e4000.gad_step_s > 100 * e4.gad_step_s
    check_step_time(cfg4, e4, env={})
    big = config(student, tmp_path, "train.batch_prompts=32", "rollout.n=100000")
    e_big = estimate_step(big, arch, data.train)
    with pytest.raises(ConfigError, match=r"beyond train.max_step_hours=1.0"):
        check_step_time(big, e_big, env={})
    check_step_time(config(student, tmp_path, "train.batch_prompts=32", "rollout.n=100000", "train.max_step_hours=null"),
                    e_big, env={})
    ends_soon = {"SLURM_JOB_END_TIME": str(int(time.time()) + 30)}
    check_step_time(cfg4, e4, env=ends_soon)  # a fraction of a second fits
    with pytest.raises(ConfigError, match=r"this Slurm job ends in .* no step could finish and be checkpointed"):
        check_step_time(cfg4, e4000, env=ends_soon)
    with pytest.raises(ConfigError, match=r"train.max_step_hours=0.0: must be > 0"):
        config(student, tmp_path, "train.max_step_hours=0")

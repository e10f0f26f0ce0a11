"""What a resume refuses or says before any model is built: a fresh start that would be silent, a pruned step,
changed data or teacher under the same path, another architecture, a new group size (#24 round 3)."""

import pytest

from gad_megatron.data import demo
from gad_megatron.data.teacher import DataError
from gad_megatron.trainer.build import plan_steps
from gad_megatron.trainer.preflight import Findings, check_config, check_positions
from gad_megatron.trainer.config import ConfigError, load_config


from demo_config import config, student  # noqa: E402,F401  (the shared fixture)


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

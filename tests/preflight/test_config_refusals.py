"""Config values that passed `--check` and then ran silently wrong or died after the models were built (#24
round 3): each is one error naming the key, before any model is built (each test fails without its fix)."""

import pytest

from gad_megatron.data import demo
from gad_megatron.data.teacher import DataError
from gad_megatron.trainer.build import plan_steps
from gad_megatron.trainer.preflight import Findings, check_config, check_positions
from gad_megatron.trainer.config import ConfigError, load_config


from demo_config import config, student  # noqa: E402,F401  (the shared fixture)


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
    cfg = config(student, tmp_path, "reward.source=scorer", "reward.scorer=test_config_refusals:SCORER_LIST")
    with pytest.raises(ConfigError, match=r"reward.scorer='test_config_refusals:SCORER_LIST': is a list, not a function"):
        check_config(cfg, Findings())


def test_eval_tokens_beyond_the_students_positions(student, tmp_path):
    """Item 4: 48 prompt + 250 eval tokens with a 256-position student decoded to ~275 positions, exit 0."""
    with pytest.raises(ConfigError, match=r"data.max_prompt_tokens \+ eval.max_tokens = 298 is beyond the student's "
                                          r"max_position_embeddings=256"):
        check_positions(config(student, tmp_path, "eval.max_tokens=250"), Findings())
    check_positions(config(student, tmp_path, "eval.max_tokens=200"), Findings())

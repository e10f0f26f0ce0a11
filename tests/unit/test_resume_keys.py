"""A config key added after a checkpoint was written (#23 added the `opd` section): resuming that checkpoint
with the key at its default is no change; setting it is one, refused like any other."""

import copy

import pytest

from gad_megatron.trainer.run_checkpoints import _default_config
from gad_megatron.trainer.drift import ResumeConfigError, check_resume_config


def test_a_key_newer_than_the_checkpoint_resumes_at_its_default():
    now = _default_config()
    saved = {k: v for k, v in copy.deepcopy(now).items() if k != "opd"}  # written before the section existed
    assert check_resume_config(saved, now, [], "ckpt", defaults=_default_config()) == []
    now["opd"]["coef"] = 2.0
    with pytest.raises(ResumeConfigError, match=r"opd.coef: 1.0 -> 2.0"):
        check_resume_config(saved, now, [], "ckpt", defaults=_default_config())
    # a key the checkpoint does hold still compares with the checkpoint's value, not the default
    saved["algo"]["kl_coef"] = 0.5
    with pytest.raises(ResumeConfigError, match=r"algo.kl_coef: 0.5 -> 0.001"):
        check_resume_config(saved, _default_config(), [], "ckpt", defaults=_default_config())

"""The demo's student and a config on it, shared by the refusal tests of this folder."""

import pytest

from gad_megatron.data import demo
from gad_megatron.trainer.config import load_config


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return demo.make_student(str(tmp_path_factory.mktemp("demo") / "student"), seed=5)


def config(student, tmp_path, *over):
    return load_config(None, [f"model.student={student}", f"data.train={demo.ASSET}", f"log.run_dir={tmp_path}/run",
                              "parallel.device=cpu", "parallel.nproc=2", "train.batch_prompts=8",
                              "data.max_prompt_tokens=48", "data.max_response_tokens=12", "rollout.engine=megatron",
                              *over])

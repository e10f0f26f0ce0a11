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

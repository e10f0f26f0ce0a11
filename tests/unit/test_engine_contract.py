"""The rollout engine contract (#23): one ABC states what the trainer calls; every registered engine (and the
no-cache megatron engine for virtual pipelines) implements it; the trainer calls nothing else; the config's
choices come from the registries."""

import ast
import inspect
import os

import pytest
from conftest import ROOT

from gad_megatron.rollout.base import RolloutEngine
from gad_megatron.rollout.factory import ENGINES, engine_choices, engine_class
from gad_megatron.rollout.reforward_engine import ReforwardEngine
from gad_megatron.trainer.reward_registry import REWARDS, reward_class, reward_choices
from gad_megatron.trainer.rewards import Reward

CONTRACT = {"generate", "update_weights", "score", "sleep", "wake_up", "shutdown", "collective", "live_weights"}


def all_engines():
    return [engine_class(n) for n in ENGINES] + [ReforwardEngine]


@pytest.mark.parametrize("cls", all_engines(), ids=lambda c: c.__name__)
def test_every_engine_implements_the_contract(cls):
    assert issubclass(cls, RolloutEngine) and not inspect.isabstract(cls), cls
    assert "generate" in cls.__dict__
    if cls.live_weights:  # samples with the trainer's parameters: every rank calls it, nothing to sync
        assert cls.collective
        with pytest.raises(NotImplementedError, match="live weights"):
            cls.update_weights(object.__new__(cls), [])
    else:  # a copy fed by the weight sync: it must load buckets, answer the probe and release memory
        for name in ("update_weights", "score", "sleep", "wake_up", "shutdown"):
            assert name in cls.__dict__, f"{cls.__name__} does not implement {name}"


def test_an_engine_without_generate_cannot_be_made():
    class NoGenerate(RolloutEngine):
        pass

    with pytest.raises(TypeError, match="generate"):
        NoGenerate()


def test_the_trainer_calls_only_what_the_contract_states():
    """Every attribute the trainer reads on a rollout engine (``engine.x``, ``self.engine.x``, ``t.engine.x``)."""
    used = {}
    # the files that hold a rollout engine (elsewhere in trainer/, `engine` names G's or D's TrainEngine)
    files = [os.path.join("trainer", f) for f in ("policy.py", "gad.py", "run.py", "heldout.py", "build.py")] + \
        [os.path.join("doctor", f) for f in os.listdir(os.path.join(ROOT, "gad_megatron", "doctor")) if f.endswith(".py")]
    for rel in files:
        for node in ast.walk(ast.parse(open(os.path.join(ROOT, "gad_megatron", rel)).read())):
            if isinstance(node, ast.Attribute):
                v = node.value
                owner = v.id if isinstance(v, ast.Name) else v.attr if isinstance(v, ast.Attribute) else None
                if owner == "engine" and node.attr != "setter":  # (the Trainer's property setter)
                    used.setdefault(node.attr, f"{rel}:{node.lineno}")
    assert used, "no engine call found: the scan is broken"
    extra = {k: where for k, where in used.items() if k not in CONTRACT}
    assert not extra, f"the trainer calls engine attributes outside the contract: {extra}"


def test_config_choices_come_from_the_registries():
    from gad_megatron.trainer.config import _CHOICES

    assert _CHOICES["rollout.engine"] == engine_choices() == ("auto",) + tuple(ENGINES)
    assert reward_choices() == tuple(REWARDS)
    for source in REWARDS:
        assert issubclass(reward_class(source), Reward)
    with pytest.raises(ValueError, match="use one of"):
        engine_class("sglang")
    with pytest.raises(ValueError, match="use one of discriminator, scorer"):
        reward_class("critic")
    with pytest.raises(ValueError, match="not a subclass of"):
        reward_class("gad_megatron.trainer.rewards:Scores")


def test_engines_are_built_one_way():
    """#34 / #30 item 1: the trainer, gad-eval and gad-doctor build engines through rollout.factory.build_engine (each
    class's ``build`` reads its part of EngineInputs); no other module constructs one or chooses one."""
    from gad_megatron.rollout.base import EngineInputs
    from gad_megatron.rollout.factory import build_engine

    for cls in all_engines():
        assert "build" in cls.__dict__, f"{cls.__name__} does not say how it is built"

    class Probe(RolloutEngine):
        @classmethod
        def build(cls, inputs):
            return (cls, inputs.chunks, inputs.max_batch_tokens)

        def generate(self, prompts, sampling):
            return []

    ENGINES["probe"] = f"{__name__}:Probe"
    globals()["Probe"] = Probe
    try:
        assert build_engine("probe", EngineInputs(chunks=["c"], max_batch_tokens=7)) == (Probe, ["c"], 7)
    finally:
        del ENGINES["probe"]
    pkg = os.path.join(ROOT, "gad_megatron")
    for root, _, files in os.walk(pkg):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), pkg)
            if not f.endswith(".py") or rel.startswith("rollout" + os.sep):
                continue
            text = open(os.path.join(root, f)).read()
            for made in ("VLLMEngine(", "MegatronEngine(", "ReforwardEngine(", "make_megatron_engine("):
                assert made not in text, f"{rel} builds an engine itself ({made}): use rollout.factory.build_engine"

"""Every check ``gad-train`` makes before any rank starts or any model is built, in one fixed order:

  config     the config's rules (config.validate), the scorers import, the reward's own files (OPD's teacher)
  data       every row reads, and the rows make at least one batch
  positions  a prompt plus an answer fit the student's position embeddings
  memory     the rollout topology, a step's samples in host memory, the engine's share of the device
  disk       room for the checkpoints and the export under log.run_dir
  step time  one step can finish inside the signal lead; the whole run inside train.max_run_hours
  resume     the checkpoint a resume would take accepts this config

A run stops at the first refusal, named in one line. ``gad-train --check`` (and ``gad-doctor --config``) run
every check whose inputs passed and list each refusal; a check whose input was refused (the step time without
readable data, the memory plan of a refused config) is said to be skipped, not guessed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from gad_megatron.convert.api import model_hf_dir
from gad_megatron.data.teacher import DataError
from gad_megatron.models.hf_config import arch_spec_from_dir
from gad_megatron.runtime.parallel import ranks_per_node
from gad_megatron.trainer.build import (check_rollout_memory, load_data, plan_steps, run_topology)
from gad_megatron.trainer.config import ConfigError, validate
from gad_megatron.trainer.config_rules import launch_world
from gad_megatron.trainer.disk import check_free_space
from gad_megatron.trainer.reward_registry import reward_class
from gad_megatron.trainer.rewards import load_scorer
from gad_megatron.trainer.run_checkpoints import precheck_resume
from gad_megatron.trainer.run_estimate import check_run_time, estimate_run
from gad_megatron.trainer.step_estimate import check_step_time, estimate_step

REFUSALS = (ConfigError, DataError, FileNotFoundError, ValueError, OSError, RuntimeError)


@dataclass
class Findings:
    """What the checks found that the run (or a later check) uses."""

    arch: object = None
    data: object = None
    schedule: object = None
    step: object = None  # step_estimate.StepEstimate
    run: object = None  # run_estimate.RunEstimate
    run_note: Optional[str] = None
    refused: list = field(default_factory=list)  # [(check, message)] in the order found
    passed: list = field(default_factory=list)  # the checks that ran and refused nothing
    skipped: list = field(default_factory=list)  # [(check, the input it lacks)]


def check_config(cfg, f: Findings) -> None:
    validate(cfg)
    scorers = {"eval.scorer": cfg.eval.scorer}
    try:
        source = reward_class(cfg.reward.source)
    except ValueError:
        source = None  # validate named it
    if source is not None:
        scorers.update(source.scorers(cfg))
    for key, spec in scorers.items():
        try:
            fn = load_scorer(spec)
        except Exception as e:  # noqa: BLE001  (whatever the import raises: one line naming the key)
            raise ConfigError(f"{key}={spec!r}: cannot be imported ({type(e).__name__}: {e})") from None
        if fn is not None and not callable(fn):
            raise ConfigError(f"{key}={spec!r}: is a {type(fn).__name__}, not a function (messages, text) -> float")
    problem = source.preflight(cfg, model_hf_dir(cfg.model.student)) if source and cfg.train.stage == "gad" else ""
    if problem:  # the reward's own files (OPD: the teacher's folder and tokenizer)
        raise ConfigError(problem)


def check_data(cfg, f: Findings) -> None:
    data = load_data(cfg)  # in the launching process, before any rank starts: tokenised once
    f.schedule = plan_steps(cfg, len(data.train), data.stats)
    f.data = data


def check_positions(cfg, f: Findings) -> None:
    f.arch = arch_spec_from_dir(model_hf_dir(cfg.model.student))
    limit = f.arch.max_position_embeddings
    for name, new in (("data.max_response_tokens", cfg.data.max_response_tokens), ("eval.max_tokens", cfg.eval.max_tokens)):
        if cfg.data.max_prompt_tokens + new > limit:
            raise ConfigError(f"data.max_prompt_tokens + {name} = {cfg.data.max_prompt_tokens + new} is beyond the "
                              f"student's max_position_embeddings={limit}")


def check_memory(cfg, f: Findings) -> None:
    arch = f.arch or arch_spec_from_dir(model_hf_dir(cfg.model.student))
    if cfg.train.stage == "gad":
        world = launch_world(cfg)
        run_topology(cfg, world, ranks_per_node(world))  # an engine that would span nodes is refused here
    check_rollout_memory(cfg, arch)


def check_disk(cfg, f: Findings) -> None:
    check_free_space(cfg, f.arch or arch_spec_from_dir(model_hf_dir(cfg.model.student)))


def check_time(cfg, f: Findings) -> None:
    arch = f.arch or arch_spec_from_dir(model_hf_dir(cfg.model.student))
    f.step = estimate_step(cfg, arch, f.data.train)
    check_step_time(cfg, f.step)  # a step that cannot finish inside the signal lead
    f.run = estimate_run(cfg, arch, f.data.train, len(f.data.held), f.schedule.warm, f.schedule.total)
    f.run_note = check_run_time(cfg, f.run)  # a run beyond train.max_run_hours


def check_resume(cfg, f: Findings) -> None:
    precheck_resume(cfg)


# (name, check, the checks it needs to have passed: a check whose input was refused is skipped, not guessed;
# the memory and step-time figures read the whole config, the reward's models and the data's lengths)
CHECKS = (("config", check_config, ()), ("data", check_data, ()), ("positions", check_positions, ()),
          ("memory", check_memory, ("config",)), ("disk", check_disk, ()), ("step time", check_time, ("config", "data")),
          ("resume", check_resume, ()))


def run_checks(cfg, keep_going: bool = False) -> Findings:
    """Every check in CHECKS' order. ``keep_going=False``: the first refusal raises (the run's way);
    True: each refusal is recorded in ``Findings.refused`` and the later checks still run (``--check``)."""
    f = Findings()
    for name, check, needs in CHECKS:
        lacking = [n for n in needs if n not in f.passed]
        if lacking:
            f.skipped.append((name, lacking[0]))
            continue
        try:
            check(cfg, f)
            f.passed.append(name)
        except REFUSALS as e:
            if not keep_going:
                raise
            f.refused.append((name, str(e)))
        except Exception:  # noqa: BLE001  (a check reading values the config check already refused)
            if not (keep_going and f.refused and f.refused[0][0] == "config"):
                raise
            f.skipped.append((name, "a valid config"))
    return f

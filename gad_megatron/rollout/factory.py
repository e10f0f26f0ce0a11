"""How a rollout engine is chosen and built: the one way for gad-train, gad-eval, gad-doctor and the planner.
Everything here asks the engine classes (:data:`ENGINES`), never an engine's name. The registry lives here,
not in ``rollout.base``: the engines import ``base``, and a registry there naming them would close a circle."""

from __future__ import annotations

import importlib

from gad_megatron.rollout.base import EngineInputs, RolloutEngine

# name -> "module:Class" of every engine ``rollout.engine`` may name (imported when chosen: vLLM's module
# imports only on a machine that has it). A new engine is one RolloutEngine subclass in one file and a line here.
ENGINES = {
    "vllm": "gad_megatron.rollout.vllm_engine:VLLMEngine",
    "megatron": "gad_megatron.rollout.megatron_engine:MegatronEngine",
}


def engine_choices() -> tuple:
    return ("auto",) + tuple(ENGINES)


def engine_class(name: str) -> type:
    if name not in ENGINES:
        raise ValueError(f"rollout engine {name!r}: use one of {', '.join(engine_choices())}")
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def choose_engine(requested: str) -> tuple:
    """``(engine, why)`` for ``rollout.engine`` (or gad-eval's ``--engine``): ``auto`` takes the first registered
    engine that is available here (vLLM where it imports, else the megatron engine)."""
    if requested not in engine_choices():
        raise ValueError(f"rollout engine {requested!r}: use one of {', '.join(engine_choices())}")
    if requested != "auto":
        return requested, "rollout.engine=" + requested
    missing = []
    for name in ENGINES:
        reason = engine_class(name).unavailable_reason()
        if reason is None:
            return name, "auto: " + ("; ".join(missing) + "; " if missing else "") + f"{name} is available"
        missing.append(reason)
    raise ValueError("rollout.engine=auto: no engine is available here (" + "; ".join(missing) + ")")


def live_engine() -> str:
    """The registered engine that samples with the trainer's own weights (no copy, no sync): SeqKD's held-out
    generation, and the engine every rank falls back to when ranks disagree on auto."""
    return next(name for name in ENGINES if engine_class(name).live_weights)


def planned_engine(requested: str) -> type:
    """The engine class a plan assumes for ``rollout.engine``: the named one; for auto, the one auto takes on a
    machine that has every engine installed (the first registered), wherever the plan is made."""
    return engine_class(next(iter(ENGINES)) if requested == "auto" else requested)


def possible_engines(requested: str) -> list:
    """The engine classes ``rollout.engine`` may turn out to be on the machine that runs it (auto: any)."""
    return [engine_class(name) for name in (ENGINES if requested == "auto" else [requested])]


def build_engine(name: str, inputs: EngineInputs) -> RolloutEngine:
    """The engine ``name`` (a registry name, not ``auto``: :func:`choose_engine` first) built from ``inputs``."""
    return engine_class(name).build(inputs)

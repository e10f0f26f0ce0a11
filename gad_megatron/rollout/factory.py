"""How a rollout engine is chosen and built: the one way for gad-train, gad-eval, gad-doctor and the planner.
Everything here asks the engine classes (``rollout.base.ENGINES``), never an engine's name."""

from __future__ import annotations

from gad_megatron.rollout.base import ENGINES, EngineInputs, RolloutEngine, engine_choices, engine_class


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

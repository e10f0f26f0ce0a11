"""How a rollout engine is chosen and built: the one way for gad-train, gad-eval and gad-doctor."""

from __future__ import annotations

from gad_megatron.rollout.base import EngineInputs, RolloutEngine, engine_choices, engine_class


def choose_engine(requested: str) -> tuple:
    """``(engine, why)`` for ``rollout.engine`` (or gad-eval's ``--engine``): ``auto`` takes vLLM where it imports,
    else the megatron engine."""
    if requested not in engine_choices():
        raise ValueError(f"rollout engine {requested!r}: use one of {', '.join(engine_choices())}")
    if requested != "auto":
        return requested, "rollout.engine=" + requested
    from gad_megatron.rollout.vllm_engine import vllm_unavailable_reason

    reason = vllm_unavailable_reason()
    return ("vllm", "auto: vLLM imports") if reason is None else ("megatron", "auto: " + reason)


def build_engine(name: str, inputs: EngineInputs) -> RolloutEngine:
    """The engine ``name`` (a registry name, not ``auto``: :func:`choose_engine` first) built from ``inputs``."""
    return engine_class(name).build(inputs)

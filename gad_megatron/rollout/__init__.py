"""Rollout: the student's on-policy samples. One interface (generate / update_weights), two engines:
vLLM (the real one, colocated with training) and the trainer's own megatron GPT (reference, no vLLM needed)."""

from gad_megatron.rollout.base import RolloutEngine, Sample, SamplingConfig

__all__ = ["RolloutEngine", "Sample", "SamplingConfig"]

"""Rollout: the student's on-policy samples. One interface (generate / update_weights), two engines:
vLLM (the real one, colocated with training) and the trainer's own megatron GPT (reference, no vLLM needed);
``weight_sync.py`` gathers G's shards into HF tensors and ``transport.py`` (a registry of Transport classes)
carries them into a separate engine."""

from gad_megatron.rollout.base import RolloutEngine, Sample, SamplingConfig

__all__ = ["RolloutEngine", "Sample", "SamplingConfig"]

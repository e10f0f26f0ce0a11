"""The pure math of GAD's generator update: GRPO group advantages, the PPO-clipped surrogate, low-variance KL,
truncated importance sampling and loss aggregation. Torch tensors in, tensors out; no megatron, no models
(the vocab-parallel logprobs live with the models, the per-micro-batch loss steps in ``trainer/steps.py``)."""

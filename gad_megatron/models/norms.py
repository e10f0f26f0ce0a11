"""RMSNorm for the local (no Transformer Engine, no apex) layer spec.

megatron-core's fallback ``WrappedTorchNorm`` refuses sequence parallelism. This is the same
``torch.nn.RMSNorm`` computation, with the weight marked ``sequence_parallel`` so megatron's
``finalize_model_grads`` all-reduces its gradient across the TP group when SP splits the sequence.
"""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.RMSNorm):
    def __init__(self, config, hidden_size: int, eps: float = 1e-6):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.config = config
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

"""One model under training: megatron-core DDP chunks + Megatron optimizer + the pipeline schedule.

Shared by the student (generator) and the discriminator; both sit on the same parallel state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class OptimConfig:
    lr: float = 1e-6  # paper: 1e-6 for G and D
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 0.2  # paper: grad clip 0.2
    use_distributed_optimizer: bool = False


class TrainEngine:
    def __init__(self, chunks: list, optim: Optional[OptimConfig] = None):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        optim = optim or OptimConfig()
        cfg = chunks[0].config
        # The schedule calls this after the last backward: DP all-reduce of grads and the all-reduce of tied
        # embedding / output-layer grads between the first and last pipeline stages.
        cfg.finalize_model_grads_func = finalize_model_grads
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=optim.use_distributed_optimizer,
        )
        self.chunks = [
            DistributedDataParallel(config=c.config, ddp_config=ddp_cfg, module=c, disable_bucketing=i > 0)
            for i, c in enumerate(chunks)
        ]
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=optim.lr,
                weight_decay=optim.weight_decay,
                adam_beta1=optim.adam_beta1,
                adam_beta2=optim.adam_beta2,
                adam_eps=optim.adam_eps,
                clip_grad=optim.clip_grad,
                bf16=cfg.bf16,
                fp16=cfg.fp16,
                params_dtype=cfg.params_dtype,
                use_distributed_optimizer=optim.use_distributed_optimizer,
            ),
            self.chunks,
        )

    def train_step(self, microbatches: list, step_fn: Callable) -> dict:
        """Forward/backward over ``microbatches`` through the pipeline schedule, then one optimizer step.

        Returns the last stage's reduced loss outputs (empty on other stages) plus ``grad_norm``.
        """
        from gad_megatron.models.forward import run_schedule

        for c in self.chunks:
            c.train()
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = run_schedule(self.chunks, microbatches, step_fn, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            raise FloatingPointError("optimizer step skipped (non-finite gradients)")
        return {"outputs": outputs, "grad_norm": grad_norm}

    @property
    def modules(self) -> list:
        return [c.module for c in self.chunks]


def reduce_token_mean(outputs: list, key: str) -> Optional[float]:
    """Token-weighted mean of ``[sum, count]`` entries across micro-batches (last stage only)."""
    if not outputs:
        return None
    tot = torch.stack([o[key] for o in outputs]).sum(0)
    return (tot[0] / tot[1]).item()

"""One model under training: megatron-core DDP chunks + Megatron optimizer + the pipeline schedule.

Shared by the student (generator) and the discriminator; both sit on the same parallel state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from gad_megatron.models.forward import run_schedule
from gad_megatron.runtime.parallel import comm_device
from gad_megatron.trainer.offload import StateOffload


@dataclass
class OptimConfig:
    lr: float = 1e-6  # paper: 1e-6 for G and D
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 0.2  # paper: grad clip 0.2
    use_distributed_optimizer: bool = False
    min_lr: float = 0.0
    schedule: str = "constant"  # constant | cosine (megatron's OptimizerParamScheduler)
    lr_warmup_steps: int = 0
    total_steps: int = 1  # decay horizon of the cosine schedule
    grad_reduce_in_fp32: bool = True  # False: DDP's gradient buffers and their DP reduction in the model dtype


class TrainEngine:
    """Wraps model chunks in megatron DDP with a Megatron optimizer and LR scheduler.

    Losses are summed per token and divided once by the global count (megatron's
    ``calculate_per_token_loss``): a step's loss_func returns ``(sum, count, logs)``. A step whose gradients
    are not finite (or that megatron's loss scaler rejects) is skipped: no parameter, optimizer state or
    scheduler moves, and ``train_step`` reports it.
    """

    def __init__(self, chunks: list, optim: Optional[OptimConfig] = None):
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        optim = optim or OptimConfig()
        self.optim = optim  # what it was built with (a later stage's schedule starts from it)
        self.use_distributed_optimizer = optim.use_distributed_optimizer
        cfg = chunks[0].config
        # The schedule calls this after the last backward: DP all-reduce of grads and the all-reduce of tied
        # embedding / output-layer grads between the first and last pipeline stages.
        cfg.finalize_model_grads_func = finalize_model_grads
        # Sum per token / sample, divide once by the count all-reduced over DP (finalize_model_grads): the
        # optimised loss is the global token mean whatever the micro-batching (see trainer/steps.py).
        cfg.calculate_per_token_loss = True
        on_gpu = next(chunks[0].parameters()).is_cuda
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=optim.grad_reduce_in_fp32,
            # GPU: each gradient bucket's DP reduction starts as soon as its backward is done (NCCL on its own
            # stream). CPU/gloo: off (nothing to overlap with on 2 cores). Parameter-gather overlap stays off:
            # it defers the distributed optimizer's all-gather to the next forward, but the weight sync reads
            # G's parameters right after its step.
            overlap_grad_reduce=on_gpu,
            overlap_param_gather=False,
            use_distributed_optimizer=optim.use_distributed_optimizer,
        )
        self.chunks = [
            DistributedDataParallel(config=c.config, ddp_config=ddp_cfg, module=c, disable_bucketing=i > 0)
            for i, c in enumerate(chunks)
        ]
        if ddp_cfg.overlap_grad_reduce:
            # As Megatron-LM's training loop: the schedule runs all but the last micro-batch under no_sync and
            # starts each chunk's grad reduction itself (pipeline); finalize_model_grads waits for them.
            no_sync = [m.no_sync for m in self.chunks]
            cfg.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
            cfg.grad_sync_func = [m.start_grad_sync for m in self.chunks] if len(self.chunks) > 1 else None
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=optim.lr,
                # the scheduler reads each param group's min_lr / max_lr (set from these)
                min_lr=optim.min_lr if optim.schedule == "cosine" else optim.lr,
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
        self.scheduler = None
        self.reschedule(optim)

        self.offload = StateOffload(self)  # rollout.offload: state in host memory while a rollout engine is awake
        self.bring_back = self.offload.to_device  # the Policy's own first puts a colocated engine to sleep

    def megatron_optimizers(self) -> list:
        """The megatron optimizers of this engine (a ChainedOptimizer holds several; each wraps a torch one)."""
        return list(getattr(self.optimizer, "chained_optimizers", None) or [self.optimizer])

    def has_optimizer_state(self) -> bool:
        """Adam has taken a step (it allocates its state then)."""
        return any(getattr(o, "optimizer", None) is not None and len(o.optimizer.state) for o in self.megatron_optimizers())

    def allocate_optimizer_state(self) -> None:
        """A fresh distributed optimizer reads its own state while building the sharded state dict it loads into
        (one ``step`` shared by every parameter): allocated first, zeros and step 0, as megatron's init_state_fn
        does for the others; the load then overwrites every value."""
        if not self.use_distributed_optimizer or self.has_optimizer_state():
            return
        for o in self.megatron_optimizers():
            fn, inner = getattr(o, "init_state_fn", None), getattr(o, "optimizer", None)
            if fn is not None and inner is not None:
                fn(inner, getattr(o, "config", None))
                for st in inner.state.values():
                    st.setdefault("step", torch.tensor(0.0))

    def ensure_resident(self) -> None:
        """Offloaded state back on the device (before an update, a forward, a checkpoint)."""
        if self.offload.away:
            self.bring_back()

    def reschedule(self, optim: OptimConfig) -> None:
        """A learning-rate schedule of its own from here on (a new training stage); the Adam moments stay."""
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        if optim.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule={optim.schedule!r}: use constant or cosine")
        for group in self.optimizer.param_groups:  # the scheduler reads each group's min_lr / max_lr
            group["max_lr"] = optim.lr
            group["min_lr"] = optim.min_lr if optim.schedule == "cosine" else optim.lr
        total = max(optim.total_steps, optim.lr_warmup_steps + 1)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if optim.lr_warmup_steps else optim.lr, max_lr=optim.lr,
            min_lr=optim.min_lr if optim.schedule == "cosine" else optim.lr,
            lr_warmup_steps=optim.lr_warmup_steps, lr_decay_steps=total, lr_decay_style=optim.schedule,
            start_wd=optim.weight_decay, end_wd=optim.weight_decay, wd_incr_steps=total, wd_incr_style="constant",
        )

    def _grads_finite(self) -> bool:
        """Collective over the world: every rank's gradient buffers are finite (after the DP reduction)."""
        import torch.distributed as dist

        # Every main_grad is a view into a DDP buffer's flat grad_data. An inf or NaN anywhere makes the sum inf or
        # NaN (a sum overflowing fp32, gradients ~1e30, counts as non-finite too: skipped): one read of the
        # buffer and no buffer-sized mask (isfinite().all() took 6 % of SmolLM2's update on CPU), combined on the
        # device, one host sync (the item() below) per step.
        checks = [torch.isfinite(buf.grad_data.sum()) for c in self.chunks
                  for buf in c.buffers + c.expert_parallel_buffers]
        ok = torch.stack(checks).all() if checks else torch.tensor(True)
        flag = ok.to(device=comm_device(), dtype=torch.float32).reshape(1)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() == 1.0)

    def train_step(self, microbatches: list, step_fn: Callable) -> dict:
        """Forward/backward over ``microbatches`` through the pipeline schedule, then one optimizer step.

        Returns the last stage's loss_func logs (empty on other stages), ``grad_norm``, ``lr`` and
        ``skipped`` (True when the gradients were not finite: nothing was updated).
        """
        self.ensure_resident()
        for c in self.chunks:
            c.train()
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = run_schedule(self.chunks, microbatches, step_fn, forward_only=False)
        lr = self.optimizer.param_groups[0]["lr"]
        if not self._grads_finite():
            for c in self.chunks:
                c.zero_grad_buffer()
            self.optimizer.zero_grad()
            return {"outputs": outputs, "grad_norm": float("nan"), "skipped": True, "lr": lr}
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        return {"outputs": outputs, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "skipped": not ok, "lr": lr}

    @property
    def modules(self) -> list:
        return [c.module for c in self.chunks]

    def eval_forward(self, microbatches: list, step_fn: Callable) -> list:
        """Forward only through the pipeline schedule (no grads); the last stage's loss_func logs."""
        self.ensure_resident()
        for c in self.chunks:
            c.eval()
        with torch.no_grad():
            return run_schedule(self.chunks, microbatches, step_fn, forward_only=True)


def reduce_token_mean(outputs: list, key: str) -> Optional[float]:
    """Token-weighted mean of ``[sum, count]`` entries across micro-batches (last stage only)."""
    if not outputs:
        return None
    tot = torch.stack([o[key] for o in outputs]).sum(0)
    return (tot[0] / tot[1]).item()

"""The planner's inputs (GPU types, a layout, the workload, the assumptions: MFU, bandwidths). They live below
the trainer so that gad-train can say before its first step what one step will cost (models/steptime.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from gad_megatron.models.storage import DTYPE_BYTES  # noqa: F401  (the planner's inputs name it here)
from gad_megatron.runtime.topology import rollout_topology

GIB = 1024**3
GPUS_PER_NODE = 8  # the planner's nodes (gad-plan --gpus-per-node sets the world, not this)


def planned_topology(world: int, rollout_tp: int):
    """The rollout engines the trainer builds for this world (``runtime.topology``, the one function both
    read): ``world / rollout_tp`` engines of ``rollout_tp`` GPUs, none across nodes."""
    return rollout_topology(world, rollout_tp, min(world, GPUS_PER_NODE))


@dataclass(frozen=True)
class CallCosts:
    """The fixed part of each call, whatever its size (Python, megatron's schedule, the optimizer's bookkeeping,
    an engine's scheduler and sampler): what a small model's step is made of. Measured by
    ``benchmarks/overheads.py``; zero where not measured (the GPUs: none lent yet; at the sizes run there the
    FLOP and byte terms dominate)."""

    fwd_call_s: float = 0.0  # one micro-batch of a forward-only pass
    train_call_s: float = 0.0  # one micro-batch of an update (forward + backward)
    optim_step_s: float = 0.0  # one optimizer step beyond its micro-batches
    decode_step_s: float = 0.0  # one decode step of a batch in an engine with its own copy of the weights (vLLM)
    live_decode_step_s: float = 0.0  # ... in an engine that samples with the trainer's live weights (megatron's)
    sync_s: float = 0.0  # one weight sync into a separate engine, its probe included

    def decode(self, live_weights: bool) -> float:
        return self.live_decode_step_s if live_weights else self.decode_step_s


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    bf16_tflops: float  # dense peak
    hbm_tbs: float  # HBM bandwidth, TB/s
    intra_node_gbs: float  # NVLink per GPU, GB/s (one direction)
    inter_node_gbs: float  # network per GPU, GB/s
    calls: CallCosts = CallCosts()


# The CPU entry's call costs: benchmarks/overheads.py on this project's 2-core VM, 2026-12-08, at the demo's world
# (2 ranks, gloo, a vLLM engine per rank: every call waits on the other rank and the engines share the 2 cores);
# the megatron engine's decode step at 1 rank, as the recipe runs it. At 1 rank the figures are lower (3.4 / 7.4 /
# 6.1 / 3.0 / 13.9 ms): the larger ones are kept (docs/performance.md). A decode step's cost per sequence in the
# batch measured ~0 (<= 0.1 ms) at 8 vs 32 sequences, so it is not modelled.
CPU_CALLS = CallCosts(fwd_call_s=0.0041, train_call_s=0.0132, optim_step_s=0.0200,
                      decode_step_s=0.0134, live_decode_step_s=0.0022, sync_s=0.0498)

GPUS = {
    "h100-80gb": GPU("h100-80gb", 80, 989, 3.35, 450, 50),
    "h200": GPU("h200", 141, 989, 4.8, 450, 50),
    "a100-80gb": GPU("a100-80gb", 80, 312, 2.0, 300, 25),
    "cpu": GPU("cpu", 24, 0.2, 0.02, 5, 1, CPU_CALLS),
}


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    sp: bool = False
    distributed_optimizer: bool = False
    recompute: Optional[str] = None  # None | selective | full
    rollout_tp: int = 1
    colocated: bool = True
    sleep: bool = True  # vLLM releases its memory while G and D train (colocated, GPU)
    offload_reference: bool = False
    # training state on the host while the rollout engine runs (rollout.offload): grads, optimizer, params
    offload: tuple = ()
    grad_bf16: bool = False  # parallel.grad_reduce_in_bf16: gradient buffers and their DP reduction in bf16

    def describe(self, world: int) -> str:
        dp = world // (self.tp * self.pp * self.cp)
        bits = [f"TP{self.tp}", f"PP{self.pp}", f"DP{dp}"] + ([f"CP{self.cp}"] if self.cp > 1 else [])
        bits += ["SP"] * self.sp + ["distopt"] * self.distributed_optimizer
        bits += [f"recompute={self.recompute}"] * bool(self.recompute) + [f"rolloutTP{self.rollout_tp}"]
        bits += ["colocated" if self.colocated else "split-engine"] + ["ref-offload"] * self.offload_reference
        bits += [f"offload={'+'.join(self.offload)}"] * bool(self.offload) + ["bf16-grads"] * self.grad_bf16
        return " ".join(bits)


@dataclass(frozen=True)
class Workload:
    batch_prompts: int = 256
    n: int = 8
    mean_prompt_tokens: int = 100  # LMSYS prompts are short
    mean_response_tokens: int = 400  # paper: teacher 329, GAD student 414
    max_prompt_tokens: int = 2048
    max_response_tokens: int = 1536
    micro_batch_tokens: int = 16384
    dtype: str = "bf16"
    gad_steps: int = 1600  # paper: ~2,400 steps over 3 epochs, the first epoch (~800) warmup
    warmup_steps: int = 800
    stage: str = "gad"  # gad | seqkd (the baseline trains G alone: no D, no reference, no rollout engine)
    # The rollout engine's kind (its class's ``live_weights``): False, a second copy of the weights + paged KV
    # (vLLM); True, G's own weights + a KV cache allocated per rollout batch of at most max_batch_tokens tokens
    # and freed before training (rollout/megatron_engine.py): no copy, no weight sync.
    engine_live_weights: bool = False
    max_batch_tokens: int = 131072
    keep_last: int = 3  # checkpoints kept (checkpoint.keep_last): the run directory's disk need
    # vLLM's memory budget (rollout.gpu_memory_utilization; rollout.kv_cache_gb instead when set): a colocated
    # engine starts only when that share of the GPU is free, whatever its weights and KV cache need
    gpu_memory_utilization: float = 0.7
    kv_cache_gb: Optional[float] = None
    one_pass: bool = True  # G's old logprobs come from its update's forward (algo.one_pass, on-policy)
    # What the reward adds (its class's ``planned_models``): a D trained beside G (GAD's), and a local frozen
    # teacher (OPD's) of teacher_params parameters on G's parallel state, in host memory between uses when offloaded.
    discriminator: bool = True
    teacher_params: int = 0
    teacher_offloaded: bool = False
    export_hf: bool = True  # checkpoint.export_hf_at_end


@dataclass(frozen=True)
class Assumptions:
    mfu: float = 0.35  # training FLOPs utilisation (megatron, bf16, H100 class)
    decode_bw_efficiency: float = 0.6  # fraction of HBM bandwidth a decode step achieves
    decode_tail: float = 2.0  # longest response in a wave / mean (a wave waits for its longest sample)
    max_num_seqs: int = 256  # vLLM's concurrent sequences per engine
    flash_attention: bool = True  # fused attention (TE / flash) on GPU: no s x s probabilities kept
    overhead_gib: float = 3.0  # CUDA context, allocator fragmentation, NCCL buffers
    vllm_overhead_gib: float = 2.0  # vLLM's own context, CUDA graphs
    ckpt_write_gbs: float = 2.0  # the run directory's write bandwidth for one checkpoint, GB/s (all ranks together)
    signal_slack_s: float = 60.0  # after the checkpoint: exit, the stop marker, the requeue
    pcie_gbs: float = 25.0  # host <-> GPU copies (offloaded training state, the offloaded reference), GB/s





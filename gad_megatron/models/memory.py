"""Bytes per GPU: megatron's grad-buffer layout, optimizer shards, activations, vLLM; the memory plan."""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, replace
from typing import Optional

from gad_megatron.models.params import param_list, total_params
from gad_megatron.models.plan_inputs import DTYPE_BYTES, GIB, GPU, Assumptions, Layout, Workload, planned_topology
from gad_megatron.models.roles import D_ROLE

# ---- memory ----------------------------------------------------------------------------------------------------
def kv_bytes_per_token(num_layers: int, num_query_groups: int, kv_channels: int, dtype_bytes: int, tp: int = 1,
                       pp: int = 1) -> int:
    """KV-cache bytes one (sample x token) takes on one rank: K and V for the rank's layers and query groups
    (the megatron engine's cache, ``gad-plan``'s ``megatron_kv`` and the trainer's memory check all use this)."""
    return 2 * -(-num_layers // pp) * max(1, num_query_groups // tp) * kv_channels * dtype_bytes


def ddp_bucket_size(on_gpu: bool, dp: int, stage: int):
    """Megatron DDP's bucket size as TrainEngine configures it: buckets only where the grad reduction overlaps
    the backward (GPU), only on the first pipeline stage, max(40M, 1M x DP) parameters; otherwise one bucket."""
    return max(40_000_000, 1_000_000 * dp) if on_gpu and stage == 0 else None


def grad_buffer_layout(params: list, dp: int, distributed: bool, bucket_size=None):
    """Megatron's ``_ParamAndGradBuffer`` layout: parameters in reverse order (backprop order); with the
    distributed optimizer each parameter starts on a multiple of 64 elements, each bucket ends on a multiple of
    lcm(DP, 128) (so it shards evenly) and a ``shared_embedding`` parameter gets a bucket of its own.
    Returns (buffer numel, [(bucket start, end)], [(param start, end)] in ``params``' order)."""
    pad = lambda n, d: -(-n // d) * d  # noqa: E731
    end_pad = (lambda n: pad(n, math.lcm(dp, 128))) if distributed else (lambda n: n)
    index = [None] * len(params)
    buckets, start, bucket_start, in_bucket = [], 0, 0, 0
    for i in range(len(params) - 1, -1, -1):
        _, numel, shared = params[i]
        own_bucket = shared and distributed
        if distributed:
            start = pad(start, 64)
        if own_bucket and in_bucket:  # close the bucket before it
            buckets.append((bucket_start, end_pad(start)))
            start = bucket_start = buckets[-1][1]
            in_bucket = 0
        index[i] = (start, start + numel)
        in_bucket += 1
        start += numel
        if (bucket_size is not None and start - bucket_start >= bucket_size) or own_bucket:
            buckets.append((bucket_start, end_pad(start)))
            start = bucket_start = buckets[-1][1]
            in_bucket = 0
    if in_bucket:
        buckets.append((bucket_start, end_pad(start)))
    return (buckets[-1][1] if buckets else 0), buckets, index


def optimizer_shard_numels(params: list, dp: int, distributed: bool, bucket_size=None) -> list:
    """Per DP rank, the elements of parameters whose optimizer state it holds: all of them without the
    distributed optimizer; with it, the rank's contiguous 1/DP of every bucket intersected with the parameters
    there."""
    if not distributed:
        return [sum(n for _, n, _ in params)] * dp
    return list(_distributed_shards(tuple(params), dp, bucket_size))


@functools.lru_cache(maxsize=512)  # gad-plan --search asks for the same stage's shards thousands of times
def _distributed_shards(params: tuple, dp: int, bucket_size) -> tuple:
    _, buckets, index = grad_buffer_layout(list(params), dp, True, bucket_size)
    shards = [0] * dp
    for b0, b1 in buckets:
        size = (b1 - b0) // dp
        inside = [(s, e) for s, e in index if b0 <= s < b1]
        for r in range(dp):
            lo, hi = b0 + r * size, b0 + (r + 1) * size
            shards[r] += sum(max(0, min(hi, e) - max(lo, s)) for s, e in inside)
    return tuple(shards)


def optimizer_bytes(params: list, dtype: str, dp: int, distributed: bool, dp_rank=None, bucket_size=None) -> int:
    """Adam's fp32 exp_avg + exp_avg_sq (+ the fp32 master copy when training in bf16 / fp16) that one rank of a
    ``param_list`` holds: DP rank ``dp_rank``, or the most loaded one."""
    per = 8 + (4 if dtype != "fp32" else 0)
    shards = optimizer_shard_numels(params, dp, distributed, bucket_size)
    return per * (max(shards) if dp_rank is None else shards[dp_rank])


def grad_bytes(params: list, dp: int, distributed: bool, bucket_size=None, own_buffer: tuple = ()) -> int:
    """DDP's fp32 main-grad buffers (``grad_reduce_in_fp32``), padding included. ``own_buffer``: names of
    parameters of another dtype than the rest (D's fp32 head in a bf16 / fp16 model), which megatron gives a
    buffer of their own, padded on its own."""
    main = [p for p in params if p[0] not in own_buffer]
    other = [p for p in params if p[0] in own_buffer]
    return 4 * sum(grad_buffer_layout(pl, dp, distributed, bucket_size)[0] for pl in (main, other) if pl)


def fp32_params(role: str, dtype: str) -> tuple:
    """Parameters kept in fp32 whatever the model dtype: the discriminator's scalar head (models/discriminator)."""
    return ("output_layer.weight",) if role == D_ROLE and dtype != "fp32" else ()


def activation_bytes_per_token_layer(arch, lay: Layout, dtype: str, seq_len: int, flash: bool,
                                     local_spec: Optional[bool] = None) -> float:
    """``flash``: a fused attention kernel (TE / flash on GPU, torch's SDPA on CPU) keeps no s x s probabilities;
    ``local_spec`` (default: neither flash nor selective recompute): megatron's local layers, whose unfused ops
    keep extra copies."""
    b = DTYPE_BYTES[dtype]
    h, f = arch.hidden_size, arch.ffn_hidden_size
    q, kv = arch.num_attention_heads * arch.kv_channels, arch.num_query_groups * arch.kv_channels
    t = lay.tp
    hs = h / t if lay.sp else h  # sequence-parallel regions hold 1/TP of the tokens
    if lay.recompute == "full":
        return b * hs  # the layer input only
    per = b * (4 * hs + (q + 2 * kv) / t + q / t + 2 * f / t + f / t)
    if lay.recompute == "selective" or flash:
        per += 4 * arch.num_attention_heads / t  # softmax statistics (logsumexp) of the fused kernel
    else:  # the probabilities (softmax in fp32, then a copy in the compute dtype)
        per += (arch.num_attention_heads / t) * seq_len * (b + (4 if b < 4 else 0))
    if local_spec is None:
        local_spec = not (flash or lay.recompute == "selective")
    if local_spec:
        # local-spec layers: q/k/v transposed copies, rotary outputs, SiLU's input and output, fp32 norm
        # statistics / upcasts.
        per += b * (2 * f / t + (q + 2 * kv) / t + (q + kv) / t)
        per += 2 * hs * 4 if b < 4 else 0
    return per


@dataclass
class MemoryPlan:
    weights: float
    grads: float
    optimizer: float
    activations: float
    logits: float
    reference: float
    vllm_weights: float
    vllm_kv: float
    overhead: float
    megatron_kv: float = 0.0  # the megatron engine's KV cache (rollout phase only)
    teacher: float = 0.0  # a local frozen teacher's shard (OPD), unless it waits in host memory between uses
    # what vLLM takes in the rollout phase: gpu_memory_utilization x the GPU (it starts only when that much is
    # free; the KV cache fills what its weights leave), or its weights + kv_cache_gb + overhead when set
    vllm_share: float = 0.0
    resident_rollout: float = 0.0  # training state that stays on the GPU while vLLM runs (colocated)
    train_phase: float = 0.0
    rollout_phase: float = 0.0
    peak: float = 0.0

    def gib(self) -> dict:
        return {k: round(v / GIB, 2) for k, v in asdict(self).items()}


def plan_memory(arch, lay: Layout, world: int, wl: Workload, gpu: GPU, asm: Assumptions) -> MemoryPlan:
    dp = world // (lay.tp * lay.pp * lay.cp)
    b = DTYPE_BYTES[wl.dtype]
    do = lay.distributed_optimizer

    def stage_state(stage: int):  # (weights, grads, optimizer, reference) bytes of one rank of this stage
        bucket = ddp_bucket_size(gpu.name != "cpu", dp, stage)
        roles = ["student"] + ([D_ROLE] if wl.stage != "seqkd" and wl.discriminator else [])
        lists = [param_list(arch, lay.tp, lay.pp, stage, r) for r in roles]
        n = [sum(x for _, x, _ in pl) for pl in lists]
        return (sum(n) * b, sum(grad_bytes(pl, dp, do, bucket, fp32_params(r, wl.dtype)) for pl, r in zip(lists, roles)),
                sum(optimizer_bytes(pl, wl.dtype, dp, do, bucket_size=bucket) for pl in lists),
                0 if lay.offload_reference or wl.stage == "seqkd" else n[0] * b)

    # the most loaded stage is the first (embeddings) or the last (output layer)
    weights, grads, optim, reference = max((stage_state(s) for s in {0, lay.pp - 1}), key=sum)
    if lay.grad_bf16:  # 2-byte main grads (D's fp32 head keeps 4, negligible)
        grads /= 2
    seq = wl.max_prompt_tokens + wl.max_response_tokens
    mb_tokens = wl.micro_batch_tokens // lay.cp
    in_flight = lay.pp  # 1F1B: the first stage holds pp micro-batches
    per_layer = activation_bytes_per_token_layer(arch, lay, wl.dtype, seq, asm.flash_attention)
    layers_here = arch.num_layers // lay.pp
    acts = per_layer * mb_tokens * layers_here * in_flight
    if lay.recompute == "full":
        acts += activation_bytes_per_token_layer(arch, replace(lay, recompute=None), wl.dtype, seq, asm.flash_attention) * mb_tokens
    logits = mb_tokens * (arch.vocab_size / lay.tp) * 4 * 2  # fp32 logits + their softmax for the backward
    vllm_w = total_params(arch) * b / lay.rollout_tp if wl.stage == "gad" else 0.0
    engines = planned_topology(world, lay.rollout_tp).engines
    samples = math.ceil(wl.batch_prompts * wl.n / engines)
    kv_per_token = 2 * arch.num_layers * arch.num_query_groups * arch.kv_channels * b / lay.rollout_tp
    # Paged KV: the tokens the running sequences actually hold (a wave's longest answers set the need).
    live_tokens = wl.mean_prompt_tokens + min(wl.max_response_tokens, wl.mean_response_tokens * asm.decode_tail)
    vllm_kv = min(samples, asm.max_num_seqs) * live_tokens * kv_per_token if wl.stage == "gad" else 0.0
    overhead = asm.overhead_gib * GIB
    # a frozen teacher on G's parallel state: its layers split over TP x PP like G's (OPD, opd.offload_teacher)
    teacher = 0.0 if wl.teacher_offloaded or wl.stage != "gad" else wl.teacher_params * b / (lay.tp * lay.pp)
    resident = weights + grads + optim + reference + teacher + overhead
    vllm = vllm_w + vllm_kv + (asm.vllm_overhead_gib * GIB if wl.stage == "gad" else 0)
    megatron_kv = 0.0
    if wl.engine_live_weights and wl.stage == "gad":
        # No second copy of the weights; the cache holds a batch's samples x (longest prompt + max tokens) for
        # this rank's layers and query groups, and is freed before G and D train.
        rows_tokens = min(wl.max_batch_tokens, samples * engines // (dp or 1) * seq)
        megatron_kv = rows_tokens * kv_bytes_per_token(arch.num_layers, arch.num_query_groups, arch.kv_channels, b,
                                                       lay.tp, lay.pp)
        vllm_w = vllm_kv = 0.0
        vllm = megatron_kv
        lay = replace(lay, sleep=True, colocated=True)
    share = vllm
    if not wl.engine_live_weights and wl.stage == "gad" and gpu.name != "cpu":
        share = (vllm_w + wl.kv_cache_gb * GIB + asm.vllm_overhead_gib * GIB if wl.kv_cache_gb is not None
                 else max(vllm, wl.gpu_memory_utilization * gpu.memory_gib * GIB))
    if lay.colocated:
        train_phase = resident + acts + logits + (0 if lay.sleep else vllm)
        rollout_phase = resident + share
    else:
        train_phase = resident + acts + logits
        rollout_phase = share  # on the engine's own GPUs
    if lay.colocated:  # what rollout.offload moves to the host for the rollout phase
        away = (grads * ("grads" in lay.offload) + optim * ("optimizer" in lay.offload)
                + weights * ("params" in lay.offload and not wl.engine_live_weights))
        rollout_phase -= away
    mp = MemoryPlan(weights, grads, optim, acts, logits, reference, vllm_w, vllm_kv, overhead, megatron_kv, teacher,
                    vllm_share=share, resident_rollout=rollout_phase - share if lay.colocated else 0.0)
    mp.train_phase, mp.rollout_phase = train_phase, rollout_phase
    mp.peak = max(train_phase, rollout_phase)
    return mp


def vllm_start_refusal(mem: MemoryPlan, wl: Workload, gpu: GPU) -> str:
    """One line with the numbers when a colocated vLLM engine cannot start: the training state left on the GPU
    in the rollout phase plus the share vLLM asks for exceed the GPU; '' when it can."""
    if not mem.resident_rollout or not mem.vllm_share or mem.rollout_phase <= gpu.memory_gib * GIB:
        return ""
    asks = (f"rollout.kv_cache_gb={wl.kv_cache_gb} (+ its weights and overhead)" if wl.kv_cache_gb is not None
            else f"rollout.gpu_memory_utilization={wl.gpu_memory_utilization}")
    return (f"vLLM cannot start in the rollout phase: {mem.resident_rollout / GIB:.1f} GiB of training state stays "
            f"on each GPU (of weights {mem.weights / GIB:.1f}, grads {mem.grads / GIB:.1f}, optimizer "
            f"{mem.optimizer / GIB:.1f}, reference {mem.reference / GIB:.1f}, overhead {mem.overhead / GIB:.1f}; "
            f"rollout.offload moves grads / optimizer / params to the host) and "
            f"vLLM at {asks} asks for {mem.vllm_share / GIB:.1f} GiB: {mem.rollout_phase / GIB:.1f} GiB > the "
            f"{gpu.name}'s {gpu.memory_gib:g} GiB")


def offloaded_bytes(arch, lay: Layout, world: int, wl: Workload, gpu: GPU, asm: Assumptions) -> float:
    """Bytes ``rollout.offload`` moves to the host (and back) each rollout, per GPU."""
    mp = plan_memory(arch, lay, world, wl, gpu, asm)
    return (mp.grads * ("grads" in lay.offload) + mp.optimizer * ("optimizer" in lay.offload)
            + mp.weights * ("params" in lay.offload and not wl.engine_live_weights))

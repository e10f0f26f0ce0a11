"""``gad-plan``: memory per GPU and time per step of a GAD run, for a model, a GPU type, a node count and a
layout; layouts that do not fit are refused, those that fit are ranked by predicted run time.

    gad-plan --config examples/configs/gad_qwen2.5_14b.yaml --gpu h100-80gb --nodes 2
    gad-plan --model qwen2.5-14b --gpu h100-80gb --nodes 2 --search          # every layout, ranked
    gad-plan --config run.yaml --nodes 2 --shell                                 # KEY=VALUE for sbatch scripts

Memory (bytes per GPU, the most loaded pipeline stage):
- weights: the rank's parameters x dtype bytes, counted exactly as megatron shards them (TP splits of
  QKV / proj / fc1 / fc2 / vocab, replicated norms, embeddings on the first stage, output layer on the last,
  the discriminator's scalar head instead of the vocabulary projection) -- for G, D and (unless offloaded)
  the reference;
- grads: megatron DDP's fp32 main-grad buffer (``grad_reduce_in_fp32``): 4 bytes per parameter plus the
  distributed optimizer's padding, laid out as megatron lays it out (``grad_buffer_layout``);
- optimizer: Adam's two fp32 moments + an fp32 master copy when training in bf16/fp16; with the distributed
  optimizer, the most loaded DP rank's shard of that padded buffer (``optimizer_shard_numels``);
- activations (training, one micro-batch of ``micro_batch_tokens``, times the micro-batches 1F1B keeps in
  flight on the first stage): per token per layer, in dtype bytes, the tensors autograd saves: norm inputs and
  outputs (2h + 2h, /TP with sequence parallel), QKV (q + 2kv)/TP, attention output q/TP, fc1 2f/TP, SwiGLU
  output f/TP, plus the attention probabilities (a/TP x s per token) without a fused (flash) kernel; with
  full recomputation only each layer's input is kept; plus the fp32 vocab-parallel logits;
- vLLM (colocated): its weights at rollout TP and the KV cache the rollout batch needs; with sleep mode they
  are released while G and D train, so the peak is max(rollout phase, training phase).
Time per step: rollout decode (memory-bound: weights + KV read per decoded token step, in waves of
``max_num_seqs``), the FLOPs of G (old logprobs, update), the reference, D (scores, update) at an assumed MFU,
the DP gradient reduction, and the weight sync. The assumptions are arguments, printed with the plan.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

GIB = 1024**3


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    bf16_tflops: float  # dense peak
    hbm_tbs: float  # HBM bandwidth, TB/s
    intra_node_gbs: float  # NVLink per GPU, GB/s (one direction)
    inter_node_gbs: float  # network per GPU, GB/s


GPUS = {
    "h100-80gb": GPU("h100-80gb", 80, 989, 3.35, 450, 50),
    "h200": GPU("h200", 141, 989, 4.8, 450, 50),
    "a100-80gb": GPU("a100-80gb", 80, 312, 2.0, 300, 25),
    "cpu": GPU("cpu", 24, 0.2, 0.02, 5, 1),
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

    def describe(self, world: int) -> str:
        dp = world // (self.tp * self.pp * self.cp)
        bits = [f"TP{self.tp}", f"PP{self.pp}", f"DP{dp}"] + ([f"CP{self.cp}"] if self.cp > 1 else [])
        bits += ["SP"] * self.sp + ["distopt"] * self.distributed_optimizer
        bits += [f"recompute={self.recompute}"] * bool(self.recompute) + [f"rolloutTP{self.rollout_tp}"]
        bits += ["colocated" if self.colocated else "split-engine"] + ["ref-offload"] * self.offload_reference
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


@dataclass(frozen=True)
class Assumptions:
    mfu: float = 0.35  # training FLOPs utilisation (megatron, bf16, H100 class)
    decode_bw_efficiency: float = 0.6  # fraction of HBM bandwidth a decode step achieves
    decode_tail: float = 2.0  # longest response in a wave / mean (a wave waits for its longest sample)
    max_num_seqs: int = 256  # vLLM's concurrent sequences per engine
    flash_attention: bool = True  # fused attention (TE / flash) on GPU: no s x s probabilities kept
    overhead_gib: float = 3.0  # CUDA context, allocator fragmentation, NCCL buffers
    vllm_overhead_gib: float = 2.0  # vLLM's own context, CUDA graphs


DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


# ---- parameters, exactly as megatron shards them --------------------------------------------------------------
def param_list(arch, tp: int, pp: int, stage: int, role: str = "student") -> list:
    """(name, numel, shared_embedding) of one rank of pipeline ``stage`` (any TP rank: the splits are even), in
    the order megatron's GPTModel (local spec) registers them -- the order its DDP grad buffer is laid out in.
    TP splits QKV / proj / fc1 / fc2 / the vocabulary; norms are replicated; the embedding lives on the first
    stage, the output layer on the last (a tied one is a copy there when pp > 1, flagged ``shared_embedding``);
    the discriminator's scalar head (1 x h, its input dimension split over TP) replaces the vocabulary
    projection."""
    h, f, q, kv = arch.hidden_size, arch.ffn_hidden_size, arch.num_attention_heads * arch.kv_channels, \
        arch.num_query_groups * arch.kv_channels
    student = role != "discriminator"
    tied_copy = student and arch.tie_word_embeddings and pp > 1
    out = []
    if stage == 0:
        out.append(("embedding.word_embeddings.weight", arch.vocab_size // tp * h, tied_copy))
    for i in range(arch.num_layers // pp):
        pre = f"decoder.layers.{i}."
        out.append((pre + "input_layernorm.weight", h, False))
        out.append((pre + "self_attention.linear_proj.weight", q * h // tp, False))
        out.append((pre + "self_attention.linear_qkv.weight", h * (q + 2 * kv) // tp, False))
        if arch.qkv_bias:
            out.append((pre + "self_attention.linear_qkv.bias", (q + 2 * kv) // tp, False))
        if arch.qk_layernorm:
            out += [(pre + "self_attention.q_layernorm.weight", arch.kv_channels, False),
                    (pre + "self_attention.k_layernorm.weight", arch.kv_channels, False)]
        out.append((pre + "pre_mlp_layernorm.weight", h, False))
        out.append((pre + "mlp.linear_fc1.weight", h * 2 * f // tp, False))  # gate + up
        out.append((pre + "mlp.linear_fc2.weight", f * h // tp, False))
    if stage == pp - 1:
        out.append(("decoder.final_layernorm.weight", h, False))
        if not student:
            out.append(("output_layer.weight", h // tp, False))
        elif not arch.tie_word_embeddings or pp > 1:
            out.append(("output_layer.weight", arch.vocab_size // tp * h, tied_copy))
    return out


def rank_params(arch, tp: int, pp: int, stage: int, role: str = "student") -> int:
    """Parameters one rank of pipeline ``stage`` holds."""
    return sum(n for _, n, _ in param_list(arch, tp, pp, stage, role))


def total_params(arch, role: str = "student") -> int:
    return rank_params(arch, 1, 1, 0, role)


# ---- memory ----------------------------------------------------------------------------------------------------
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
    _, buckets, index = grad_buffer_layout(params, dp, True, bucket_size)
    shards = [0] * dp
    for b0, b1 in buckets:
        size = (b1 - b0) // dp
        inside = [(s, e) for s, e in index if b0 <= s < b1]
        for r in range(dp):
            lo, hi = b0 + r * size, b0 + (r + 1) * size
            shards[r] += sum(max(0, min(hi, e) - max(lo, s)) for s, e in inside)
    return shards


def optimizer_bytes(params: list, dtype: str, dp: int, distributed: bool, dp_rank=None, bucket_size=None) -> int:
    """Adam's fp32 exp_avg + exp_avg_sq (+ the fp32 master copy when training in bf16 / fp16) that one rank of a
    ``param_list`` holds: DP rank ``dp_rank``, or the most loaded one."""
    per = 8 + (4 if dtype != "fp32" else 0)
    shards = optimizer_shard_numels(params, dp, distributed, bucket_size)
    return per * (max(shards) if dp_rank is None else shards[dp_rank])


def grad_bytes(params: list, dp: int, distributed: bool, bucket_size=None) -> int:
    """DDP's fp32 main-grad buffer (``grad_reduce_in_fp32``), padding included."""
    return 4 * grad_buffer_layout(params, dp, distributed, bucket_size)[0]


def activation_bytes_per_token_layer(arch, lay: Layout, dtype: str, seq_len: int, flash: bool) -> float:
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
    else:
        # The unfused (local-spec) path: the probabilities (softmax in fp32, then a copy in the compute dtype),
        # q/k/v transposed copies, rotary outputs, SiLU's input and output, fp32 norm statistics / upcasts.
        per += (arch.num_attention_heads / t) * seq_len * (b + (4 if b < 4 else 0))
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
        roles = ["student"] + (["discriminator"] if wl.stage != "seqkd" else [])
        lists = [param_list(arch, lay.tp, lay.pp, stage, r) for r in roles]
        n = [sum(x for _, x, _ in pl) for pl in lists]
        return (sum(n) * b, sum(grad_bytes(pl, dp, do, bucket) for pl in lists),
                sum(optimizer_bytes(pl, wl.dtype, dp, do, bucket_size=bucket) for pl in lists),
                0 if lay.offload_reference or wl.stage == "seqkd" else n[0] * b)

    # the most loaded stage is the first (embeddings) or the last (output layer)
    weights, grads, optim, reference = max((stage_state(s) for s in {0, lay.pp - 1}), key=sum)
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
    engines = world // lay.rollout_tp
    samples = math.ceil(wl.batch_prompts * wl.n / engines)
    kv_per_token = 2 * arch.num_layers * arch.num_query_groups * arch.kv_channels * b / lay.rollout_tp
    # Paged KV: the tokens the running sequences actually hold (a wave's longest answers set the need).
    live_tokens = wl.mean_prompt_tokens + min(wl.max_response_tokens, wl.mean_response_tokens * asm.decode_tail)
    vllm_kv = min(samples, asm.max_num_seqs) * live_tokens * kv_per_token if wl.stage == "gad" else 0.0
    overhead = asm.overhead_gib * GIB
    resident = weights + grads + optim + reference + overhead
    vllm = vllm_w + vllm_kv + (asm.vllm_overhead_gib * GIB if wl.stage == "gad" else 0)
    if lay.colocated:
        train_phase = resident + acts + logits + (0 if lay.sleep else vllm)
        rollout_phase = resident + vllm
    else:
        train_phase = resident + acts + logits
        rollout_phase = vllm  # on the engine's own GPUs
    mp = MemoryPlan(weights, grads, optim, acts, logits, reference, vllm_w, vllm_kv, overhead)
    mp.train_phase, mp.rollout_phase = train_phase, rollout_phase
    mp.peak = max(train_phase, rollout_phase)
    return mp


# ---- time ------------------------------------------------------------------------------------------------------
def plan_time(arch, lay: Layout, world: int, wl: Workload, gpu: GPU, asm: Assumptions) -> dict:
    P = total_params(arch)
    b = DTYPE_BYTES[wl.dtype]
    train_gpus = world  # colocated: every GPU trains and rolls out; split: the engine GPUs are extra
    samples = wl.batch_prompts * wl.n
    T = samples * (wl.mean_prompt_tokens + wl.mean_response_tokens)  # student sequence tokens
    T_teacher = wl.batch_prompts * (wl.mean_prompt_tokens + wl.mean_response_tokens)
    attn = 12 * arch.num_layers * arch.hidden_size * (wl.mean_prompt_tokens + wl.mean_response_tokens)  # per token
    fwd = lambda tokens: (2 * P + attn / 3) * tokens  # noqa: E731
    flops = {
        "g_old_logprobs": fwd(T),
        "reference": fwd(T),
        "d_scores": fwd(T + T_teacher),
        "d_update": 3 * fwd(T + T_teacher),
        "g_update": 3 * fwd(T),
    }
    rate = train_gpus * gpu.bf16_tflops * 1e12 * asm.mfu
    # Recomputation repeats the forward inside the backward of the updates.
    recompute = {"full": 4 / 3, "selective": 1.03}.get(lay.recompute, 1.0)
    flops["d_update"] *= recompute
    flops["g_update"] *= recompute
    # 1F1B pipeline bubble: (pp - 1) idle slots per m micro-batches on every stage.
    dp = world // (lay.tp * lay.pp * lay.cp)
    micro = max(1, math.ceil((T + T_teacher) / (dp * wl.micro_batch_tokens)))
    bubble = 1 + (lay.pp - 1) / micro
    t = {k: v / rate * bubble for k, v in flops.items()}
    # TP: two all-reduces (or SP's all-gather + reduce-scatter) of the hidden states per layer in the forward,
    # two more in the backward, over NVLink (megatron overlaps part of it; counted whole).
    def tp_comm(tokens: float, passes: int) -> float:
        if lay.tp == 1:
            return 0.0
        per_token_layer = 2 * arch.hidden_size * b * 2 * (lay.tp - 1) / lay.tp  # bytes, one pass
        return passes * tokens / dp * arch.num_layers / lay.pp * per_token_layer / (gpu.intra_node_gbs * 1e9)

    for k, (tokens, passes) in {"g_old_logprobs": (T, 1), "reference": (T, 1), "d_scores": (T + T_teacher, 1),
                                "d_update": (T + T_teacher, 3), "g_update": (T, 3)}.items():
        t[k] += tp_comm(tokens, passes)
    # Rollout: memory-bound decode, per engine, in waves of max_num_seqs samples.
    engines = world // lay.rollout_tp
    per_engine = math.ceil(samples / engines)
    waves = math.ceil(per_engine / asm.max_num_seqs)
    steps = min(wl.max_response_tokens, wl.mean_response_tokens * asm.decode_tail)
    weight_read = P * b / lay.rollout_tp
    kv_read = min(per_engine, asm.max_num_seqs) * (wl.mean_prompt_tokens + wl.mean_response_tokens / 2) * \
        2 * arch.num_layers * arch.num_query_groups * arch.kv_channels * b / lay.rollout_tp
    step_s = (weight_read + kv_read) / (gpu.hbm_tbs * 1e12 * asm.decode_bw_efficiency)
    prefill = 2 * P * per_engine * wl.mean_prompt_tokens / (lay.rollout_tp * gpu.bf16_tflops * 1e12 * asm.mfu)
    t["rollout"] = waves * steps * step_s + prefill
    # DP gradient reduction of G and D (ring all-reduce, or reduce-scatter + all-gather: the same bytes).
    nodes_span = world > 8
    bw = (gpu.inter_node_gbs if nodes_span else gpu.intra_node_gbs) * 1e9
    grad_bytes = 2 * rank_params(arch, lay.tp, lay.pp, 0) * 4
    t["dp_grad_reduce"] = 0.0 if dp == 1 else 2 * (dp - 1) / dp * grad_bytes / bw
    # Weight sync: a device copy (CUDA IPC) or a broadcast to the engine GPUs (NCCL).
    t["weight_sync"] = P * b / (gpu.hbm_tbs * 1e12 * 0.5) if lay.colocated else P * b / bw
    if lay.offload_reference:  # the reference's shard comes over PCIe (~25 GB/s) for its forward
        t["reference"] += P * b / (lay.tp * lay.pp) / 25e9
    gad_step = sum(t.values())
    # Warmup step: rollout (for D's student samples), D scores + update, G cross-entropy on teacher answers.
    warm_step = t["rollout"] + t["d_scores"] + t["d_update"] + 3 * fwd(T_teacher) / rate + t["dp_grad_reduce"] + t["weight_sync"]
    total = wl.gad_steps * gad_step + wl.warmup_steps * warm_step
    if wl.stage == "seqkd":  # G's cross-entropy on the teacher answers, every step
        sft = 3 * fwd(T_teacher) * recompute / rate * bubble + tp_comm(T_teacher, 3) + t["dp_grad_reduce"] / 2
        t = {"g_sft": sft}
        gad_step = warm_step = sft
        total = (wl.gad_steps + wl.warmup_steps) * sft
    return {"step_s": {k: round(v, 3) for k, v in t.items()}, "gad_step_s": gad_step, "warmup_step_s": warm_step,
            "run_hours": total / 3600, "tokens_per_step": T}


# ---- layouts -----------------------------------------------------------------------------------------------------
def check_layout(arch, lay: Layout, world: int) -> list:
    from gad_megatron.runtime.parallel import LayoutError, ParallelConfig, validate_layout

    problems = []
    try:
        validate_layout(ParallelConfig(lay.tp, lay.pp, context_parallel=lay.cp, sequence_parallel=lay.sp), world,
                        **arch.model_dims)
    except LayoutError as e:
        problems.append(str(e))
    if arch.vocab_size % lay.tp:
        problems.append(f"vocab_size={arch.vocab_size} is not divisible by TP={lay.tp}")
    if world % lay.rollout_tp or arch.num_query_groups % min(lay.rollout_tp, arch.num_query_groups):
        problems.append(f"rollout TP {lay.rollout_tp} does not divide the world ({world}) / the KV heads")
    if lay.tp > 8 or lay.rollout_tp > 8:
        problems.append("TP beyond one node (8 GPUs) crosses the network on every layer")
    return problems


@dataclass
class Plan:
    layout: Layout
    world: int
    fits: bool
    problems: list
    memory: Optional[MemoryPlan] = None
    time: dict = field(default_factory=dict)
    workload: Optional[Workload] = None

    def summary(self, gpu: GPU) -> dict:
        out = {"layout": self.layout.describe(self.world), "world": self.world, "fits": self.fits,
               "problems": self.problems,
               "micro_batch_tokens": self.workload.micro_batch_tokens if self.workload else None}
        if self.memory is not None:
            out["memory_gib"] = self.memory.gib()
            out["gpu_memory_gib"] = gpu.memory_gib
        out.update(self.time)
        return out


def plan(arch, lay: Layout, world: int, wl: Workload, gpu: GPU, asm: Assumptions = Assumptions()) -> Plan:
    problems = check_layout(arch, lay, world)
    if problems:
        return Plan(lay, world, False, problems, workload=wl)
    mem = plan_memory(arch, lay, world, wl, gpu, asm)
    if mem.peak > gpu.memory_gib * GIB:
        problems.append(f"needs {mem.peak / GIB:.1f} GiB per GPU ({'rollout' if mem.rollout_phase > mem.train_phase else 'training'} "
                        f"phase), the {gpu.name} has {gpu.memory_gib}")
    return Plan(lay, world, not problems, problems, mem, plan_time(arch, lay, world, wl, gpu, asm), wl)


def search(arch, world: int, wl: Workload, gpu: GPU, asm: Assumptions = Assumptions(), colocated: bool = True) -> list:
    """Every layout worth trying, fitting ones first, ranked by predicted run time."""
    out = []
    for tp in (1, 2, 4, 8):
        for pp in (1, 2, 4, 8):
            if world % (tp * pp):
                continue
            for do in (False, True):
                for rec in (None, "selective", "full"):
                    for rtp in ((1, 2, 4, 8) if wl.stage == "gad" else (1,)):
                        for off in ((False, True) if wl.stage == "gad" else (False,)):
                            for mbt in (4096, 8192, 16384):
                                lay = Layout(tp, pp, 1, tp > 1, do, rec, rtp, colocated, True, off)
                                out.append(plan(arch, lay, world, replace(wl, micro_batch_tokens=mbt), gpu, asm))
    # Fastest first; among equal times, the one with the most memory to spare.
    ok = sorted((p for p in out if p.fits), key=lambda p: (p.time["run_hours"], p.memory.peak))
    return ok + [p for p in out if not p.fits and p.memory is not None]


# ---- inputs -------------------------------------------------------------------------------------------------------
PRESETS_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "model_configs")


def load_arch(model: str):
    """An HF dir, a gad-convert checkpoint, or a preset name (the published config.json of the paper's
    students, shipped in ``assets/model_configs``: planning needs no weights)."""
    from gad_megatron.convert.api import config_dir
    from gad_megatron.models.hf_config import arch_spec_from_dir, arch_spec_from_hf

    if os.path.isfile(os.path.join(config_dir(model), "config.json")):
        return arch_spec_from_dir(config_dir(model))
    key = os.path.basename(model.rstrip("/")).lower().replace("-instruct", "").replace("meta-llama-", "llama-")
    path = os.path.join(PRESETS_DIR, key + ".json")
    if not os.path.isfile(path):
        names = sorted(f[:-5] for f in os.listdir(PRESETS_DIR))
        raise FileNotFoundError(f"{model}: not an HF dir or checkpoint, and no preset {key!r} (presets: {', '.join(names)})")
    with open(path) as f:
        return arch_spec_from_hf(json.load(f), source=path)


def from_config(cfg) -> tuple:
    """(model path, Layout, Workload) from a gad-train config."""
    p, r, m, d, tr = cfg.parallel, cfg.rollout, cfg.model, cfg.data, cfg.train
    lay = Layout(p.tensor_parallel, p.pipeline_parallel, 1, p.sequence_parallel, p.use_distributed_optimizer,
                 m.recompute_granularity, r.vllm_tensor_parallel, r.colocated, r.sleep_between_rollouts,
                 m.offload_reference)
    wl = Workload(batch_prompts=tr.batch_prompts, n=r.n, max_prompt_tokens=d.max_prompt_tokens,
                  max_response_tokens=d.max_response_tokens, micro_batch_tokens=tr.micro_batch_tokens, dtype=m.dtype,
                  stage=tr.stage)
    return m.student, lay, wl


def _parser():
    ap = argparse.ArgumentParser(prog="gad-plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="gad-train YAML (model, layout and batch from it)")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides of --config")
    ap.add_argument("--model", help="HF dir, checkpoint or preset (qwen2.5-3b/7b/14b, llama-3.2-3b, llama-3.1-8b)")
    ap.add_argument("--gpu", default="h100-80gb", choices=sorted(GPUS))
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--tp", type=int), ap.add_argument("--pp", type=int), ap.add_argument("--rollout-tp", type=int)
    ap.add_argument("--search", action="store_true", help="rank every layout for this model and world")
    ap.add_argument("--mfu", type=float, default=Assumptions.mfu)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--shell", action="store_true", help="KEY=VALUE lines (the sbatch scripts eval them)")
    return ap


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    try:
        lay, wl = Layout(), Workload()
        model = a.model
        if a.config:
            from gad_megatron.trainer.config import load_config

            model_cfg, lay, wl = from_config(load_config(a.config, a.overrides))
            model = model or model_cfg
        if not model:
            raise ValueError("give --config or --model")
        lay = replace(lay, **{k: v for k, v in (("tp", a.tp), ("pp", a.pp), ("rollout_tp", a.rollout_tp)) if v})
        arch = load_arch(model)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"gad-plan: error: {e}", file=sys.stderr)
        return 2
    gpu, world, asm = GPUS[a.gpu], a.nodes * a.gpus_per_node, Assumptions(mfu=a.mfu)
    if a.search:
        plans = search(arch, world, wl, gpu, asm, lay.colocated)
        rows = [p.summary(gpu) for p in plans]
        if a.json:
            print(json.dumps(rows, indent=1))
        else:
            print(f"{model} on {a.nodes} x {a.gpus_per_node} {gpu.name}: {sum(p.fits for p in plans)} layouts fit")
            for p in plans[:15]:
                s = p.summary(gpu)
                print(f"  {'fits' if p.fits else 'NO  '} {s['layout']:<66} mb {s['micro_batch_tokens']:>5}  "
                      f"peak {s['memory_gib']['peak']:6.1f} GiB  run {s['run_hours']:6.1f} h")
        return 0 if any(p.fits for p in plans) else 1
    p = plan(arch, lay, world, wl, gpu, asm)
    s = p.summary(gpu)
    dp = world // (lay.tp * lay.pp * lay.cp)
    if a.shell:
        mem = s.get("memory_gib", {})
        print("\n".join([f"TP={lay.tp}", f"PP={lay.pp}", f"DP={dp}", f"ROLLOUT_TP={lay.rollout_tp}",
                         f"WORLD={world}", f"FITS={int(p.fits)}", f"PEAK_GIB={mem.get('peak', 'n/a')}",
                         f"LAYOUT='{s['layout']}'", f"RUN_HOURS={round(s.get('run_hours', 0), 1)}"]))
        return 0 if p.fits else 1
    if a.json:
        print(json.dumps({**s, "assumptions": asdict(asm), "workload": asdict(wl)}, indent=1))
    else:
        print(f"{model} on {a.nodes} x {a.gpus_per_node} {gpu.name}: {s['layout']}")
        if "memory_gib" in s:
            m = s["memory_gib"]
            print("  memory per GPU (GiB): " + ", ".join(f"{k} {m[k]}" for k in (
                "weights", "grads", "optimizer", "activations", "logits", "reference", "vllm_weights", "vllm_kv",
                "overhead")))
            print(f"  training phase {m['train_phase']} GiB, rollout phase {m['rollout_phase']} GiB, "
                  f"peak {m['peak']} of {gpu.memory_gib}")
            print("  step (s): " + ", ".join(f"{k} {v}" for k, v in s["step_s"].items())
                  + f"; GAD step {s['gad_step_s']:.1f} s, warmup step {s['warmup_step_s']:.1f} s")
            print(f"  run ({wl.warmup_steps} warmup + {wl.gad_steps} GAD steps): {s['run_hours']:.1f} h")
        for prob in p.problems:
            print(f"  refused: {prob}")
    return 0 if p.fits else 1


if __name__ == "__main__":
    sys.exit(main())

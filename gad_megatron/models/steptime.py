"""Seconds per GAD step: rollout decode, G / D / reference FLOPs, pipeline bubble, communication, sync."""

from __future__ import annotations

import math

from gad_megatron.models.memory import offloaded_bytes
from gad_megatron.models.params import rank_params, total_params
from gad_megatron.models.plan_inputs import DTYPE_BYTES, GPU, Assumptions, Layout, Workload, planned_topology


# ---- time ------------------------------------------------------------------------------------------------------
def call_costs(gpu: GPU, wl: Workload, dp: int, decode_steps: float, T: float, T_teacher: float) -> dict:
    """The fixed cost of a step's calls (``GPU.calls``): each pass's micro-batches (on each DP rank), each
    optimizer step, each decode step, the weight sync into a separate engine. ``g_sft``: the warmup's G update."""
    c = gpu.calls
    mbs = lambda tokens: max(1, math.ceil(tokens / (dp * wl.micro_batch_tokens)))  # noqa: E731
    d = float(wl.discriminator)  # a reward without D (a scorer, OPD's teacher) runs none of D's calls
    out = {"g_old_logprobs": 0.0 if wl.one_pass else mbs(T) * c.fwd_call_s,
           "reference": mbs(T) * c.fwd_call_s,
           "d_scores": d * mbs(T + T_teacher) * c.fwd_call_s,
           "d_update": d * (mbs(T + T_teacher) * c.train_call_s + c.optim_step_s),
           "g_update": mbs(T) * c.train_call_s + c.optim_step_s,
           "g_sft": mbs(T_teacher) * c.train_call_s + c.optim_step_s,
           "rollout": decode_steps * c.decode(wl.engine_live_weights),
           "weight_sync": 0.0 if wl.engine_live_weights else c.sync_s}  # a live-weights engine *is* G: no sync
    if wl.teacher_params:
        out["teacher"] = mbs(T) * c.fwd_call_s
    return out


def rollout_seconds(arch, lay: Layout, world: int, wl: Workload, gpu: GPU, asm: Assumptions) -> tuple:
    """(seconds, decode steps) of a rollout: memory-bound decode, per engine, in waves of max_num_seqs samples."""
    P, b = total_params(arch), DTYPE_BYTES[wl.dtype]
    engines = planned_topology(world, lay.rollout_tp).engines
    per_engine = math.ceil(wl.batch_prompts * wl.n / engines)
    waves = math.ceil(per_engine / asm.max_num_seqs)
    steps = min(wl.max_response_tokens, wl.mean_response_tokens * asm.decode_tail)
    weight_read = P * b / lay.rollout_tp
    kv_read = min(per_engine, asm.max_num_seqs) * (wl.mean_prompt_tokens + wl.mean_response_tokens / 2) * \
        2 * arch.num_layers * arch.num_query_groups * arch.kv_channels * b / lay.rollout_tp
    step_s = (weight_read + kv_read) / (gpu.hbm_tbs * 1e12 * asm.decode_bw_efficiency)
    prefill = 2 * P * per_engine * wl.mean_prompt_tokens / (lay.rollout_tp * gpu.bf16_tflops * 1e12 * asm.mfu)
    return waves * steps * step_s + prefill, waves * steps


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
        "g_old_logprobs": 0.0 if wl.one_pass else fwd(T),
        "reference": fwd(T),
        "d_scores": fwd(T + T_teacher) * wl.discriminator,
        "d_update": 3 * fwd(T + T_teacher) * wl.discriminator,
        "g_update": 3 * fwd(T),
    }
    if wl.teacher_params:  # a local frozen teacher's forward over the student's samples (OPD)
        flops["teacher"] = (2 * wl.teacher_params + attn / 3) * T
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

    d_tokens = (T + T_teacher) * wl.discriminator
    for k, (tokens, passes) in {"g_old_logprobs": (0 if wl.one_pass else T, 1), "reference": (T, 1), "d_scores": (d_tokens, 1),
                                "d_update": (d_tokens, 3), "g_update": (T, 3), "teacher": (T, 1)}.items():
        if k in t:
            t[k] += tp_comm(tokens, passes)
    t["rollout"], decode_steps = rollout_seconds(arch, lay, world, wl, gpu, asm)
    # DP gradient reduction of G and D (ring all-reduce, or reduce-scatter + all-gather: the same bytes).
    nodes_span = world > 8
    bw = (gpu.inter_node_gbs if nodes_span else gpu.intra_node_gbs) * 1e9
    grad_bytes = (1 + wl.discriminator) * rank_params(arch, lay.tp, lay.pp, 0) * (2 if lay.grad_bf16 else 4)
    t["dp_grad_reduce"] = 0.0 if dp == 1 else 2 * (dp - 1) / dp * grad_bytes / bw
    # Weight sync: a device copy (CUDA IPC) or a broadcast to the engine GPUs (NCCL).
    t["weight_sync"] = (0.0 if wl.engine_live_weights  # the engine samples with G's own weights
                        else P * b / (gpu.hbm_tbs * 1e12 * 0.5) if lay.colocated else P * b / bw)
    if lay.offload_reference:  # the reference's shard comes over PCIe (~25 GB/s) for its forward
        t["reference"] += P * b / (lay.tp * lay.pp) / (asm.pcie_gbs * 1e9)
    if wl.teacher_params and wl.teacher_offloaded:  # so does an offloaded teacher's
        t["teacher"] += wl.teacher_params * b / (lay.tp * lay.pp) / (asm.pcie_gbs * 1e9)
    if lay.offload and lay.colocated and wl.stage == "gad":  # out before the engine wakes, back after: G's and D's

        t["offload"] = 2 * offloaded_bytes(arch, lay, world, wl, gpu, asm) / (asm.pcie_gbs * 1e9)
    fixed = call_costs(gpu, wl, dp, decode_steps, T, T_teacher)
    sft_calls = fixed.pop("g_sft")  # the warmup's G update: not a part of the GAD step
    for k, v in fixed.items():
        t[k] = t.get(k, 0.0) + v
    gad_step = sum(t.values())
    # Warmup step: rollout (for D's student samples), D scores + update, G cross-entropy on teacher answers.
    warm_step = (t["rollout"] + t["d_scores"] + t["d_update"] + 3 * fwd(T_teacher) / rate + sft_calls
                 + t["dp_grad_reduce"] + t["weight_sync"] + t.get("offload", 0.0))
    total = wl.gad_steps * gad_step + wl.warmup_steps * warm_step
    if wl.stage == "seqkd":  # G's cross-entropy on the teacher answers, every step
        sft = (3 * fwd(T_teacher) * recompute / rate * bubble + tp_comm(T_teacher, 3) + t["dp_grad_reduce"] / 2
               + sft_calls)
        t = {"g_sft": sft}
        gad_step = warm_step = sft
        total = (wl.gad_steps + wl.warmup_steps) * sft
    return {"step_s": {k: round(v, 3) for k, v in t.items()}, "gad_step_s": gad_step, "warmup_step_s": warm_step,
            "run_hours": total / 3600, "tokens_per_step": T}



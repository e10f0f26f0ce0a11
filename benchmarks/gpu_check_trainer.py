#!/usr/bin/env python
"""The trainer's part of the GPU check (#8 item 6), after benchmarks/gpu_check.py (one process, NCCL, world 1):

1. One GAD step of G and D (rollout, old / reference logprobs, D scores + BT update, G GRPO update) in bf16
   through megatron's TE spec when Transformer Engine is present, and again in FP8 (hybrid, delayed) when it
   is: losses finite, step time.
2. The CUDA IPC weight sync into a colocated vLLM engine (when vLLM is installed): time and GB/s for the
   model, then the probe logprob gap.
3. G's update throughput as MFU, next to megatron-core's bare ``forward_backward`` + optimizer step on the same
   micro-batches (ratio bare / ours, goal >= 0.9).

    python benchmarks/gpu_check_trainer.py --out $OUT            # (gpu_check.sh runs it under torchrun)
    python benchmarks/gpu_check_trainer.py --device cpu --small  # this machine: the same logic, tiny sizes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def make_model(work: str, small: bool) -> str:
    """A random Qwen2 with the demo tokenizer: ~0.9B parameters on GPU, tiny with --small."""
    import torch
    import transformers

    from gad_megatron.data import demo

    out = os.path.join(work, "student")
    demo.make_tokenizer(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2) if small else \
        dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4)
    cfg = transformers.Qwen2Config(vocab_size=192, max_position_embeddings=4096, rms_norm_eps=1e-6,
                                   tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                                   eos_token_id=tok.eos_token_id, bos_token_id=None, **shape)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(out)
    return out


def gad_config(student: str, work: str, dtype: str, fp8, engine: str, device: str):
    from gad_megatron.data import demo
    from gad_megatron.trainer.config import load_config

    return load_config(base={
        "model": {"student": student, "dtype": dtype, "fp8": fp8},
        "parallel": {"device": device},
        "data": {"train": demo.ASSET, "max_prompt_tokens": 48, "max_response_tokens": 32},
        "rollout": {"engine": engine, "n": 8, "max_tokens": 32, "transport": "cuda-ipc" if device == "cuda" else "auto",
                    "gpu_memory_utilization": 0.3},
        "train": {"batch_prompts": 16, "warmup_steps": 0, "critic_warmup": 0, "micro_batch_tokens": 4096},
        "log": {"run_dir": os.path.join(work, f"run_{dtype}_{fp8}"), "tensorboard": False, "progress": False}})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_check"))
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--small", action="store_true")
    a = ap.parse_args()
    for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29541"), ("RANK", "0"), ("WORLD_SIZE", "1"),
                 ("LOCAL_RANK", "0")):
        os.environ.setdefault(k, v)
    import torch

    from gad_megatron.models.gpt import te_available
    from gad_megatron.rollout.vllm_engine import vllm_unavailable_reason
    from gad_megatron.trainer import gad
    from gad_megatron.trainer.build import build_trainer

    os.makedirs(a.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="gad-gpu-trainer-")
    student = make_model(work, a.small)
    rows, result = [], {"te": te_available(), "vllm": vllm_unavailable_reason() is None}
    dtype = "bf16" if a.device == "cuda" else "fp32"
    variants = [(dtype, None)] + ([("bf16", "hybrid")] if a.device == "cuda" and te_available() else [])
    engine = "vllm" if a.device == "cuda" and result["vllm"] else "megatron"
    t = None
    for dt, fp8 in variants:
        t = build_trainer(gad_config(student, work, dt, fp8, engine, a.device))
        if t.sync is not None:
            t.policy.sync(0)
        times = []
        for step in range(3):
            timer = gad.Timer()
            t0 = time.perf_counter()
            m = gad.run_stage(t, "gad", step, t.data.train[step * 16:(step + 1) * 16], timer)
            times.append(time.perf_counter() - t0)
        ok = all(math.isfinite(m[k]) for k in ("g_loss", "d_loss"))
        rows.append((f"GAD step {dt}{' fp8 ' + fp8 if fp8 else ''} ({'TE' if te_available() else 'local'} spec)",
                     m["g_loss"], m["d_loss"], min(times[1:]), ok))
        if fp8 is None and t.sync is not None:
            # 2. the weight sync into the colocated engine (CUDA IPC on GPU), timed, then verified
            n_bytes = sum(p.numel() * p.element_size() for c in t.g.modules for p in c.parameters())
            t.sync.verify = True
            t0 = time.perf_counter()
            st = t.sync.sync()
            dt_s = time.perf_counter() - t0
            rows.append((f"weight sync {t.engine.transport.name} {n_bytes / 1e9:.2f} GB", n_bytes / 1e9 / dt_s,
                         st.gap_max, dt_s, st.gap_max is not None and st.gap_max <= 5e-2))
        if fp8 is not None:
            break
        rows.append(offload_row(t, a.device))  # 3. rollout.offload: memory freed, state back bitwise
        if a.device == "cuda":
            rows.append(ipc_row())  # 4. a CUDA IPC handle opened in another process, its GPU found by UUID
        mfu_rows(t, a, rows)
        if t.engine is not None and hasattr(t.engine, "shutdown"):
            t.engine.shutdown()
    name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu (dry run)"
    print(f"GPU trainer check on {name}: TE {'yes' if result['te'] else 'no'}, vLLM {'yes' if result['vllm'] else 'no'}")
    print(f"{'check':<44} {'a':>11} {'b':>11} {'s':>8} {'ok':>4}")
    for r in rows:
        print(f"{r[0]:<44} {r[1]:11.4g} {r[2] if r[2] is not None else float('nan'):11.4g} {r[3]:8.3f} {'yes' if r[4] else 'NO':>4}")
    result.update(device=name, rows=[dict(zip(("check", "a", "b", "seconds", "ok"), r)) for r in rows])
    with open(os.path.join(a.out, "gpu_check_trainer.json"), "w") as f:
        json.dump(result, f, indent=2)
    if not all(r[4] for r in rows):
        sys.exit(1)


def offload_row(t, device: str) -> tuple:
    """G's and D's grads, optimizer state and parameters to host memory and back (#30): device bytes freed
    (torch.cuda.memory_allocated; on CPU the storages' bytes) and a digest of every storage before / after."""
    import hashlib

    import torch

    from gad_megatron.trainer.offload import storages

    kinds = ("grads", "optimizer", "params")

    def digest():
        h = hashlib.sha256()
        for e in t.policy.train_engines:
            for k in kinds:
                for st in storages(e, k):
                    h.update(torch.empty(0, dtype=torch.uint8, device=st.device).set_(st, 0, (st.nbytes(),)).cpu().numpy().tobytes())
        return h.hexdigest()

    def held():
        if device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return sum(st.nbytes() for e in t.policy.train_engines for k in kinds for st in storages(e, k))

    before, d0 = held(), digest()
    t0 = time.perf_counter()
    freed = sum(e.offload.to_host(kinds) for e in t.policy.train_engines)
    away = held()
    for e in t.policy.train_engines:
        e.offload.to_device()
    dt = time.perf_counter() - t0
    return (f"offload G+D {freed / 2**30:.2f} GiB, GiB freed / back", (before - away) / 2**30, (held() - away) / 2**30,
            dt, before - away >= 0.9 * freed and digest() == d0)


def _ipc_child(q_in, q_out) -> None:
    import torch

    from gad_megatron.rollout.vllm_worker import _local_uuids, ipc_args_on_device

    (rebuild, args), uuid = q_in.get()
    buf = rebuild(*ipc_args_on_device(args, uuid, _local_uuids()))
    q_out.put(float(buf.double().sum().item()))


def ipc_row() -> tuple:
    """The cuda-ipc transport's handle, opened by another process on the sender's GPU (found by its UUID)."""
    import torch
    import torch.multiprocessing as mp
    from torch.multiprocessing.reductions import reduce_tensor

    buf = torch.arange(1 << 20, dtype=torch.float32, device="cuda")
    uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
    ctx = mp.get_context("spawn")
    q_in, q_out = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_ipc_child, args=(q_in, q_out))
    t0 = time.perf_counter()
    p.start()
    q_in.put((reduce_tensor(buf), uuid))
    got = q_out.get(timeout=120)
    p.join(30)
    want = float(buf.double().sum().item())
    return ("cuda-ipc handle read by another process", got, want, time.perf_counter() - t0, got == want)


def mfu_rows(t, a, rows) -> None:
    """G's GRPO update vs megatron's bare forward_backward + step on the same long micro-batches."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gad_step import bare_update, policy_microbatches

    from gad_megatron.trainer.batching import Seq
    from gad_megatron.trainer.steps import policy_step

    g = torch.Generator().manual_seed(3)
    length = 64 if a.small else 1024
    seqs = [Seq(torch.randint(5, 190, (length // 2,), generator=g).tolist(),
                torch.randint(5, 190, (length // 2,), generator=g).tolist()) for _ in range(16)]
    mbs = policy_microbatches(t, seqs, 1.0, 4 * length)
    tokens = sum(int(mb["loss_mask"].numel()) for mb in mbs)

    def bare():
        bare_update(t.g, mbs)

    ours_fn = policy_step(1.0, t.cfg.algo)
    times = {"ours": 0.0, "bare": 0.0}
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for rep in range(4):
        for name, fn in (("ours", lambda: t.g.train_step(mbs, ours_fn)), ("bare", bare)):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if rep:
                times[name] += (time.perf_counter() - t0) / 3
    params = sum(p.numel() for c in t.g.modules for p in c.parameters())
    flops = 6 * params * tokens
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if torch.cuda.is_available() and k in torch.cuda.get_device_name()), None)
    mfu = flops / times["ours"] / (peak * 1e12) if peak else float("nan")
    rows.append((f"G update MFU ({params / 1e9:.2f}B, {tokens} tok)", mfu, times["bare"] / times["ours"], times["ours"],
                 times["bare"] / times["ours"] >= 0.8))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""GPU path check for one lent H100/H200 (NCCL, world size 1): logits parity with HF in fp32 and bf16 for
every architecture, a student LM step and a discriminator BT step, with the CPU-only code never imported.

Run through benchmarks/gpu_check.sh (it installs the carried megatron-core wheel and calls torchrun).
Prints a table and writes gpu_check.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_check"))
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: dry-run the script's logic here")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False  # parity is checked in true fp32
    torch.backends.cudnn.allow_tf32 = False

    import transformers
    from hf_fixtures import ARCHS, hf_greedy, make_hf_model

    from gad_megatron.trainer.steps import bt_step, sft_step
    from gad_megatron.convert.api import load_from_hf
    from gad_megatron.models.mapping import mapping_for
    from gad_megatron.models import ModelOptions
    from gad_megatron.models.forward import full_logits
    from gad_megatron.runtime import ParallelConfig, cpu_shim_applied, initialize
    from gad_megatron.trainer.engine import OptimConfig, TrainEngine, reduce_token_mean

    info = initialize(ParallelConfig(device=a.device))
    if a.device == "cuda":
        assert info["device"] == "cuda" and torch.distributed.get_backend() == "nccl"
        assert "gad_megatron.runtime.cpu_shim" not in sys.modules and not cpu_shim_applied()
    rows = []
    result = {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu (dry run)", "torch": torch.__version__}
    work = tempfile.mkdtemp(prefix="gad-gpu-")
    tokens = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(7))
    for i, name in enumerate(ARCHS):
        hf_dir = make_hf_model(name, os.path.join(work, name), seed=i)
        for dtype, tdtype, tol in (("fp32", torch.float32, 1e-4), ("bf16", torch.bfloat16, None)):
            arch, chunks = load_from_hf(hf_dir, "student", ModelOptions(dtype=dtype, transformer_impl="local"))
            t0 = time.perf_counter()
            ours = full_logits(chunks, [{"tokens": tokens}])[0].float().cpu()
            dt = time.perf_counter() - t0
            ref_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=tdtype, attn_implementation="eager").to(a.device)
            with torch.no_grad():
                ref = ref_model(tokens.to(a.device)).logits.float().cpu()
            diff = (ours - ref).abs()
            ok = tol is None or diff.max().item() <= tol
            rows.append((f"logits {name} {dtype}", diff.max().item(), diff.mean().item(), dt, ok))
            del chunks, ref_model

    # One LM step (SeqKD warmup objective) and one BT step; the first loss must equal HF's cross-entropy.
    hf_dir = os.path.join(work, "qwen2_tied")
    arch, chunks = load_from_hf(hf_dir, "student", ModelOptions(dtype="fp32", transformer_impl="local"))
    labels = torch.roll(tokens, -1, 1)
    mask = torch.ones_like(tokens, dtype=torch.float)
    mask[:, -1] = 0
    engine = TrainEngine(chunks, OptimConfig(lr=1e-3, clip_grad=1.0))
    out = engine.train_step([{"tokens": tokens, "labels": labels, "loss_mask": mask}], sft_step)
    loss = reduce_token_mean(out["outputs"], "sft_loss")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        lg = hf(tokens).logits
    ce = torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), labels[:, :-1].reshape(-1)).item()
    rows.append(("student LM step: loss vs HF CE", abs(loss - ce), abs(loss - ce), 0.0, abs(loss - ce) <= 1e-4))
    _, d_chunks = load_from_hf(hf_dir, "discriminator", ModelOptions(dtype="bf16", transformer_impl="local"))
    d_engine = TrainEngine(d_chunks, OptimConfig(lr=1e-4, clip_grad=0.2))
    # one group [teacher, student, student], the trainer's D micro-batch layout
    pair = {"tokens": tokens.repeat(2, 1)[:3], "attention_mask": torch.ones(3, 24, dtype=torch.long)}
    bt = [reduce_token_mean(d_engine.train_step([pair], bt_step(2))["outputs"], "d_loss") for _ in range(3)]
    rows.append(("disc BT bf16: 3 steps decrease", bt[0] - bt[-1], 0.0, 0.0, bt[-1] < bt[0]))

    # Rollout on GPU: the megatron engine's greedy tokens equal HF's; the weight-sync gather matches the weights.
    from gad_megatron.rollout.base import SamplingConfig
    from gad_megatron.rollout.megatron_engine import MegatronEngine
    from gad_megatron.rollout.weight_sync import gather_full_tensors, hf_tensors

    hf_dir = os.path.join(work, "llama31")
    arch, chunks = load_from_hf(hf_dir, "student", ModelOptions(dtype="fp32", transformer_impl="local"))
    prompts = [[5, 6, 7, 8], [10, 11, 12]]
    ours = [g[0].token_ids for g in MegatronEngine(chunks).generate(prompts, SamplingConfig().greedy(max_tokens=10))]
    ref = hf_greedy(hf_dir, prompts, 10)
    rows.append(("megatron engine greedy == HF", float(ours != ref), 0.0, 0.0, ours == ref))
    from safetensors.torch import load_file

    src = load_file(os.path.join(hf_dir, "model.safetensors"))
    synced = dict(hf_tensors(gather_full_tensors(chunks), mapping_for(arch.model_type), arch))
    worst = max((synced[n].float().cpu() - src[n].float()).abs().max().item() for n in src)
    rows.append(("weight-sync gather vs HF tensors", worst, 0.0, 0.0, worst == 0.0 and set(synced) == set(src)))

    print(f"GPU check on {result['device']} (torch {result['torch']}, {torch.distributed.get_backend()}, world 1)")
    print(f"{'check':<40} {'max|diff|':>11} {'mean|diff|':>11} {'fwd s':>7} {'ok':>4}")
    for r in rows:
        print(f"{r[0]:<40} {r[1]:11.3e} {r[2]:11.3e} {r[3]:7.3f} {'yes' if r[4] else 'NO':>4}")
    result["rows"] = [dict(zip(("check", "max_abs_diff", "mean_abs_diff", "seconds", "ok"), r)) for r in rows]
    with open(os.path.join(a.out, "gpu_check.json"), "w") as f:
        json.dump(result, f, indent=2)
    if not all(r[4] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()

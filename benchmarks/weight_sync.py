#!/usr/bin/env python
"""Weight sync into a running vLLM engine, next to vLLM's own in-place reload of the same tensors from memory.

~0.5B-parameter model (Qwen2.5-0.5B shape, fp32 on CPU). Measured side by side, alternating, in one run:
  vllm-reload : model_runner.reload_weights of HF tensors already in memory (the floor)
  gad-sync    : WeightSync.sync(): gather TP/PP shards + megatron->HF mapping + buckets + the same reload
Prints seconds, GB/s and the ratio gad-sync / vllm-reload (goal <= 1.2). In-process engine
(VLLM_ENABLE_V1_MULTIPROCESSING=0), TP1 trainer in the same process.

    python benchmarks/weight_sync.py [--layers 24] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bucket-mb", type=float, default=512)
    ap.add_argument("--workdir", default="/tmp/gad-bench-sync")
    a = ap.parse_args()

    from conversion import make_checkpoint

    from gad_megatron.convert.hf_io import SafetensorsReader
    from gad_megatron.convert.api import load_from_hf
    from gad_megatron.models import ModelOptions
    from gad_megatron.rollout.vllm_engine import VLLMConfig, VLLMEngine
    from gad_megatron.rollout.weight_sync import WeightSync
    from gad_megatron.runtime import ParallelConfig, initialize

    shutil.rmtree(a.workdir, ignore_errors=True)
    hf = os.path.join(a.workdir, "hf")
    make_checkpoint(hf, a.layers, hidden=896, ffn=4864, heads=14, kv=2, vocab=151936, dtype=torch.float32)
    os.environ.setdefault("MASTER_PORT", "29533")
    initialize(ParallelConfig(device="cpu"))
    arch, chunks = load_from_hf(hf, "student", ModelOptions())
    engine = VLLMEngine(VLLMConfig(model=hf, max_model_len=256))
    reader = SafetensorsReader(hf)
    tensors = [(n, reader.get(n)) for n in reader.names()]
    nbytes = sum(t.numel() * t.element_size() for _, t in tensors)
    sync = WeightSync(chunks, engine, arch, bucket_mb=a.bucket_mb, verify=False)

    base, ours = [], []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        engine.update_weights([tensors])
        base.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sync.sync()
        ours.append(time.perf_counter() - t0)
    gap = WeightSync(chunks, engine, arch).logprob_gap(sync.probe)
    b, o = statistics.median(base), statistics.median(ours)
    print(f"model: {nbytes / 4 / 1e9:.2f}B params fp32 ({nbytes / 1e9:.2f} GB), {a.layers} layers, bucket {a.bucket_mb} MB")
    print(f"{'path':<12} {'median s':>9} {'GB/s':>7}   runs")
    print(f"{'vllm-reload':<12} {b:9.3f} {nbytes / b / 1e9:7.2f}   {[round(x, 3) for x in base]}")
    print(f"{'gad-sync':<12} {o:9.3f} {nbytes / o / 1e9:7.2f}   {[round(x, 3) for x in ours]}")
    print(f"ratio gad-sync / vllm-reload: {o / b:.2f} (goal <= 1.2); logprob gap after sync: mean {gap[0]:.2e} max {gap[1]:.2e}")
    engine.shutdown()
    shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

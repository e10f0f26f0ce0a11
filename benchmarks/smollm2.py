#!/usr/bin/env python
"""SmolLM2-135M-Instruct (the recipe's real student), ours vs plain transformers, side by side in one process:

1. G's update: our TrainEngine step (megatron-core GPTModel, its schedule, DDP buffers, AdamW) with the SFT loss
   vs a plain transformers forward + backward + torch AdamW step, on the same tokens (the recipe's teacher rows).
2. Rollout: the megatron KV engine vs HF ``generate`` (left-padded batch, its KV cache), greedy, the same
   prompts (the recipe's held-out prompts through the chat template), no stop token: every answer is
   ``--tokens`` long.

Each timing is the median of ``--repeats`` after one warm-up, alternating ours / theirs so that load on the
machine hits both alike. Goals (#21): update ratio (HF seconds / ours) >= 0.9; engine ratio (ours tokens/s /
HF's) >= 1.0.

    python benchmarks/smollm2.py                     # 16 rows for the update, 16 prompts x 64 tokens
    python benchmarks/smollm2.py --rows 8 --prompts 8 --repeats 2
"""

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def rows_and_prompts(tok, a) -> tuple:
    from gad_megatron.data.chat import prompt_ids, response_ids
    from gad_megatron.data.teacher import read_rows

    data = os.path.join(ROOT, "examples", "smollm2", "data")
    train = read_rows(os.path.join(data, "train.jsonl"))[: a.rows]
    seqs = [(prompt_ids(tok, r["messages"]), response_ids(tok, r["teacher_response"])) for r in train]
    held = read_rows(os.path.join(data, "heldout.jsonl"))[: a.prompts]
    return seqs, [prompt_ids(tok, r["messages"]) for r in held]


def lm_batch(seqs: list) -> dict:
    import torch

    width = max(len(p) + len(r) for p, r in seqs)
    tokens = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width)
    for i, (p, r) in enumerate(seqs):
        ids = p + r
        tokens[i, : len(ids)] = torch.tensor(ids)
        mask[i, len(p) - 1 : len(ids) - 1] = 1  # the positions that predict the answer's tokens
    return {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": mask}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    import torch
    import transformers

    from gad_megatron.convert import smollm2
    from gad_megatron.convert.api import load_from_hf
    from gad_megatron.models import ModelOptions
    from gad_megatron.rollout.base import SamplingConfig
    from gad_megatron.rollout.megatron_engine import MegatronEngine
    from gad_megatron.runtime import ParallelConfig, destroy, initialize
    from gad_megatron.trainer.engine import OptimConfig, TrainEngine
    from gad_megatron.trainer.steps import sft_step

    hf_dir = smollm2.hf_dir()
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    seqs, prompts = rows_and_prompts(tok, a)
    batch = lm_batch(seqs)
    n_tok = int(batch["loss_mask"].sum())
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 400))
    initialize(ParallelConfig(device="cpu"))
    _, chunks = load_from_hf(hf_dir, "student", ModelOptions(transformer_impl="local"))
    optim = OptimConfig(lr=1e-6, clip_grad=0.2, weight_decay=0.01)
    ours = TrainEngine(chunks, optim)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-6, weight_decay=0.01)

    def hf_step():
        hf.train()
        logits = hf(input_ids=batch["tokens"]).logits
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
        loss = (nll * batch["loss_mask"].flatten()).sum() / batch["loss_mask"].sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 0.2)
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)

    def our_step():
        ours.train_step([batch], sft_step)

    hf_left = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long)
    hf_mask = torch.zeros_like(hf_left)
    for i, p in enumerate(prompts):
        hf_left[i, hf_left.shape[1] - len(p):], hf_mask[i, hf_left.shape[1] - len(p):] = torch.tensor(p), 1
    engine = MegatronEngine(ours.chunks, max_batch_tokens=65536)
    greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=a.tokens, seed=0)

    def hf_generate():
        with torch.no_grad():
            hf.eval()
            out = hf.generate(hf_left, attention_mask=hf_mask, do_sample=False, max_new_tokens=a.tokens,
                              min_new_tokens=a.tokens, eos_token_id=None, pad_token_id=tok.pad_token_id)
        assert out.shape[1] - hf_left.shape[1] == a.tokens

    def our_generate():
        groups = engine.generate(prompts, greedy)
        assert all(len(g[0].token_ids) == a.tokens for g in groups)

    res = {}
    for name, theirs, mine in (("update", hf_step, our_step), ("generate", hf_generate, our_generate)):
        theirs(), mine()  # warm-up
        t_hf, t_ours = [], []
        for _ in range(a.repeats):
            t_hf.append(timed(theirs))
            t_ours.append(timed(mine))
        res[name] = {"hf_s": statistics.median(t_hf), "ours_s": statistics.median(t_ours)}
    destroy()
    up, gen = res["update"], res["generate"]
    new_tokens = len(prompts) * a.tokens
    print(f"SmolLM2-135M-Instruct fp32, {torch.get_num_threads()} threads, medians of {a.repeats}")
    print(f"  G update, {a.rows} rows ({n_tok} answer tokens, width {batch['tokens'].shape[1]}): "
          f"ours {up['ours_s']:.2f} s, transformers + AdamW {up['hf_s']:.2f} s -> ratio {up['hf_s'] / up['ours_s']:.2f} "
          f"(goal >= 0.9)")
    print(f"  greedy rollout, {len(prompts)} prompts x {a.tokens} tokens: megatron engine "
          f"{new_tokens / gen['ours_s']:.1f} tokens/s, HF generate {new_tokens / gen['hf_s']:.1f} tokens/s -> ratio "
          f"{gen['hf_s'] / gen['ours_s']:.2f} (goal >= 1.0)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

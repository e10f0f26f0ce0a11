#!/usr/bin/env python
"""GAD step benchmark on the demo model, one process (prints ratios measured side by side in one run).

    python benchmarks/gad_step.py [--steps 6] [--engine megatron|vllm]

1. Time split of a GAD step (rollout / old logprobs / ref logprobs / D scores / D update / G update / sync)
   and the share that is none of them ("other": advantages, metric reductions, batching) -- goal <= 10 %.
2. G's GRPO update (our policy step through TrainEngine) vs megatron's bare ``forward_backward`` + optimizer
   step with a plain token-mean cross-entropy loss on the same micro-batches -- ratio bare / ours, goal >= 0.9.
3. Memory: bytes of G + D + reference parameters and G/D optimizer state vs 3x one model's parameters +
   optimizer state (what three models must hold at least), and the process' peak RSS.
4. One pass (#30): GAD steps with ``algo.one_pass`` on (the GRPO update's forward gives the old logprobs) and
   off (a separate old-logprob forward), interleaved: the time of old logprobs + G update, and of the whole step.
"""

import argparse
import os
import resource
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def policy_microbatches(t, seqs: list, temperature: float, budget: int) -> list:
    """G's GRPO micro-batches for ``seqs``: old and reference logprobs from the models, a fixed advantage, and
    the engine's logprobs (as if sampled) where a rollout did not give them."""
    from gad_megatron.trainer.batching import microbatches

    units = [[s] for s in seqs]
    t.policy.logprobs(seqs, "old_logp", temperature)
    t.policy.reference_logprobs(seqs, temperature)
    for s in seqs:
        s.advantage = 0.5
        s.per_token.setdefault("rollout_logp", s.per_token["old_logp"].clone())
    return microbatches(units, budget)[0]


def bare_update(engine, mbs) -> None:
    """megatron-core's bare ``forward_backward`` + optimizer step with a plain token-sum cross-entropy on
    ``mbs``: the yardstick for G's update (same model, same micro-batches)."""
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from gad_megatron.models.forward import model_call

    def step(model, mb):
        out = model_call(model, mb, labels=mb["labels"])
        def loss_func(losses):
            mask = mb["loss_mask"].to(losses.device)  # micro-batches live on the host; the losses on the device
            return (losses * mask).sum(), mask.sum().to(torch.int), {}

        return out, loss_func

    for c in engine.chunks:
        c.zero_grad_buffer()
    engine.optimizer.zero_grad()
    get_forward_backward_func()(forward_step_func=lambda d, m: step(m, next(d)), data_iterator=iter(mbs),
                                model=engine.chunks[0], num_microbatches=len(mbs), seq_length=mbs[0]["tokens"].shape[1],
                                micro_batch_size=mbs[0]["tokens"].shape[0], forward_only=False)
    engine.optimizer.step()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--engine", default="megatron", choices=("megatron", "vllm"))
    ap.add_argument("--batch", type=int, default=16)
    a = ap.parse_args()
    import torch

    from gad_megatron.data import demo
    from gad_megatron.trainer import gad
    from gad_megatron.trainer.build import build_trainer
    from gad_megatron.trainer.config import load_config
    from gad_megatron.trainer.steps import policy_step

    work = tempfile.mkdtemp(prefix="gad-bench-")
    student = demo.make_student(os.path.join(work, "student"))
    cfg = load_config(base={
        "model": {"student": student}, "parallel": {"device": "cpu"},
        "data": {"train": demo.ASSET, "max_prompt_tokens": 48, "max_response_tokens": 12},
        "rollout": {"engine": a.engine, "n": 8, "max_tokens": 12, "in_process": a.engine == "vllm"},
        "train": {"batch_prompts": a.batch, "warmup_steps": 0, "critic_warmup": 0, "micro_batch_tokens": 1024},
        "log": {"run_dir": os.path.join(work, "run"), "tensorboard": False, "progress": False}})
    t = build_trainer(cfg)
    if t.sync is not None:
        t.policy.sync(0)
    splits, totals = {}, 0.0
    for step in range(a.steps + 1):
        batch = t.data.train[step * a.batch : (step + 1) * a.batch]
        timer = gad.Timer()
        t0 = time.perf_counter()
        gad.run_stage(t, "gad", step, batch, timer)
        dt = time.perf_counter() - t0
        if step == 0:
            continue  # warm-up step (allocations, first-call overheads)
        totals += dt
        for k, v in timer.t.items():
            splits[k] = splits.get(k, 0.0) + v
    other = totals - sum(splits.values())
    print(f"GAD step ({a.engine} rollouts, batch {a.batch} x n 8, {a.steps} steps): {totals / a.steps:.3f} s/step")
    for k, v in sorted(splits.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<14} {v / totals:6.1%}")
    print(f"  {'other':<14} {other / totals:6.1%}   (goal <= 10 %)")

    # 2. G update vs bare megatron forward_backward on the same micro-batches
    students = t.policy.rollout(1000, t.data.train[: a.batch]).students
    mbs = policy_microbatches(t, students, 0.8, cfg.train.micro_batch_tokens)

    def bare():
        bare_update(t.g, mbs)

    ours_fn = policy_step(0.8, cfg.algo)
    times = {"ours": 0.0, "bare": 0.0}
    for rep in range(6):  # interleaved, so drift in machine load hits both alike
        for name, fn in (("ours", lambda: t.g.train_step(mbs, ours_fn)), ("bare", bare)):
            t0 = time.perf_counter()
            fn()
            if rep:
                times[name] += time.perf_counter() - t0
    print(f"G update vs megatron's bare forward_backward on {len(mbs)} micro-batches: throughput ratio "
          f"{times['bare'] / times['ours']:.2f} (goal >= 0.9)")

    # 3. memory
    def nbytes(params):
        return sum(p.numel() * p.element_size() for p in params)

    one = nbytes(p for c in t.g.modules for p in c.parameters())
    optim_state = sum(v.numel() * v.element_size() for e in (t.g, t.reward.d) for st in e.optimizer.optimizer.state.values()
                      for v in st.values() if torch.is_tensor(v))
    three = 3 * one + optim_state
    held = (nbytes(p for c in t.g.modules for p in c.parameters()) + nbytes(p for c in t.reward.d.modules for p in c.parameters())
            + nbytes(p for c in t.ref for p in c.parameters()) + optim_state
            + sum(b.grad_data.numel() * b.grad_data.element_size() for e in (t.g, t.reward.d) for c in e.chunks
                  for b in c.buffers))
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"model state held (params + grad buffers + Adam state, G/D/ref): {held / 2**20:.1f} MiB = "
          f"{held / three:.2f} x (3 x params + optimizer states, {three / 2**20:.1f} MiB); peak RSS {peak_rss / 2**30:.2f} GiB "
          f"(mostly imports at this size)")
    # 4. one pass vs two passes, interleaved
    spent = {True: [0.0, 0.0], False: [0.0, 0.0]}  # one_pass -> [old logprobs + G update, whole step]
    for rep in range(2 * a.steps + 2):
        one = rep % 2 == 0
        t.cfg.algo.one_pass = one
        batch = t.data.train[(rep % 8) * a.batch : (rep % 8 + 1) * a.batch]
        timer = gad.Timer()
        t0 = time.perf_counter()
        gad.run_stage(t, "gad", 2000 + rep, batch, timer)
        if rep >= 2:
            spent[one][0] += timer.t.get("old_logprobs", 0.0) + timer.t["g_update"]
            spent[one][1] += time.perf_counter() - t0
    print(f"one pass vs two (old logprobs from the update's forward, {a.steps} steps each, interleaved): "
          f"old logprobs + G update {spent[True][0] / spent[False][0]:.2f} x, whole step "
          f"{spent[True][1] / spent[False][1]:.2f} x")
    if t.engine is not None and hasattr(t.engine, "shutdown"):
        t.engine.shutdown()


if __name__ == "__main__":
    main()

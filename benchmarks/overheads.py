#!/usr/bin/env python
"""The fixed costs of this machine's calls, for the planner's CPU entry (``models/plan_inputs.GPUS["cpu"]``).

    python benchmarks/overheads.py [--reps 5]
    torchrun --nproc-per-node 2 benchmarks/overheads.py     # the demo's world: DP2, an engine per rank

On a model this small (the demo's student, one process, fp32) the FLOPs take no time: what a call costs is its
fixed part (Python, megatron's schedule, the optimizer's bookkeeping, an engine's scheduler and sampler). Each
figure is the slope or the intercept of two call sizes measured side by side, the median over ``--reps``:

- ``fwd_call_s``: one more micro-batch in a forward-only pass (``passes.forward``);
- ``train_call_s``: one more micro-batch in an update (forward + backward, ``passes.update``);
- ``optim_step_s``: an update's cost beyond its micro-batches (the grad checks, clipping, Adam, the scheduler);
- ``decode_step_s`` / ``decode_seq_s`` per engine: one more decode step of a batch, whatever its size / for each
  sequence in it (greedy, max_tokens 33 vs 1, batches of 8 and 32 prompts);
- ``sync_s``: one weight sync into the vLLM engine, the logprob probe included.

Whole-run estimates (``gad-train --check``) add these per call to the FLOP model; record the figures (date,
machine) in docs/performance.md and in the CPU entry when they move.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def timed(fn, reps: int) -> float:
    fn()  # first call: allocations, caches
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def build(engine: str, work: str):
    from gad_megatron.data import demo
    from gad_megatron.trainer.build import build_trainer
    from gad_megatron.trainer.config import load_config

    student = os.path.join(work, "student")
    if not os.path.isdir(student):
        demo.make_student(student)
    cfg = load_config(base={
        "model": {"student": student}, "parallel": {"device": "cpu"},
        "data": {"train": demo.ASSET, "max_prompt_tokens": 48, "max_response_tokens": 40},
        "rollout": {"engine": engine, "n": 2, "max_tokens": 40, "in_process": engine == "vllm" and os.environ.get("WORLD_SIZE", "1") == "1"},
        "train": {"batch_prompts": 32, "warmup_steps": 0, "critic_warmup": 0, "micro_batch_tokens": 88},
        "log": {"run_dir": os.path.join(work, f"run_{engine}"), "tensorboard": False, "progress": False}})
    return build_trainer(cfg)


def training_calls(t, reps: int) -> dict:
    from gad_megatron.trainer import passes
    from gad_megatron.trainer.batching import Seq
    from gad_megatron.trainer.steps import logprob_step, sft_step

    seqs = [Seq(list(range(3, 27)), list(range(27, 51)), is_teacher=True) for _ in range(9)]  # 48 tokens: one a micro-batch

    def fwd(k):
        return lambda: passes.forward(t.g, [[s] for s in seqs[:k]], logprob_step(1.0), t.layout)

    def upd(k):
        return lambda: passes.update(t.g, [[s] for s in seqs[:k]], sft_step, t.layout)

    f1, f9 = timed(fwd(1), reps), timed(fwd(9), reps)
    u1, u9 = timed(upd(1), reps), timed(upd(9), reps)
    train_call = (u9 - u1) / 8
    return {"fwd_call_s": (f9 - f1) / 8, "train_call_s": train_call, "optim_step_s": max(0.0, u1 - train_call)}


def decode_step(t, reps: int) -> tuple:
    """(seconds a decode step costs whatever the batch, seconds more for each sequence in the batch): greedy
    rollouts of 8 and 32 prompts, 33 and 1 new tokens each."""
    from gad_megatron.rollout.base import SamplingConfig

    def gen(prompts, k):
        box = {}

        def run():
            groups = t.policy.generate(prompts, SamplingConfig(n=1, temperature=0.0, max_tokens=k, seed=1))
            box["steps"] = max(len(g[0][0]) for g in groups)
        return run, box

    per_step = {}
    for b in (8, 32):
        prompts = [e.prompt for e in t.data.train[:b]]
        (short, s_box), (long, l_box) = gen(prompts, 1), gen(prompts, 33)
        a, c = timed(short, reps), timed(long, reps)
        steps = l_box["steps"] - s_box["steps"]
        if steps <= 0:
            raise SystemExit("the model stopped at once: no decode steps to time")
        per_step[b] = (c - a) / steps
    per_seq = (per_step[32] - per_step[8]) / 24
    return max(0.0, per_step[8] - 8 * per_seq), per_seq


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    from gad_megatron.runtime import destroy

    work = tempfile.mkdtemp(prefix="gad-overheads-")
    figures = {}
    t = build("vllm", work)
    figures.update(training_calls(t, a.reps))
    figures["decode_step_s[vllm]"], figures["decode_seq_s[vllm]"] = decode_step(t, a.reps)
    figures["sync_s"] = timed(lambda: t.policy.sync(1), a.reps)
    t.policy.shutdown()
    destroy()
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; alone, runtime.initialize makes a world of one
    if world == 1:  # a second parallel state in one launch: single-rank only (the recipe that uses it runs one)
        t = build("megatron", work)
        figures["decode_step_s[megatron]"], figures["decode_seq_s[megatron]"] = decode_step(t, a.reps)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"fixed costs on this machine (demo student, {world} rank(s), {a.reps} reps, medians):")
        for k, v in figures.items():
            print(f"  {k:<26} {v * 1000:8.1f} ms")


if __name__ == "__main__":
    main()

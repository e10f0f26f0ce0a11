"""Drives gad_megatron.trainer.gad's stage functions directly. argv: mode out_prefix config_json

mode ``step``: one GAD step (D update + G GRPO update) from the same state on the same fixed rollouts at the
layout the config names; writes <out>.json (the step's metrics, the vocab-parallel logprob check) and
<out>.safetensors (every full G and D tensor after the step, and G's before it).
mode ``direction``: on the demo task at one rank: SFT steps vs held-out CE, BT steps (G frozen) vs d_acc,
GRPO steps (D frozen) vs G's mean D reward.
"""

import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist


class FixedRollouts:
    """Deterministic 'samples' per prompt, the same at every layout (collective like the megatron engine)."""

    collective = True

    def __init__(self, vocab: int, eos: int):
        self.vocab, self.eos = vocab, eos

    def generate(self, prompts, sampling):
        from gad_megatron.rollout.base import Sample

        out = []
        for pi, p in enumerate(prompts):
            seed = int(hashlib.sha256(str(list(p)).encode()).hexdigest()[:8], 16)
            g = torch.Generator().manual_seed(seed)
            group = []
            for _ in range(sampling.n):
                n = int(torch.randint(1, sampling.max_tokens + 1, (1,), generator=g))
                toks = torch.randint(6, self.vocab, (n,), generator=g).tolist()
                if n < sampling.max_tokens:
                    toks[-1] = self.eos
                lps = (-0.5 - torch.rand(n, generator=g)).tolist()
                group.append(Sample(pi, toks, lps, "stop" if toks[-1] == self.eos else "length"))
            out.append(group)
        return out


def gather(chunks, prefix, out):
    from gad_megatron.rollout.weight_sync import gather_full_tensors

    full = gather_full_tensors(chunks, dst=0)
    if full is not None:
        for (k, layer), t in full.items():
            out[f"{prefix}|{k}|{layer}"] = t.detach().float().clone().contiguous()


def vocab_parallel_check(t):
    """Vocab-parallel logprobs (no gather) vs log_softmax of the gathered full logits, at T=0.8."""
    from megatron.core import parallel_state as ps

    from gad_megatron.models.forward import full_logits, token_logprobs

    seqs = [e.prompt + e.response for e in t.data.train[:4]]
    ours = token_logprobs(t.g.modules, seqs, temperature=0.8)
    width = max(len(s) for s in seqs)
    width += -width % ps.get_tensor_model_parallel_world_size()  # sequence parallel splits the width over TP
    tokens = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s)
    logits = full_logits(t.g.modules, [{"tokens": tokens}])
    if logits is None or ps.get_tensor_model_parallel_rank() != 0:
        return None
    ref = torch.log_softmax(logits[0].double() / 0.8, -1)
    diffs = [(ours[i] - ref[i, torch.arange(len(s) - 1), tokens[i, 1: len(s)]]).abs().max().item()
             for i, s in enumerate(seqs)]
    return max(diffs)


def mode_step(cfg, out_prefix):
    from safetensors.torch import save_file

    from gad_megatron.trainer import gad
    from gad_megatron.trainer.build import build_trainer

    t = build_trainer(cfg)
    t.engine, t.sync = FixedRollouts(t.arch.vocab_size, t.tokenizer.eos_token_id), None
    tensors = {}
    gather(t.g.modules, "g_before", tensors)
    batch = t.data.train[: cfg.train.batch_prompts]
    m = gad.run_stage(t, "gad", cfg.train.critic_warmup, batch, gad.Timer())
    gather(t.g.modules, "g", tensors)
    for role, engine in t.reward.engines().items():  # D (none for OPD)
        gather(engine.modules, role[0], tensors)
    m["vocab_parallel_max_diff"] = vocab_parallel_check(t)
    if dist.get_rank() == 0:
        save_file(tensors, out_prefix + ".safetensors")
    box = [m["vocab_parallel_max_diff"]]
    # the rank holding the check (last stage, TP rank 0) may not be rank 0
    vals = [None] * dist.get_world_size()
    dist.all_gather_object(vals, box[0])
    m["vocab_parallel_max_diff"] = next((v for v in vals if v is not None), None)
    if dist.get_rank() == 0:
        with open(out_prefix + ".json", "w") as f:
            json.dump({k: v for k, v in m.items() if not isinstance(v, torch.Tensor)}, f)


def mode_direction(cfg, out_prefix):
    from gad_megatron.trainer import passes
    from gad_megatron.trainer.batching import Seq
    from gad_megatron.trainer.build import build_trainer
    from gad_megatron.trainer.heldout import evaluate
    from gad_megatron.trainer.steps import score_step

    t = build_trainer(cfg)
    t.sync = None
    res = {}
    batches = [t.data.train[i * 16 : (i + 1) * 16] for i in range(len(t.data.train) // 16)]

    def ce():
        return evaluate(t, t.data.held)["heldout_ce"]

    # 0. a non-finite loss: the step is skipped, nothing moves, and the next finite step proceeds
    from gad_megatron.trainer.batching import microbatches
    from gad_megatron.trainer.steps import sft_step

    def nan_step(model, batch):
        out, loss_func = sft_step(model, batch)
        return out, lambda x: (lambda r: (r[0] * float("nan"), r[1], r[2]))(loss_func(x))

    mbs, _ = microbatches([[Seq(e.prompt, e.response)] for e in batches[0]], 4096)
    before = [p.detach().clone() for c in t.g.modules for p in c.parameters()]
    r = t.g.train_step(mbs, nan_step)
    res["nan_skipped"] = r["skipped"]
    res["nan_params_unchanged"] = all(torch.equal(a, p) for a, p in zip(before, (p for c in t.g.modules for p in c.parameters())))
    r = t.g.train_step(mbs, sft_step)
    res["after_nan_ok"] = not r["skipped"] and r["grad_norm"] == r["grad_norm"]

    # 1. SFT (warmup's G update) lowers held-out cross-entropy on teacher answers
    res["ce_before"] = ce()
    for k in range(8):
        t.policy.sft_update([Seq(e.prompt, e.response, is_teacher=True) for e in batches[k]])
    res["ce_after"] = ce()

    # 2. BT steps with G frozen: d_acc on held-out prompts (teacher vs fresh samples) goes above 0.5
    eval_prompts = t.data.held[:16]

    def d_acc():
        b = t.policy.rollout(999, eval_prompts)
        out, _ = passes.forward(t.reward.d, b.d_units, score_step, t.layout)
        s = torch.cat([o["scores"] for o in out]).view(-1, cfg.rollout.n + 1)
        return (s[:, :1] > s[:, 1:]).double().mean().item()

    res["d_acc_before"] = d_acc()
    for k in range(16):
        t.reward.update(t.policy.rollout(100 + k, batches[k % len(batches)]))
    res["d_acc_after"] = d_acc()

    # 3. GRPO steps with D frozen raise G's mean D reward on training prompts
    probe = batches[0]

    def mean_reward():
        total = 0.0
        for seed in (7001, 7002):
            rewards = t.reward.score(t.policy.rollout(seed, probe)).rewards
            total += rewards.mean().item() / 2
        return total

    res["reward_before"] = mean_reward()
    grpo_lr = float(os.environ.get("GAD_TEST_GRPO_LR", "2e-3"))
    for group in t.g.optimizer.param_groups:  # RL steps at a lower rate than SFT (the constant schedule's max)
        group["lr"] = group["max_lr"] = grpo_lr
    for k in range(int(os.environ.get("GAD_TEST_GRPO_STEPS", "16"))):
        batch = batches[k % 4]
        b = t.policy.rollout(200 + k, batch)
        students = b.students
        t.policy.logprobs(students, "old_logp")
        t.policy.logprobs(students, "ref_logp", chunks=t.ref)
        rewards = t.reward.score(b).rewards
        from gad_megatron.algo.policy import grpo_advantages

        adv = grpo_advantages(rewards, cfg.rollout.n, cfg.algo.adv_eps)
        for j, s in enumerate(students):
            s.advantage = float(adv[j])
        t.policy.grpo_update(students)
    res["reward_after"] = mean_reward()
    with open(out_prefix + ".json", "w") as f:
        json.dump(res, f)


def main():
    from gad_megatron.trainer.config import load_config

    mode, out_prefix, cfg_json = sys.argv[1:4]
    cfg = load_config(base=json.loads(cfg_json))
    {"step": mode_step, "direction": mode_direction}[mode](cfg, out_prefix)
    dist.barrier()


if __name__ == "__main__":
    main()
    # An explicit, collective teardown: a gloo group left to interpreter exit can abort a rank
    # ("terminate called without an active exception") after its work is done.
    from gad_megatron.runtime import destroy

    destroy()

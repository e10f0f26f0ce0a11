"""Held-out evaluation during training, made to see what GAD changes:

- ``heldout_ce``: G's cross-entropy on the teacher's held-out answers (what SeqKD optimises);
- with ``eval.scorer`` (a ``module:function`` taking ``(messages, response_text) -> float``):
  ``heldout_score`` over G's greedy answers and ``heldout_score_sampled`` over ``eval.samples`` answers per
  prompt at the rollout temperature (GAD trains the sampling distribution; greedy decoding can hide a change);
- ``heldout_score_se`` / ``heldout_score_sampled_se``: their standard errors over prompts (the standard
  deviation of the per-prompt mean score over sqrt(prompts)): prompts are the sampling unit, so this counts
  both which prompts were held out and the draws per prompt; two scores closer than ~2 of these are noise;
- ``heldout_per_prompt``: each prompt's ``{"id", "greedy", "sampled"}`` scores (the run writes them to
  ``heldout/<eval>_step<step>.jsonl``): two evaluations of the same prompts compare prompt by prompt, whose
  standard error is far smaller than either score's;
- ``heldout_length`` (greedy answer tokens) and ``heldout_length_sampled``;
- ``heldout_kl``: KL(G || reference) on G's sampled held-out answers at the rollout temperature, per token, by
  the same low-variance (k3, never negative) estimator as the training loss's KL, when there is a reference;
- ``heldout_d_acc``: with a discriminator, the share of (teacher answer, sampled answer) pairs of held-out
  prompts that D ranks teacher first (a tie counts 0.5): whether D reads content on prompts it never trained
  on, where its training-batch accuracy can also reflect memorised prompts.
The rollout engine generates; every function is collective.
"""

from __future__ import annotations

import torch

from gad_megatron.algo.policy import low_var_kl
from gad_megatron.data.chat import d_view
from gad_megatron.eval.paired import mean_se
from gad_megatron.rollout.base import SamplingConfig
from gad_megatron.trainer import passes
from gad_megatron.trainer.batching import Seq
from gad_megatron.trainer.metrics import reduce_pairs, sum_outputs, zero_pairs
from gad_megatron.trainer.policy import dp_share, teacher_seq
from gad_megatron.trainer.rewards import call_scorer, load_scorer
from gad_megatron.trainer.steps import sft_step


def evaluate(t, held: list) -> dict:
    """Collective: the metrics above, and three greedy example answers (``heldout_examples``)."""
    if not held:
        return {}
    cfg = t.cfg
    out, _ = passes.forward(t.g, [[teacher_seq(e)] for e in held], sft_step, t.layout)
    res = {"heldout_ce": reduce_pairs(sum_outputs(out) or zero_pairs(["sft_loss"]))["sft_loss"]}
    scorer = load_scorer(cfg.eval.scorer)
    stop = [t.tokenizer.eos_token_id]
    greedy = t.policy.generate([e.prompt for e in held], SamplingConfig(
        n=1, temperature=0.0, max_tokens=cfg.eval.max_tokens, stop_token_ids=stop, seed=0))
    texts = [t.tokenizer.decode(g[0].token_ids, skip_special_tokens=True) for g in greedy]
    res["heldout_length"] = sum(len(g[0].token_ids) for g in greedy) / len(held)
    if scorer is not None:
        where = f"eval.scorer={cfg.eval.scorer}"
        greedy_scores = [call_scorer(scorer, where, e, txt) for e, txt in zip(held, texts)]
        res.update(score_and_se("heldout_score", [[x] for x in greedy_scores]))
        res["heldout_per_prompt"] = [{"id": e.id, "greedy": x} for e, x in zip(held, greedy_scores)]
        res["heldout_examples"] = [{"id": e.id, "answer": txt} for e, txt in list(zip(held, texts))[:3]]
    if cfg.eval.samples:
        sampled, means = _sampled(t, held, scorer, stop)
        res.update(sampled)
        for row, x in zip(res.get("heldout_per_prompt", []), means):
            row["sampled"] = x
    return res


def score_and_se(key: str, per_prompt: list) -> dict:
    """``{key: mean score, key_se: its standard error}`` from each prompt's list of sample scores (equal
    lengths): the per-prompt means' standard deviation over sqrt(prompts) (0 for a single prompt)."""
    mean, se = mean_se([sum(x) / len(x) for x in per_prompt])
    return {key: mean, f"{key}_se": se}


def _sampled(t, held: list, scorer, stop: list) -> tuple:
    """(the sampled answers' metrics, each prompt's mean sampled score: [] without a scorer)."""
    cfg, n = t.cfg, t.cfg.eval.samples
    per_prompt = []
    groups = t.policy.generate([e.prompt for e in held], SamplingConfig(
        n=n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
        max_tokens=cfg.eval.max_tokens, stop_token_ids=stop, seed=cfg.eval.seed))
    res = {"heldout_length_sampled": sum(len(s.token_ids) for g in groups for s in g) / (n * len(held))}
    if scorer is not None:
        dec = t.tokenizer.decode
        where = f"eval.scorer={cfg.eval.scorer}"
        per_prompt = [[call_scorer(scorer, where, e, dec(s.token_ids, skip_special_tokens=True)) for s in g]
                      for e, g in zip(held, groups)]
        res.update(score_and_se("heldout_score_sampled", per_prompt))
    if t.ref is not None:
        res["heldout_kl"] = _kl_to_reference(t, held, groups)
    if t.reward is not None and t.reward.reads_answers:
        res.update(_d_accuracy(t, held, groups))
    return res, [sum(x) / len(x) for x in per_prompt]


def _d_accuracy(t, held: list, groups: list) -> dict:
    """D on (teacher, sampled answers) of this rank's share of held-out prompts, as D sees samples in training
    (re-encoded text with reward.canonical_text, closed by the end token when finished)."""
    mine = dp_share(t.world, held)
    first = t.world["dp_rank"] * len(mine)
    canonical = t.cfg.reward.canonical_text
    units = [[teacher_seq(e)] + [Seq(e.prompt, d_view(t.tokenizer, s.token_ids, not s.truncated, canonical)) for s in g]
             for e, g in zip(mine, groups[first : first + len(mine)])]
    scores = t.reward.heldout_scores(units)
    pair = torch.zeros(2, dtype=torch.float64)
    if passes.last_stage_writer() and scores is not None and scores.numel():
        g = scores.view(-1, t.cfg.eval.samples + 1)
        diff = g[:, :1] - g[:, 1:]
        wins = (diff > 0).double() + 0.5 * (diff == 0).double()
        pair = torch.stack([wins.sum(), torch.tensor(float(wins.numel()), dtype=torch.float64)])
    return {"heldout_d_acc": reduce_pairs({"heldout_d_acc": pair})["heldout_d_acc"]}


def _kl_to_reference(t, held: list, groups: list) -> float:
    mine = dp_share(t.world, held)
    first = t.world["dp_rank"] * len(mine)
    seqs = [Seq(e.prompt, s.token_ids) for e, g in zip(mine, groups[first : first + len(mine)]) for s in g if s.token_ids]
    t.policy.logprobs(seqs, "old_logp")
    t.policy.reference_logprobs(seqs)
    pair = torch.zeros(2, dtype=torch.float64)
    if passes.last_stage_writer() and seqs:
        logp = torch.cat([s.per_token["old_logp"] for s in seqs]).double()
        ref = torch.cat([s.per_token["ref_logp"] for s in seqs]).double()
        kl = low_var_kl(logp, ref, t.cfg.algo.kl_clamp)
        pair = torch.stack([kl.sum(), torch.tensor(float(kl.numel()), dtype=torch.float64)])
    return reduce_pairs({"heldout_kl": pair})["heldout_kl"]

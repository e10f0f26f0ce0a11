"""Held-out evaluation during training: G's cross-entropy on the teacher's answers and, with ``eval.scorer``
(a ``module:function`` taking ``(messages, response_text) -> float``), the scorer's mean over G's greedy
answers from the rollout engine."""

from __future__ import annotations

import importlib

from gad_megatron.rollout.base import SamplingConfig
from gad_megatron.trainer import passes
from gad_megatron.trainer.metrics import reduce_pairs, sum_outputs, zero_pairs
from gad_megatron.trainer.steps import sft_step


def load_scorer(spec):
    if not spec:
        return None
    mod, fn = spec.split(":")
    return getattr(importlib.import_module(mod), fn)


def evaluate(t, held: list) -> dict:
    """Collective: ``heldout_ce`` and, with a scorer, ``heldout_score`` and three example answers."""
    if not held:
        return {}
    out, _ = passes.forward(t.g, [[passes.teacher_seq(e)] for e in held], sft_step, t.budget, t.pad)
    m = reduce_pairs(sum_outputs(out) or zero_pairs(["sft_loss"]))
    res = {"heldout_ce": m["sft_loss"]}
    scorer = load_scorer(t.cfg.eval.scorer)
    if scorer is not None:
        greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=t.cfg.eval.max_tokens,
                                stop_token_ids=[t.tokenizer.eos_token_id], seed=0)
        groups = passes.generate(t.engine, [e.prompt for e in held], greedy)
        texts = [t.tokenizer.decode(g[0][0], skip_special_tokens=True) for g in groups]
        res["heldout_score"] = sum(scorer(e.messages, txt) for e, txt in zip(held, texts)) / len(held)
        res["heldout_examples"] = [{"id": e.id, "answer": txt} for e, txt in list(zip(held, texts))[:3]]
    return res

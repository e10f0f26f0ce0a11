"""The KV-cached megatron engine against HF and against itself: argv tp pp out.json hf_dir [hf_dir ...].

Per model: greedy (left-padded + masked, and right-padded), greedy with a stop token, sampled groups in one batch
and in several, and the trainer's recomputed logprobs of the sampled tokens at the sampling temperature."""

import json
import sys

import torch.distributed as dist

# Lengths 1..11 in one batch; two prompts share a length.
PROMPTS = [[5, 6, 7, 8], [10, 11, 12], [3, 90, 17, 44, 2, 61], [42], [9, 8, 7, 6, 5, 4, 3, 2, 1, 20, 21], [33, 34, 35]]
SAMPLED = dict(n=4, temperature=0.8, max_tokens=8, seed=5)


def check_model(hf: str) -> dict:
    from megatron.core import parallel_state as ps

    from gad_megatron.convert.api import load_from_hf
    from gad_megatron.models import ModelOptions
    from gad_megatron.models.forward import token_logprobs
    from gad_megatron.rollout.base import SamplingConfig
    from gad_megatron.rollout.megatron_engine import MegatronEngine

    arch, chunks = load_from_hf(hf, "student", ModelOptions())
    engine = MegatronEngine(chunks)
    res = {}
    greedy = SamplingConfig().greedy(max_tokens=10)
    res["greedy_masked"] = [g[0].token_ids for g in engine.generate(PROMPTS, greedy)]
    stop = res["greedy_masked"][0][3]
    stopped = engine.generate(PROMPTS, SamplingConfig(n=1, temperature=0.0, max_tokens=10, stop_token_ids=[stop]))
    res["stop_token"] = stop
    res["stopped"] = [(g[0].token_ids, g[0].finish_reason) for g in stopped]
    sampled = engine.generate(PROMPTS, SamplingConfig(**SAMPLED))
    res["sampled"] = [[s.token_ids for s in g] for g in sampled]
    res["sampled_prompt_index"] = [[s.prompt_index for s in g] for g in sampled]
    engine.max_batch_tokens = 2 * SAMPLED["n"] * (11 + SAMPLED["max_tokens"])  # 1-2 prompts a batch
    res["sampled_small_batches"] = [[s.token_ids for s in g] for g in engine.generate(PROMPTS, SamplingConfig(**SAMPLED))]
    res["small_batches"] = engine.last_stats["batches"]
    engine.max_batch_tokens = 3 * (11 + SAMPLED["max_tokens"])  # 3 samples a batch: each group of 4 split
    res["sampled_split_groups"] = [[s.token_ids for s in g] for g in engine.generate(PROMPTS, SamplingConfig(**SAMPLED))]
    res["split_batches"] = engine.last_stats["batches"]
    engine.max_batch_tokens = 1 << 20
    engine.masked = False  # the right-padded scheme (Transformer Engine's) on the same local layers
    res["greedy_right_padded"] = [g[0].token_ids for g in engine.generate(PROMPTS, greedy)]
    res["sampled_right_padded"] = [[s.token_ids for s in g] for g in engine.generate(PROMPTS, SamplingConfig(**SAMPLED))]
    if hf == sys.argv[4]:  # the first model: the no-cache reference engine gives the same samples
        from gad_megatron.rollout.reforward_engine import ReforwardEngine

        ref = ReforwardEngine(chunks).generate(PROMPTS, SamplingConfig(**SAMPLED))
        res["sampled_reforward"] = [[s.token_ids for s in g] for g in ref]
    seqs = [PROMPTS[i] + s.token_ids for i, g in enumerate(sampled) for s in g]
    trainer = token_logprobs(chunks, seqs, temperature=SAMPLED["temperature"])
    if ps.is_pipeline_last_stage():
        flat = [s for g in sampled for s in g]
        diffs = [abs(float(a) - float(b)) for s, lp in zip(flat, trainer)
                 for a, b in zip(s.logprobs, lp[-len(s.token_ids):].tolist())]
        res["logprob_mean_abs_diff"] = sum(diffs) / len(diffs)
        res["logprob_max_abs_diff"] = max(diffs)
    return res


def sequence_parallel_check(hf: str) -> dict:
    """TP > 1 with sequence parallelism: decoding turns it off for the rollout and back on for training."""
    from megatron.core import parallel_state as ps

    from gad_megatron.convert.api import load_from_hf
    from gad_megatron.models import ModelOptions
    from gad_megatron.models.forward import token_logprobs
    from gad_megatron.rollout.base import SamplingConfig
    from gad_megatron.rollout.megatron_engine import MegatronEngine

    _, chunks = load_from_hf(hf, "student", ModelOptions(sequence_parallel=True))
    greedy = [g[0].token_ids for g in MegatronEngine(chunks).generate(PROMPTS, SamplingConfig().greedy(max_tokens=10))]
    sp_back = chunks[0].config.sequence_parallel and all(
        getattr(m, "sequence_parallel", True) for m in chunks[0].modules() if hasattr(m, "sequence_parallel"))
    lp = token_logprobs(chunks, [PROMPTS[4] + greedy[4]], temperature=1.0)  # a training-layout forward after it
    return {"greedy": greedy, "sp_restored": bool(sp_back),
            "forward_after": None if not ps.is_pipeline_last_stage() else float(lp[0].sum())}


def resident_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def memory_check(hf: str) -> dict:
    """Resident memory after 1 and after 5 rollouts of 192 samples (the cache is several MiB)."""
    import gc

    from gad_megatron.convert.api import load_from_hf
    from gad_megatron.models import ModelOptions
    from gad_megatron.rollout.base import SamplingConfig
    from gad_megatron.rollout.megatron_engine import MegatronEngine

    import ctypes

    # glibc raises its mmap threshold after a large free, after which cache-sized blocks come from the heap and may
    # stay resident: the resident set then swings by a cache's size whatever the engine frees. A fixed threshold
    # (mallopt M_MMAP_THRESHOLD = -3) keeps large blocks in mmap, returned to the system when freed.
    ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)
    _, chunks = load_from_hf(hf, "student", ModelOptions())
    engine = MegatronEngine(chunks)
    sampling = SamplingConfig(n=32, temperature=1.0, max_tokens=24, seed=1)
    rss = []
    for _ in range(5):
        engine.generate(PROMPTS, sampling)
        gc.collect()
        rss.append(resident_bytes())
    return {"rss": rss, "kv_cache_bytes": engine.last_stats["kv_cache_bytes"]}


def main():
    from gad_megatron.runtime import ParallelConfig, initialize

    tp, pp, out, hfs = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    initialize(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, device="cpu"))
    res = {hf: check_model(hf) for hf in hfs}
    if tp == pp == 1:
        res["memory"] = memory_check(hfs[0])
    if tp > 1:
        res["sequence_parallel"] = sequence_parallel_check(hfs[0])
    # The last pipeline stage reports (it holds the logprob comparison); the others must agree on the tokens.
    from megatron.core import parallel_state as ps

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {hf: r.get("sampled") for hf, r in res.items()})
    assert all(g == gathered[0] for g in gathered), "ranks disagree on the sampled tokens"
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        with open(out, "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    main()
    from gad_megatron.runtime import destroy

    destroy()

"""Two vLLM engines at world 2, rollout TP 1 (runtime.topology), built as gad-train builds them: each rank leads
one, both fed by one WeightSync. argv: hf_A hf_B out.json

The engines start from B's weights; G is A (DP2). Records per sync every engine's probe gap and received digest
(after A is synced in, and after G's weights change), the samples of the 2-engine rollout (Policy.generate)
and those of rank 0's engine alone given every prompt with the same seeds."""

import sys

import torch
import torch.distributed as dist
from gathered import write_gathered_json

PROMPTS = [[5, 6, 7, 8], [10, 11, 12], [3, 90, 17, 44, 2, 61], [9, 9, 4], [7, 1, 2, 3, 4], [20, 21]]


def main():
    from omegaconf import OmegaConf

    from gad_megatron.convert.api import load_from_hf
    from gad_megatron.models import ModelOptions
    from gad_megatron.rollout.base import SamplingConfig
    from gad_megatron.rollout.vllm_engine import VLLMConfig, VLLMEngine
    from gad_megatron.rollout.weight_sync import WeightSync
    from gad_megatron.runtime import ParallelConfig, initialize
    from gad_megatron.runtime.topology import rollout_topology
    from gad_megatron.trainer.policy import Policy

    hf_a, hf_b, out = sys.argv[1:4]
    initialize(ParallelConfig(device="cpu"))
    rank = dist.get_rank()
    arch, chunks = load_from_hf(hf_a, "student", ModelOptions())
    topo = rollout_topology(dist.get_world_size(), 1)
    engine = (VLLMEngine(VLLMConfig(model=hf_b, max_model_len=128, seed=3, devices=topo.local_devices(rank),
                                    node_ranks=topo.per_node)) if topo.is_leader(rank) else None)
    sync = WeightSync(chunks, engine, arch, bucket_mb=0.25, dst=topo.leaders)
    res = {"engines": topo.engines, "leaders": topo.leaders, "syncs": []}

    def synced():
        engine.record_digest(True)
        stats = sync.sync()
        res["syncs"].append({"gaps": stats.engine_gaps, "digest": engine.received_digest()[0]})

    synced()
    with torch.no_grad():  # G moves (the same change on both DP replicas, as an optimizer step makes it)
        g = torch.Generator().manual_seed(0)
        for p in chunks[0].parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    synced()

    cfg = OmegaConf.create({"rollout": {"offload": []}})
    policy = Policy(cfg, {"rank": rank}, None, type("G", (), {"bring_back": None})())
    policy.engine, policy.topology, policy.train_engines = engine, topo, []  # no training state to offload here
    sampling = SamplingConfig(n=3, temperature=0.9, max_tokens=8, seed=1234)
    res["two_engines"] = [[(s.token_ids, s.logprobs, s.finish_reason) for s in g] for g in policy.generate(PROMPTS, sampling)]
    if rank == 0:
        alone = engine.generate(PROMPTS, sampling)
        res["one_engine"] = [[(s.token_ids, s.logprobs, s.finish_reason) for s in grp] for grp in alone]
    write_gathered_json(res, out)
    engine.shutdown()


if __name__ == "__main__":
    main()
    from gad_megatron.runtime import destroy

    destroy()

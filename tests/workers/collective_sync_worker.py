"""The collective-broadcast weight-sync transport, for real over gloo (#8). argv: tp hf_A hf_B work_dir out.json

Trainer at TP ``tp`` holds model A; a vLLM engine (its own process, engine TP 1) starts from model B. A sync
through the collective transport must make vLLM answer like HF's A; then the same weights synced through the
shm-files transport must deliver byte-identical tensors (hash of every (name, bytes) the worker received,
also computed on the trainer's side from the buckets it sent)."""

import hashlib
import json
import sys

import torch
import torch.distributed as dist
from hf_fixtures import hf_greedy

PROMPTS = [[5, 6, 7, 8], [10, 11, 12], [3, 90, 17, 44, 2, 61]]
MAX_NEW = 10


def main():
    from gad_megatron.convert import api
    from gad_megatron.rollout.base import SamplingConfig
    from gad_megatron.rollout.transport import CollectiveTransport, SharedMemoryFileTransport
    from gad_megatron.rollout.vllm_engine import VLLMConfig, VLLMEngine
    from gad_megatron.rollout.weight_sync import WeightSync, buckets, hf_tensors, iter_full_tensors
    from gad_megatron.runtime import ParallelConfig, initialize

    tp = int(sys.argv[1])
    hf_a, hf_b, work, out_path = sys.argv[2:6]
    initialize(ParallelConfig(tensor_parallel=tp, device="cpu"))
    rank = dist.get_rank()
    arch, chunks = api.load_from_hf(hf_a)
    engine = VLLMEngine(VLLMConfig(model=hf_b, max_model_len=128, transport="collective")) if rank == 0 else None
    greedy = SamplingConfig().greedy(max_tokens=MAX_NEW)
    res = {}
    if rank == 0:
        res["transport"] = engine.transport.name
        res["before"] = [g[0].token_ids for g in engine.generate(PROMPTS, greedy)]
        engine.record_digest(True)

    # What the trainer sends, hashed the way the worker hashes what it receives.
    from gad_megatron.rollout.vllm_worker import tensor_digest

    sent = {}
    for bucket in buckets(hf_tensors(iter_full_tensors(chunks), sync_mapping(arch), arch), int(0.25 * 1024**2)):
        for name, t in bucket:
            sent[name] = hashlib.sha256(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    sync = WeightSync(chunks, engine, arch, bucket_mb=0.25)
    stats = sync.sync()
    if rank == 0:
        res["sent_digest"] = tensor_digest(sent)
        res["collective_digest"] = engine.received_digest()
        res["collective"] = {"buckets": stats.buckets, "tensors": stats.tensors, "gap_max": stats.gap_max}
        res["after"] = [g[0].token_ids for g in engine.generate(PROMPTS, greedy)]
        res["hf_a"] = hf_greedy(hf_a, PROMPTS, MAX_NEW)
        engine.transport = SharedMemoryFileTransport()
    stats = sync.sync()
    if rank == 0:
        res["shm_digest"] = engine.received_digest()
        res["after_shm"] = [g[0].token_ids for g in engine.generate(PROMPTS, greedy)]
        # A second collective sync reuses the group made by the first.
        engine.transport = CollectiveTransport()
    stats = sync.sync()
    if rank == 0:
        res["collective_again_digest"] = engine.received_digest()
        res["collective_again_gap"] = stats.gap_max
        engine.shutdown()
        with open(out_path, "w") as f:
            json.dump(res, f)
    dist.barrier()


def sync_mapping(arch):
    from gad_megatron.models.mapping import mapping_for

    return mapping_for(arch.model_type)


if __name__ == "__main__":
    main()
    from gad_megatron.runtime import destroy

    destroy()

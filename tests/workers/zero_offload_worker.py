"""ZeRO-1 (megatron's distributed optimizer) against the plain optimizer, and rollout.offload's round trip, at
DP2 or TP2 x DP2. argv: tp hf_dir out.json

G is built twice from one HF model; both take 3 SFT steps on the same per-DP-rank micro-batches. Records the
largest parameter difference, what a weight sync delivers to every engine leader from each (a recording engine:
a digest of every (name, bytes)), and the offload round trip on the sharded engine: bytes freed, storages left
on the device, a digest of parameters + grad buffers + optimizer state before and after, and a 4th step after
it on both."""

import sys

import torch
import torch.distributed as dist
from gathered import write_gathered_json


class RecordingEngine:
    """A rollout engine that only checks what it receives: the digest of every (HF name, bytes)."""

    live_weights = False

    def update_weights(self, buckets):
        from gad_megatron.rollout.vllm_worker import _Digest

        d, self.tensors = _Digest(), {}
        for bucket in buckets:
            for name, t in bucket:
                self.tensors[name] = t.clone()  # numpy() of a live parameter would pin its storage (not resizable)
                d.add(name, self.tensors[name])
        self.digest, self.count = d.hexdigest(), d.count


def batches(vocab: int, step: int, dp_rank: int) -> list:
    g = torch.Generator().manual_seed(1000 * step + dp_rank)
    out = []
    for _ in range(2):
        tokens = torch.randint(0, vocab, (2, 16), generator=g)
        out.append({"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(2, 16)})
    return out


def state_digest(engine) -> str:
    from gad_megatron.rollout.vllm_worker import _Digest
    from gad_megatron.trainer.offload import storages

    d = _Digest()
    for kind in ("params", "grads", "optimizer"):
        for i, s in enumerate(storages(engine, kind)):
            d.add(f"{kind}{i}", torch.empty(0, dtype=torch.uint8).set_(s, 0, (s.nbytes(),)).clone())
    return d.hexdigest()


def main():
    from megatron.core import parallel_state as ps

    from gad_megatron.convert.api import load_from_hf
    from gad_megatron.models import ModelOptions
    from gad_megatron.rollout.weight_sync import WeightSync
    from gad_megatron.runtime import ParallelConfig, initialize
    from gad_megatron.runtime.topology import rollout_topology
    from gad_megatron.trainer.engine import OptimConfig, TrainEngine
    from gad_megatron.trainer.offload import storages
    from gad_megatron.trainer.steps import sft_step

    tp, hf, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    initialize(ParallelConfig(tensor_parallel=tp, device="cpu"))
    rank, dp = dist.get_rank(), ps.get_data_parallel_rank()
    engines = {}
    for name, sharded in (("plain", False), ("zero1", True)):
        arch, chunks = load_from_hf(hf, "student", ModelOptions())
        engines[name] = TrainEngine(chunks, OptimConfig(lr=1e-3, clip_grad=1.0, use_distributed_optimizer=sharded))
    plain, zero = engines["plain"], engines["zero1"]
    res = {"dp": ps.get_data_parallel_world_size(), "norms": []}
    for step in range(3):
        mbs = batches(arch.vocab_size, step, dp)
        res["norms"].append([plain.train_step(mbs, sft_step)["grad_norm"], zero.train_step(mbs, sft_step)["grad_norm"]])

    def max_diff():
        return max((a - b).abs().max().item() for a, b in zip(
            (p for c in plain.modules for p in c.parameters()), (p for c in zero.modules for p in c.parameters())))

    res["max_param_diff"] = max_diff()

    topo = rollout_topology(dist.get_world_size(), 1)  # every rank leads an engine: DP rank 1's too
    res["sync"], got = {}, {}
    fresh = load_from_hf(hf, "student", ModelOptions())[1]
    for name, chunks in (("initial", fresh), ("plain", plain.modules), ("zero1", zero.modules)):
        rec = RecordingEngine() if topo.is_leader(rank) else None
        WeightSync(chunks, rec, arch, dst=topo.leaders, verify=False).sync()
        res["sync"][name] = [rec.digest, rec.count]
        got[name] = rec.tensors
    res["sync_max_diff"] = max((got["plain"][n] - got["zero1"][n]).abs().max().item() for n in got["plain"])
    res["moved"] = max((got["initial"][n] - got["zero1"][n]).abs().max().item() for n in got["plain"])

    before = state_digest(zero)
    res["offload_freed"] = zero.offload.to_host(["grads", "optimizer", "params"])
    res["left_on_device"] = sum(s.nbytes() for kind in ("grads", "optimizer", "params") for s in storages(zero, kind))
    res["param_storage_bytes_while_away"] = sum(p.untyped_storage().nbytes() for c in zero.modules for p in c.parameters())
    zero.ensure_resident()
    res["digest_same_after_round_trip"] = state_digest(zero) == before
    mbs = batches(arch.vocab_size, 3, dp)
    plain.train_step(mbs, sft_step)
    zero.offload.to_host(["grads", "optimizer"])  # train_step brings them back itself
    zero.train_step(mbs, sft_step)
    res["max_param_diff_step4"] = max_diff()
    write_gathered_json(res, out)


if __name__ == "__main__":
    main()
    from gad_megatron.runtime import destroy

    destroy()

"""The weight-sync gather at one layout: every HF tensor rebuilt from TP shards and PP stages, on every rank that
leads a rollout engine (runtime.topology at engine TP ``rollout_tp``: any TP rank, stage or DP replica).
argv: tp pp rollout_tp models.json out.json"""

import json
import sys

import torch.distributed as dist
from gathered import write_gathered_json


def main():
    from gad_megatron.convert.hf_io import SafetensorsReader
    from gad_megatron.models.mapping import mapping_for
    from gad_megatron.convert.api import load_from_hf
    from gad_megatron.models import ModelOptions
    from gad_megatron.rollout.weight_sync import buckets, hf_tensors, iter_full_tensors
    from gad_megatron.runtime import ParallelConfig, initialize
    from gad_megatron.runtime.topology import rollout_topology

    tp, pp, rtp, models, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
    initialize(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, device="cpu"))
    leaders = rollout_topology(dist.get_world_size(), rtp).leaders
    res = {}
    for name, hf in models.items():
        arch, chunks = load_from_hf(hf, "student", ModelOptions())
        mapping = mapping_for(arch.model_type)
        got, n_buckets = {}, 0
        for bucket in buckets(hf_tensors(iter_full_tensors(chunks, dst=leaders), mapping, arch), 40_000):
            n_buckets += 1
            for n, t in bucket:
                assert n not in got, f"{n} delivered twice"
                got[n] = t
        if dist.get_rank() in leaders:
            ref = SafetensorsReader(hf)
            res[name] = {
                "missing": sorted(set(ref.names()) - set(got)),
                "extra": sorted(set(got) - set(ref.names())),
                "max_diff": max((got[n] - ref.get(n)).abs().max().item() for n in got if n in ref.shapes),
                "buckets": n_buckets,
            }
        else:
            res[name] = {"delivered_elsewhere": len(got)}
    write_gathered_json(res, out)


if __name__ == "__main__":
    main()
    # An explicit, collective teardown: a gloo group left to interpreter exit can abort a rank
    # ("terminate called without an active exception") after its work is done.
    from gad_megatron.runtime import destroy

    destroy()

"""Logits of every arch at one TP/PP layout, from HF weights or from converted checkpoints.

argv: tp pp source(hf|ckpt) models.json out_dir. Writes out_dir/<name>.pt (logits) and, comparing with HF
transformers on the last stage, out_dir/result.json {name: max |diff|}.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from gad_megatron.convert import api
from gad_megatron.convert.api import load_from_hf
from gad_megatron.models import ModelOptions
from gad_megatron.models.forward import full_logits
from gad_megatron.runtime import ParallelConfig, initialize


def main():
    tp, pp, source = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    models, out_dir = json.loads(sys.argv[4]), sys.argv[5]
    hf_dirs = json.loads(sys.argv[6]) if len(sys.argv) > 6 and sys.argv[6] != "-" else models
    vpp = int(sys.argv[7]) if len(sys.argv) > 7 else None
    initialize(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, virtual_pipeline_parallel=vpp, device="cpu"))
    results = {}
    for name, path in models.items():
        if source == "hf":
            arch, chunks = load_from_hf(path, "student", ModelOptions())
        else:
            arch, chunks, _ = api.load_from_checkpoint(path)
        tokens = torch.randint(0, arch.vocab_size, (2, 24), generator=torch.Generator().manual_seed(7))
        # One row per micro-batch: the interleaved (VPP) schedule needs several micro-batches.
        logits = full_logits(chunks, [{"tokens": tokens[i : i + 1]} for i in range(2)])
        if logits is not None and dist.get_rank() == dist.get_world_size() - 1:
            logits = [torch.cat(logits)]
            torch.save(logits[0], os.path.join(out_dir, f"{name}.pt"))
            ref = api.reference_model(hf_dirs[name], "student")
            with torch.no_grad():
                results[name] = (logits[0] - ref(tokens).logits).abs().max().item()
    if dist.get_rank() == dist.get_world_size() - 1:
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(results, f)


# dist_checkpointing's writer starts a multiprocessing manager, which re-imports __main__.
if __name__ == "__main__":
    main()
    # An explicit, collective teardown: a gloo group left to interpreter exit can abort a rank
    # ("terminate called without an active exception") after its work is done.
    from gad_megatron.runtime import destroy

    destroy()

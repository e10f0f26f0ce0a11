"""Converts every tiny HF model to a TP2PP2 megatron checkpoint on one parallel state (4 ranks)."""

import json
import os
import sys

from gad_megatron.convert import api
from gad_megatron.convert.megatron_ckpt import save_checkpoint
from gad_megatron.runtime import ParallelConfig, initialize


def main():
    out, hf_models = sys.argv[1], json.loads(sys.argv[2])
    initialize(ParallelConfig(tensor_parallel=2, pipeline_parallel=2, device="cpu"))
    for name, hf in hf_models.items():
        api.hf_to_mcore(hf, os.path.join(out, name))
    api.hf_to_mcore(hf_models["qwen2_untied"], os.path.join(out, "disc"), role="discriminator")
    # The same models saved the way the trainer saves (a materialised model, megatron's own torch_dist writer):
    # what hf_to_mcore's lazy writer must reproduce.
    for name, role in (("qwen3", "student"), ("qwen2_bf16", "student"), ("qwen2_untied", "discriminator")):
        arch, chunks = api.load_from_hf(hf_models[name], role)
        meta = {"role": role, "model_type": arch.model_type, "source": hf_models[name], "dtype": api.hf_dtype(arch.hf_config)}
        save_checkpoint(chunks, os.path.join(out, f"eager_{name}_{role}"), hf_models[name], meta)


# dist_checkpointing's writer starts a multiprocessing manager, which re-imports __main__.
if __name__ == "__main__":
    main()
    # An explicit, collective teardown: a gloo group left to interpreter exit can abort a rank
    # ("terminate called without an active exception") after its work is done.
    from gad_megatron.runtime import destroy

    destroy()

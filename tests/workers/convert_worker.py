"""Converts every tiny HF model to a TP2PP2 megatron checkpoint on one parallel state (4 ranks)."""

import json
import os
import sys

from gad_megatron.convert import api
from gad_megatron.runtime import ParallelConfig, initialize


def main():
    out, hf_models = sys.argv[1], json.loads(sys.argv[2])
    initialize(ParallelConfig(tensor_parallel=2, pipeline_parallel=2, device="cpu"))
    for name, hf in hf_models.items():
        api.hf_to_mcore(hf, os.path.join(out, name))
    api.hf_to_mcore(hf_models["qwen2_untied"], os.path.join(out, "disc"), role="discriminator")


# dist_checkpointing's writer starts a multiprocessing manager, which re-imports __main__.
if __name__ == "__main__":
    main()
    # An explicit, collective teardown: a gloo group left to interpreter exit can abort a rank
    # ("terminate called without an active exception") after its work is done.
    from gad_megatron.runtime import destroy

    destroy()

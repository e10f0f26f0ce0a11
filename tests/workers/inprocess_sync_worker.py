"""Weight sync into an in-process vLLM engine (VLLM_ENABLE_V1_MULTIPROCESSING=0), megatron TP1 in the same
process. argv: hf_A hf_B out.json"""

import json
import os
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

PROMPTS = [[5, 6, 7, 8], [10, 11, 12]]


def main():
    from hf_fixtures import hf_greedy

    from gad_megatron.convert.api import load_from_hf
    from gad_megatron.models import ModelOptions
    from gad_megatron.rollout.base import SamplingConfig
    from gad_megatron.rollout.vllm_engine import VLLMConfig, VLLMEngine
    from gad_megatron.rollout.weight_sync import WeightSync
    from gad_megatron.runtime import ParallelConfig, initialize

    hf_a, hf_b, out = sys.argv[1:4]
    initialize(ParallelConfig(device="cpu"))
    arch, chunks = load_from_hf(hf_a, "student", ModelOptions())
    engine = VLLMEngine(VLLMConfig(model=hf_b, max_model_len=128))
    greedy = SamplingConfig().greedy(max_tokens=10)
    before = [g[0].token_ids for g in engine.generate(PROMPTS, greedy)]
    stats = WeightSync(chunks, engine, arch, bucket_mb=0.25).sync()
    after = [g[0].token_ids for g in engine.generate(PROMPTS, greedy)]
    ref = hf_greedy(hf_a, PROMPTS, 10)
    with open(out, "w") as f:
        json.dump({"transport": engine.transport.name, "before": before, "after": after, "hf": ref,
                   "buckets": stats.buckets, "gap_max": stats.gap_max}, f)
    engine.shutdown()


if __name__ == "__main__":
    main()
    # An explicit, collective teardown: a gloo group left to interpreter exit can abort a rank
    # ("terminate called without an active exception") after its work is done.
    from gad_megatron.runtime import destroy

    destroy()

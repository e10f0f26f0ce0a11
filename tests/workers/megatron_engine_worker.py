"""The megatron rollout engine alone (no vLLM): greedy vs HF, and sampled groups. argv: tp pp hf out.json"""

import json
import sys

import torch.distributed as dist
from hf_fixtures import hf_greedy

PROMPTS = [[5, 6, 7, 8], [10, 11, 12], [3, 90, 17, 44, 2, 61]]


def main():
    from megatron.core import parallel_state as ps

    from gad_megatron.convert.api import load_from_hf
    from gad_megatron.models import ModelOptions
    from gad_megatron.rollout.base import SamplingConfig
    from gad_megatron.rollout.megatron_engine import MegatronEngine
    from gad_megatron.runtime import ParallelConfig, initialize

    tp, pp, hf, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    initialize(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, device="cpu"))
    arch, chunks = load_from_hf(hf, "student", ModelOptions())
    engine = MegatronEngine(chunks)
    greedy = engine.generate(PROMPTS, SamplingConfig().greedy(max_tokens=10))
    sampled = engine.generate(PROMPTS, SamplingConfig(n=8, temperature=0.8, max_tokens=6, seed=3, stop_token_ids=[7]))
    res = {"megatron": [g[0].token_ids for g in greedy], "rank": dist.get_rank(), "pp_rank": ps.get_pipeline_model_parallel_rank()}
    res["sampled"] = [[(s.prompt_index, s.token_ids, s.finish_reason, len(s.logprobs)) for s in g] for g in sampled]
    if dist.get_rank() == 0:
        res["hf"] = hf_greedy(hf, PROMPTS, 10)
        with open(out, "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    main()
    # An explicit, collective teardown: a gloo group left to interpreter exit can abort a rank
    # ("terminate called without an active exception") after its work is done.
    from gad_megatron.runtime import destroy

    destroy()

"""Sampling with the trainer's own megatron GPT the simplest way: every prompt on its own, the whole sequence
re-run through the pipeline schedule for every new token (no KV cache). Exact and slow (~15x the KV-cached
``megatron_engine.MegatronEngine``): the yardstick in tests and ``benchmarks/rollout.py``, and the engine for
virtual-pipeline models, which the KV-cached loop does not drive. Samples equal the KV-cached engine's (the same
``rollout.sampling`` with the same per-sample seeds). Collective: every rank of the
model-parallel group calls ``generate`` with the same prompts; the last pipeline stage samples and
broadcasts each step's tokens along its pipeline group, so every stage sees the same sequences.
"""

from __future__ import annotations

from typing import Sequence

import torch

from gad_megatron.models.forward import full_logits
from gad_megatron.rollout.base import RolloutEngine, Sample, SamplingConfig
from gad_megatron.rollout.sampling import sample_seeds, sample_tokens
from gad_megatron.runtime.parallel import comm_device


class ReforwardEngine(RolloutEngine):
    collective = True  # every rank of the model-parallel group calls generate (and gets the same samples)
    live_weights = True  # the trainer's own parameters: no sync, no copy

    @classmethod
    def build(cls, inputs) -> "ReforwardEngine":
        return cls(inputs.chunks)

    def __init__(self, chunks: list):
        self.chunks = chunks

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> list:
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        for c in self.chunks:
            c.eval()
        last_stage = ps.is_pipeline_last_stage()
        src = ps.get_pipeline_model_parallel_last_rank()
        group = ps.get_pipeline_model_parallel_group()
        stops = set(sampling.stop_token_ids)
        # The pipeline broadcast of each step's tokens: CUDA tensors under NCCL (PP > 1 on GPU), CPU under gloo.

        comm = comm_device()
        out = []
        for pi, prompt in enumerate(prompts):
            n = sampling.n
            tokens = torch.tensor(list(prompt), dtype=torch.long).unsqueeze(0).repeat(n, 1)
            done = torch.zeros(n, dtype=torch.bool)
            finish = ["length"] * n
            seeds = sample_seeds(sampling.seed, torch.full((n,), pi), torch.arange(n))
            gen_tokens, gen_logprobs = [[] for _ in range(n)], [[] for _ in range(n)]
            for t in range(sampling.max_tokens):
                step = torch.zeros(2, n, dtype=torch.float64, device=comm)  # row 0: next tokens, row 1: their logprobs
                logits = full_logits(self.chunks, [{"tokens": tokens}])
                if last_stage:
                    last = logits[0][:, -1, :].float().cpu()
                    nxt, logprobs = sample_tokens(last, sampling, seeds, torch.full((n,), t))
                    step[0] = nxt.to(step.dtype).to(comm)
                    step[1] = logprobs.to(comm)
                if ps.get_pipeline_model_parallel_world_size() > 1:
                    dist.broadcast(step, src=src, group=group)
                step = step.cpu()
                nxt = step[0].long()
                for r in range(n):
                    if done[r]:
                        continue
                    gen_tokens[r].append(int(nxt[r]))
                    gen_logprobs[r].append(float(step[1, r]))
                    if int(nxt[r]) in stops:
                        done[r], finish[r] = True, "stop"
                if bool(done.all()):
                    break
                tokens = torch.cat([tokens, nxt.unsqueeze(1)], dim=1)
            out.append([Sample(pi, gen_tokens[r], gen_logprobs[r], finish[r]) for r in range(n)])
        return out

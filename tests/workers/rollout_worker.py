"""vLLM rollout engine fed by the megatron trainer (TP2). argv: hf_A hf_B work_dir out.json

The engine starts from model B's weights; A is converted to megatron TP2 and synced in. Records greedy
outputs (vLLM, HF, megatron engine), sampled groups with logprobs, the trainer/rollout logprob gap, and the
same after a training step (compared with HF loaded from an export of the updated checkpoint)."""

import json
import os
import sys

import torch
import torch.distributed as dist
from hf_fixtures import hf_greedy

PROMPTS = [[5, 6, 7, 8], [10, 11, 12], [3, 90, 17, 44, 2, 61]]
MAX_NEW = 10


def main():
    from gad_megatron.trainer.steps import sft_step
    from gad_megatron.convert import api
    from gad_megatron.convert.megatron_ckpt import save_checkpoint
    from gad_megatron.rollout.base import SamplingConfig
    from gad_megatron.rollout.megatron_engine import MegatronEngine
    from gad_megatron.rollout.vllm_engine import VLLMConfig, VLLMEngine
    from gad_megatron.rollout.weight_sync import WeightSync
    from gad_megatron.runtime import ParallelConfig, initialize
    from gad_megatron.trainer.engine import OptimConfig, TrainEngine

    hf_a, hf_b, work, out_path = sys.argv[1:5]
    initialize(ParallelConfig(tensor_parallel=2, device="cpu"))
    rank = dist.get_rank()
    api.hf_to_mcore(hf_a, os.path.join(work, "ckpt_a"))
    arch, chunks, _ = api.load_from_checkpoint(os.path.join(work, "ckpt_a"))
    engine = VLLMEngine(VLLMConfig(model=hf_b, max_model_len=128)) if rank == 0 else None
    greedy = SamplingConfig().greedy(max_tokens=MAX_NEW)
    res = {}
    if rank == 0:
        res["vllm_before_sync"] = [g[0].token_ids for g in engine.generate(PROMPTS, greedy)]

    sync = WeightSync(chunks, engine, arch, bucket_mb=0.25)
    gap = sync.logprob_gap(sync.probe)  # engine still on B: the verifier must refuse this
    if rank == 0:
        res["gap_before_sync"] = list(gap)
        try:
            sync._judge(gap, [gap])
            res["judge_before_sync"] = "accepted"
        except RuntimeError as e:
            res["judge_before_sync"] = str(e)
    stats = sync.sync()
    if rank == 0:
        res["sync"] = {"tensors": stats.tensors, "buckets": stats.buckets, "gap_mean": stats.gap_mean, "gap_max": stats.gap_max}
        res["vllm_after_sync"] = [g[0].token_ids for g in engine.generate(PROMPTS, greedy)]
        res["hf_a"] = hf_greedy(hf_a, PROMPTS, MAX_NEW)
    res["megatron_engine"] = [g[0].token_ids for g in MegatronEngine(chunks).generate(PROMPTS, greedy)]

    # n=8 samples per prompt at temperature 0.8; trainer logprobs of exactly those tokens.
    box = [None]
    if rank == 0:
        groups = engine.generate(PROMPTS, SamplingConfig(n=8, temperature=0.8, max_tokens=MAX_NEW, seed=7))
        box = [[[(s.prompt_index, s.token_ids, s.logprobs, s.cumulative_logprob, s.finish_reason) for s in g] for g in groups]]
    dist.broadcast_object_list(box, src=0)
    groups = box[0]
    seqs = [PROMPTS[pi] + toks for g in groups for pi, toks, *_ in g]
    from gad_megatron.models.forward import token_logprobs

    trainer = token_logprobs(chunks, seqs, temperature=0.8)  # vLLM reports processed (sampling) logprobs
    if rank == 0:
        diffs, k = [], 0
        for g in groups:
            for pi, toks, lps, cum, _ in g:
                ours = trainer[k][len(PROMPTS[pi]) - 1:]
                diffs.append((ours - torch.tensor(lps, dtype=torch.float64)).abs())
                k += 1
        d = torch.cat(diffs)
        res["sample_groups"] = [[(pi, len(toks), sum(lps), cum) for pi, toks, lps, cum, _ in g] for g in groups]
        res["distinct_samples"] = [len({tuple(toks) for _, toks, *_ in g}) for g in groups]
        res["sample_logprob_gap"] = [d.mean().item(), d.max().item()]

    # Chat: the template is applied once (gad_megatron.data.chat) and both engines get the same token ids.
    from transformers import AutoTokenizer

    from gad_megatron.data.chat import prompt_ids

    tok = AutoTokenizer.from_pretrained(hf_a)
    convs = [[{"role": "user", "content": "hello how are you"}], [{"role": "system", "content": "be short"},
             {"role": "user", "content": "write a poem about the sea"}]]
    ids = [prompt_ids(tok, c) for c in convs]
    chat = SamplingConfig().greedy(max_tokens=MAX_NEW)
    chat.stop_token_ids = [tok.eos_token_id]
    meg = MegatronEngine(chunks).generate(ids, chat)
    if rank == 0:
        vl = engine.generate(ids, chat)
        res["chat"] = {
            "prompt_text": [tok.decode(i) for i in ids],
            "vllm": [g[0].token_ids for g in vl],
            "megatron": [g[0].token_ids for g in meg],
            "vllm_text": [g[0].text for g in vl],
            "decoded": [tok.decode(g[0].token_ids, skip_special_tokens=True) for g in vl],
            "finish": [g[0].finish_reason for g in vl],
        }

    # A training step changes the weights; after a sync vLLM must follow.
    train = TrainEngine(chunks, OptimConfig(lr=3e-2, clip_grad=1.0))
    tokens = torch.randint(1, arch.vocab_size, (4, 16), generator=torch.Generator().manual_seed(5))
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(4, 16)}
    for _ in range(3):
        train.train_step([batch], sft_step)
    stats = sync.sync()
    save_checkpoint(train.modules, os.path.join(work, "ckpt_trained"), hf_a, {"role": "student", "model_type": arch.model_type, "dtype": "fp32"})
    if rank == 0:
        res["sync_after_train"] = {"gap_mean": stats.gap_mean, "gap_max": stats.gap_max}
        res["vllm_after_train"] = [g[0].token_ids for g in engine.generate(PROMPTS, greedy)]
        api.mcore_to_hf(os.path.join(work, "ckpt_trained"), os.path.join(work, "hf_trained"))
        res["hf_trained"] = hf_greedy(os.path.join(work, "hf_trained"), PROMPTS, MAX_NEW)
        engine.shutdown()
        with open(out_path, "w") as f:
            json.dump(res, f)
    dist.barrier()


if __name__ == "__main__":
    main()
    # An explicit, collective teardown: a gloo group left to interpreter exit can abort a rank
    # ("terminate called without an active exception") after its work is done.
    from gad_megatron.runtime import destroy

    destroy()

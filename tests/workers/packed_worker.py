"""Packed (THD) vs padded micro-batches through the same models: G's per-token logprobs and D's sequence
scores at one TP / PP layout (#30 item 5).

argv: tp pp sequence_parallel(0|1) models.json ({name: HF dir}) out.json. Writes, on the last stage's TP rank 0,
per model: the largest |packed - padded| (relative above 1) of G's logprobs and of D's scores, each layout's micro-batch count,
largest micro-batch (tokens, padding included) and padding tokens.
"""

import json
import sys

import torch
import torch.distributed as dist

from gad_megatron.convert.api import load_from_hf
from gad_megatron.models import ModelOptions
from gad_megatron.runtime import ParallelConfig, destroy, initialize
from gad_megatron.trainer import passes
from gad_megatron.trainer.batching import MicroBatching, Seq, fill_per_token, mb_tokens, pack_units, pad_share
from gad_megatron.trainer.steps import logprob_step, score_step

BUDGET = 48


def sequences(vocab: int) -> list:
    g = torch.Generator().manual_seed(11)
    out = []
    for _ in range(9):
        p, r = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((3, 12), (1, 14)))
        out.append(Seq(torch.randint(3, vocab, (p,), generator=g).tolist(), torch.randint(3, vocab, (r,), generator=g).tolist()))
    return out


def main():
    tp, pp, sp = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
    models, out_path = json.loads(sys.argv[4]), sys.argv[5]
    initialize(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, sequence_parallel=sp, device="cpu"))
    results = {name: compare(path, tp, sp) for name, path in models.items()}
    if dist.get_rank() == dist.get_world_size() - 1:
        with open(out_path, "w") as f:
            json.dump(results, f)


def compare(student: str, tp: int, sp: bool) -> dict:
    opts = ModelOptions(sequence_parallel=sp)
    arch, g = load_from_hf(student, "student", opts)
    torch.manual_seed(5)  # D's fresh head: the same on every rank and in both layouts (one model)
    _, d = load_from_hf(student, "discriminator", opts)
    seqs = sequences(arch.vocab_size)
    units = [[s] for s in seqs]
    result = {}
    lp, scores = {}, {}
    for packed in (False, True):
        layout = MicroBatching(BUDGET, tp if sp else 1, packed)
        out, mbs = passes.forward(g, units, logprob_step(1.0), layout)
        fill_per_token(mbs, out and [{"lp": o["logp"]} for o in out], "lp")
        lp[packed] = torch.cat([s.per_token.pop("lp") for s in seqs])
        out, _ = passes.forward(d, units, score_step, layout)
        scores[packed] = torch.cat([o["scores"] for o in out]) if out is not None else None
        groups = pack_units(units, BUDGET, layout.pad_multiple, packed)
        collated, _ = layout.microbatches(units)
        name = "packed" if packed else "padded"
        result[name] = {"micro_batches": len(groups),
                        "largest": max(mb_tokens(mb, layout.pad_multiple, packed) for mb in groups),
                        "largest_tensor": max(mb["tokens"].numel() for mb in collated),
                        "padding": pad_share(collated)[0]}
    if scores[False] is not None:  # the last stage
        # relative to the value where it is above 1: fp32 holds ~7 digits (a logprob near -4.6 moves in steps of
        # 4.8e-7, so two differently summed reductions may differ by a few of those steps)
        result["logp_max_diff"] = ((lp[True] - lp[False]).abs() / lp[False].abs().clamp(min=1)).max().item()
        result["score_max_diff"] = ((scores[True] - scores[False]).abs() / scores[False].abs().clamp(min=1)).max().item()
        result["score_spread"] = scores[False].std().item()  # the scores differ from one another: a real check
    return result


if __name__ == "__main__":
    main()
    destroy()

"""One forward + backward of G (SFT loss) and of D (BT loss) on a fixed batch with megatron-core's activation
recomputation set to argv[2] (none | selective | full); writes every gradient and the process's peak resident
memory. One process per setting, so each peak is its own. argv: hf_dir recompute out.pt"""

import resource
import sys

import torch


def batches(vocab: int, rows: int, seq: int) -> tuple:
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, vocab, (rows, seq), generator=g)
    lm = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(rows, seq)}
    lm["loss_mask"][:, -1] = 0
    pair = {"tokens": tokens, "attention_mask": torch.ones(rows, seq, dtype=torch.long)}  # 2 groups of [t, s1, s2]
    return lm, pair


def main():
    hf_dir, mode, out = sys.argv[1], sys.argv[2], sys.argv[3]
    from gad_megatron.convert import api
    from gad_megatron.models import ModelOptions
    from gad_megatron.models.forward import run_schedule
    from gad_megatron.runtime import ParallelConfig, destroy, initialize
    from gad_megatron.trainer.steps import bt_step, sft_step

    initialize(ParallelConfig(device="cpu"))
    opts = ModelOptions(transformer_impl="local", recompute_granularity=None if mode == "none" else mode)
    grads = {}
    for role, step in (("student", sft_step), ("discriminator", bt_step(2))):
        arch, chunks = api.load_from_hf(hf_dir, role, opts)
        lm, pair = batches(arch.vocab_size, 6, 512)
        for c in chunks:
            c.train()
        run_schedule(chunks, [lm if role == "student" else pair], step, forward_only=False)
        for name, p in chunks[0].named_parameters():
            grads[f"{role}.{name}"] = p.main_grad.clone() if getattr(p, "main_grad", None) is not None else p.grad.clone()
        del chunks
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save({"grads": grads, "peak_mib": peak_kib / 1024}, out)
    destroy()


if __name__ == "__main__":
    main()

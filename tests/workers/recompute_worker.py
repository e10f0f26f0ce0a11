"""One forward + backward of G (SFT loss) and of D (BT loss) on a fixed batch with megatron-core's activation
recomputation set to argv[2] (none | selective | full); writes every gradient and the peak resident memory the
forward + backward added. One process per setting. argv: hf_dir recompute out.pt

Why the peak is taken this way: the process's lifetime peak (ru_maxrss) is set by loading and converting the
model, not by the step, and glibc keeps freed blocks for reuse, so activations can fill memory the loader freed
without RSS moving. So large blocks are mmapped (MALLOC_MMAP_THRESHOLD_, set by the caller) and returned to the
OS when freed, free heap is trimmed, and the kernel's high-water mark (VmHWM) is reset right before the step."""

import ctypes
import gc
import sys

import torch


def batches(vocab: int, rows: int, seq: int) -> tuple:
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, vocab, (rows, seq), generator=g)
    lm = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(rows, seq)}
    lm["loss_mask"][:, -1] = 0
    pair = {"tokens": tokens, "attention_mask": torch.ones(rows, seq, dtype=torch.long)}  # 2 groups of [t, s1, s2]
    return lm, pair


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> int:
    """Frees what can be freed, resets VmHWM to the current RSS (Linux: clear_refs 5) and returns that RSS."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS")


def main():
    hf_dir, mode, out = sys.argv[1], sys.argv[2], sys.argv[3]
    from gad_megatron.convert import api
    from gad_megatron.models import ModelOptions
    from gad_megatron.models.forward import run_schedule
    from gad_megatron.runtime import ParallelConfig, destroy, initialize
    from gad_megatron.trainer.steps import bt_step, sft_step

    initialize(ParallelConfig(device="cpu"))
    opts = ModelOptions(transformer_impl="local", recompute_granularity=None if mode == "none" else mode)
    grads, added_kib = {}, {}
    for role, step in (("student", sft_step), ("discriminator", bt_step(2))):
        arch, chunks = api.load_from_hf(hf_dir, role, opts)
        lm, pair = batches(arch.vocab_size, 6, 512)
        for c in chunks:
            c.train()
        base = reset_peak()
        run_schedule(chunks, [lm if role == "student" else pair], step, forward_only=False)
        added_kib[role] = _status_kib("VmHWM") - base
        for name, p in chunks[0].named_parameters():
            grads[f"{role}.{name}"] = p.main_grad.clone() if getattr(p, "main_grad", None) is not None else p.grad.clone()
        del chunks
    torch.save({"grads": grads, "peak_mib": {r: k / 1024 for r, k in added_kib.items()}}, out)
    destroy()


if __name__ == "__main__":
    main()

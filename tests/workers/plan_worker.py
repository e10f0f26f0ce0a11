"""What a layout really allocates, for gad-plan's formulas (#8). argv: tp pp dist_opt dtype sp hf_dir out.json

Per rank: parameters of G (student) and D (discriminator) as built, their DDP gradient-buffer bytes, the
optimizer-state bytes after one Adam step (moments + fp32 master copies), and (PP 1) the bytes autograd saves
for the backward in one forward of G with its loss (activations + logits), counted once per storage."""

import sys

import torch
import torch.distributed as dist
from gathered import write_gathered_json


def state_bytes(optimizer) -> int:
    """Adam moments and fp32 master params held by megatron's (chained / distributed) optimizer on this rank."""
    total, seen = 0, set()
    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    for o in opts:
        inner = o.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state.get(p, {})
                for k in ("exp_avg", "exp_avg_sq"):
                    if k in st:
                        total += st[k].numel() * st[k].element_size()
                if p.dtype == torch.float32 and getattr(o, "config", None) is not None and (o.config.bf16 or o.config.fp16):
                    if id(p) not in seen:  # an fp32 master copy of a bf16 / fp16 parameter
                        seen.add(id(p))
                        total += p.numel() * 4
    return total


def main():
    from megatron.core import parallel_state as ps

    from gad_megatron.trainer.steps import sft_step
    from gad_megatron.convert import api
    from gad_megatron.models import ModelOptions
    from gad_megatron.runtime import ParallelConfig, initialize
    from gad_megatron.trainer.engine import OptimConfig, TrainEngine

    tp, pp, dist_opt, dtype, sp, hf, out_path = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4],
                                                 sys.argv[5] == "1", sys.argv[6], sys.argv[7])
    initialize(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, sequence_parallel=sp, device="cpu"))
    arch, _ = api.check_hf_input(hf)
    opts = ModelOptions(dtype=dtype, transformer_impl="local", sequence_parallel=sp)
    res = {"rank": dist.get_rank(), "stage": ps.get_pipeline_model_parallel_rank(), "dp": ps.get_data_parallel_world_size(),
           "dp_rank": ps.get_data_parallel_rank()}
    g_chunks = api.build_role_chunks(arch, "student", opts)
    d_chunks = api.build_role_chunks(arch, "discriminator", opts)
    res["g_params"] = sum(p.numel() for c in g_chunks for p in c.parameters())
    res["d_params"] = sum(p.numel() for c in d_chunks for p in c.parameters())
    for role, chunks in (("g", g_chunks), ("d", d_chunks)):  # megatron's order, which its grad buffer follows
        res[f"{role}_param_list"] = [[n, p.numel(), bool(getattr(p, "shared_embedding", False))]
                                     for c in chunks for n, p in c.named_parameters()]

    # Activations: what autograd keeps for the backward of one forward (PP 1), counted once per storage.
    if pp == 1:
        saved = {}

        def pack(t):
            if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
                try:
                    key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
                    saved[key] = t.untyped_storage().nbytes()
                except (RuntimeError, NotImplementedError):
                    pass
            return t

        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, arch.vocab_size, (2, 64), generator=g)
        batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(2, 64)}
        model = g_chunks[0]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            pos = torch.arange(64).unsqueeze(0).expand(2, -1)
            out = model(tokens, pos, None, labels=batch["labels"])
            loss = out.float().sum()
        res["saved_bytes"] = sum(saved.values())
        res["tokens"] = tokens.numel()
        loss.backward()
        model.zero_grad(set_to_none=True)

    engines = {}
    for role, chunks in (("g", g_chunks), ("d", d_chunks)):
        e = TrainEngine(chunks, OptimConfig(lr=1e-3, use_distributed_optimizer=dist_opt))
        engines[role] = e
        res[f"{role}_grad_bytes"] = sum(b.grad_data.numel() * b.grad_data.element_size()
                                        for c in e.chunks for b in c.buffers)
        res[f"{role}_grad_unpadded_bytes"] = sum(p.main_grad.numel() * p.main_grad.element_size()
                                                 for c in e.chunks for p in c.module.parameters())
    tokens = torch.randint(0, arch.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    e = engines["g"]
    e.train_step([{"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(2, 16)}], sft_step)
    res["g_optimizer_bytes"] = state_bytes(e.optimizer)
    if dist_opt:
        # The overlapped (GPU) configuration splits the buffer into buckets; built here with small buckets so the
        # tiny model has several, to compare megatron's layout with the planner's.
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=True,
                                            use_distributed_optimizer=True, bucket_size=4096)
        ddp = DistributedDataParallel(config=g_chunks[0].config, ddp_config=cfg, module=g_chunks[0])
        (buf,) = ddp.buffers
        res["bucketed"] = {"bucket_size": ddp.bucket_size, "numel": buf.numel, "buckets": buf.bucket_indices,
                           "index": [list(buf.param_index_map[p][:2]) for p in g_chunks[0].parameters()]}
    write_gathered_json(res, out_path)


if __name__ == "__main__":
    main()
    from gad_megatron.runtime import destroy

    destroy()

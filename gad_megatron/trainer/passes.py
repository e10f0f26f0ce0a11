"""The passes G, D and a teacher are made of: forward (no grad) and update (one optimizer step of a
TrainEngine) over sequences packed into micro-batches by the token budget, and the decisions every rank must
take together. Every function is collective over the world."""

from __future__ import annotations

import torch

from gad_megatron.models.forward import run_schedule
from gad_megatron.runtime.parallel import comm_device
from gad_megatron.trainer.batching import MicroBatching, pad_share


def forward(model, units: list, step_fn, layout: MicroBatching) -> tuple:
    """Forward only over packed units of ``model`` (a TrainEngine or frozen chunks); returns (outputs on the
    last stage or None elsewhere, the Seq lists per micro-batch)."""
    from megatron.core import parallel_state as ps

    mbs, seqs = layout.microbatches(units)
    if hasattr(model, "ensure_resident"):
        model.ensure_resident()
    chunks = model.chunks if hasattr(model, "chunks") else model
    for c in chunks:
        c.eval()
    with torch.no_grad():
        out = run_schedule(chunks, mbs, step_fn, forward_only=True)
    return (out if ps.is_pipeline_last_stage() else None), seqs


def update(engine, units: list, step_fn, layout: MicroBatching) -> dict:
    """One optimizer step of ``engine`` over packed units; its result plus ``seqs`` (the Seq lists per
    micro-batch) and ``pad_pair`` ([padding tokens, all tokens] of its micro-batches, a metrics pair: every rank
    of a DP replica holds the same, so the reduced ratio is the global share)."""
    mbs, seqs = layout.microbatches(units)
    pad_pair = torch.tensor(pad_share(mbs), dtype=torch.float64)
    return {**engine.train_step(mbs, step_fn), "seqs": seqs, "pad_pair": pad_pair}


def last_stage_writer() -> bool:
    """One rank per DP replica that holds last-stage outputs (TP rank 0 of the last pipeline stage)."""
    from megatron.core import parallel_state as ps

    return ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0


def from_rank0(fn):
    """``fn()`` computed on global rank 0 alone (an engine or a remote scorer asked once), the same on every
    rank."""
    import torch.distributed as dist

    return broadcast_from0(fn() if dist.get_rank() == 0 else None)


def broadcast_from0(obj):
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(*flags: bool):
    """Each flag true on every rank when it is true on any (save / exit decisions every rank must take
    together), in one all-reduce; one flag in, one bool out."""
    import torch.distributed as dist

    x = torch.tensor([1.0 if f else 0.0 for f in flags], device=comm_device())
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    out = [bool(v) for v in x.tolist()]
    return out[0] if len(out) == 1 else out

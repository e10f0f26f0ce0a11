"""Trainer -> rollout engine weight sync.

Gathers the student's TP shards (all-gather in each TP group) and PP stages (point-to-point to the engine's
rank), maps megatron tensors to HF names and layouts through the architecture's declarative mapping (the
same one ``gad-convert`` uses), groups them into size-bounded buckets and hands them to the engine.
Only the engine-owning rank receives; every rank must call :func:`sync_weights`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from gad_megatron.convert.mapping import ArchMapping, to_hf
from gad_megatron.convert.model_io import local_shards


@dataclass
class SyncStats:
    tensors: int = 0
    bytes: int = 0
    buckets: int = 0
    seconds: float = 0.0


def _sync_device() -> None:
    # Every gather must have finished before a bucket is read: a missed sync gives stale weights, and only
    # on some machines. (No-op on CPU.)
    if torch.cuda.is_available():
        torch.cuda.current_stream().synchronize()


def _assemble_stage(chunks) -> dict:
    """{(key, layer): full tensor} for this pipeline stage, identical on every TP rank of the stage."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    group = ps.get_tensor_model_parallel_group()
    full = {}
    for sh in local_shards(chunks):
        k = (sh.key, sh.layer)
        if k not in full:
            full[k] = torch.empty(sh.full_shape, dtype=sh.data.dtype, device=sh.data.device)
        if tuple(sh.data.shape) == sh.full_shape or tp == 1:
            full[k][sh.slices] = sh.data
            continue
        # The same shard list on every TP rank of a stage (same modules), so the collectives line up.
        pieces = [torch.empty_like(sh.data) for _ in range(tp)]
        dist.all_gather(pieces, sh.data.contiguous(), group=group)
        starts = torch.tensor([s.start for s in sh.slices], dtype=torch.long, device=sh.data.device)
        all_starts = [torch.empty_like(starts) for _ in range(tp)]
        dist.all_gather(all_starts, starts, group=group)
        for piece, st in zip(pieces, all_starts):
            idx = tuple(slice(int(o), int(o) + n) for o, n in zip(st, piece.shape))
            full[k][idx] = piece
    return full


def gather_full_tensors(chunks, dst: int = 0) -> Optional[dict]:
    """Collective. {(key, layer): full tensor} of the whole model on global rank ``dst``; None elsewhere.
    ``dst`` must be a first-stage rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    stage = _assemble_stage(chunks)
    rank = dist.get_rank()
    pp = ps.get_pipeline_model_parallel_world_size()
    if pp == 1:
        return stage if rank == dst else None
    pp_ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
    if dst not in pp_ranks:
        # Only the pipeline group that contains dst takes part; other TP / DP replicas hold copies.
        return None
    result = dict(stage) if rank == dst else None
    for src in pp_ranks:
        if src == dst:
            continue
        if rank == src:
            meta = [(k, tuple(t.shape), t.dtype) for k, t in stage.items()]
            dist.send_object_list([meta], dst=dst)
            for t in stage.values():
                dist.send(t.contiguous(), dst=dst)
        elif rank == dst:
            box = [None]
            dist.recv_object_list(box, src=src)
            for k, shape, dtype in box[0]:
                t = torch.empty(shape, dtype=dtype)
                dist.recv(t, src=src)
                # Tied embeddings appear on the first and the last stage: keep the first copy.
                result.setdefault(k, t)
    return result


def hf_tensors(full: dict, mapping: ArchMapping, arch, role: str = "student") -> Iterator:
    """(hf name, tensor) for every gathered megatron tensor, in a stable order (non-layer, then by layer)."""
    tied = arch.tie_word_embeddings and role == "student"
    order = sorted(full, key=lambda kl: (kl[1] is not None, kl[1] or 0, kl[0]))
    for key, layer in order:
        rule = mapping.rule_for(key, tied, role)
        for name, t in zip(rule.hf_names(layer), to_hf(rule, full[(key, layer)], arch)):
            yield name, t


def buckets(named: Iterator, bucket_bytes: int) -> Iterator[list]:
    """Groups (name, tensor) pairs into lists of at most ``bucket_bytes`` (a larger tensor goes alone)."""
    bucket, size = [], 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


def sync_weights(chunks, engine, mapping: ArchMapping, arch, bucket_mb: int = 512, dst: int = 0) -> Optional[SyncStats]:
    """Collective: pushes the live student weights into ``engine`` (which lives on global rank ``dst``)."""
    import torch.distributed as dist

    t0 = time.perf_counter()
    full = gather_full_tensors(chunks, dst=dst)
    if dist.get_rank() != dst:
        return None
    _sync_device()
    stats = SyncStats()

    def counted():
        for bucket in buckets(hf_tensors(full, mapping, arch), bucket_mb * 1024 * 1024):
            stats.buckets += 1
            for name, t in bucket:
                stats.tensors += 1
                stats.bytes += t.numel() * t.element_size()
            yield bucket

    engine.update_weights(counted())
    stats.seconds = time.perf_counter() - t0
    return stats

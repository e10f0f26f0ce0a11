"""Trainer -> rollout engine weight sync.

Gathers the student's TP shards (all-gather in each TP group) and PP stages (point-to-point to each engine's
owning rank), maps megatron tensors to HF names and layouts through the architecture's declarative mapping (the
same one ``gad-convert`` uses), groups them into size-bounded buckets and hands them to the engine.
Only the engine-owning ranks (one per rollout engine) receive; every rank must call :meth:`WeightSync.sync`. Tensors stream one at a
time from the gathers into the buckets, so a rank holds at most one gathered tensor beyond the bucket.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from gad_megatron.convert.model_io import local_shards
from gad_megatron.models.forward import token_logprobs
from gad_megatron.models.mapping import ArchMapping, mapping_for, to_hf
from gad_megatron.runtime import on_cuda


@dataclass
class SyncStats:
    tensors: int = 0
    bytes: int = 0
    buckets: int = 0
    seconds: float = 0.0
    gap_mean: Optional[float] = None  # over every engine
    gap_max: Optional[float] = None
    engine_gaps: list = None  # per engine: (mean, max)


def _sync_device() -> None:
    # Every gather must have finished before a bucket is read: a missed sync gives stale weights, and only
    # on some machines. (No-op on CPU.)

    if on_cuda():
        torch.cuda.current_stream().synchronize()


def _stage_tensors(chunks) -> Iterator:
    """Collective over the TP group: yields (key, layer, full tensor) for this pipeline stage, one at a time.

    Every rank streams its own DP replica's model (any rank may lead an engine): only the tied output layer on
    the last stage is skipped (the first stage owns its weights). The decision is the same on every TP rank
    wherever a collective is involved (split tensors), so the all-gathers line up. Shards of one tensor (the two SwiGLU halves) are consecutive.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    group = ps.get_tensor_model_parallel_group()
    current, full = None, None
    for sh in local_shards(chunks):
        if not sh.is_model_copy:  # every rank streams its own replica's model: any rank may lead an engine
            continue
        k = (sh.key, sh.layer)
        if k != current:
            if current is not None:
                yield (*current, full)
            current = k
            if tuple(sh.data.shape) == sh.full_shape:
                full = sh.data.detach()  # the whole tensor is local: no copy
                continue
            full = torch.empty(sh.full_shape, dtype=sh.data.dtype, device=sh.data.device)
        if tuple(sh.data.shape) == sh.full_shape or tp == 1:
            full[sh.slices] = sh.data
            continue
        pieces = [torch.empty_like(sh.data) for _ in range(tp)]
        dist.all_gather(pieces, sh.data.contiguous(), group=group)
        starts = torch.tensor([s.start for s in sh.slices], dtype=torch.long, device=sh.data.device)
        all_starts = [torch.empty_like(starts) for _ in range(tp)]
        dist.all_gather(all_starts, starts, group=group)
        for piece, st in zip(pieces, all_starts):
            idx = tuple(slice(int(o), int(o) + n) for o, n in zip(st, piece.shape))
            full[idx] = piece
    if current is not None:
        yield (*current, full)


def _dst_set(dst) -> set:
    return {dst} if isinstance(dst, int) else set(dst)


def iter_full_tensors(chunks, dst=0) -> Iterator:
    """Collective generator: every rank must exhaust it. ``dst``: a global rank or several (one per rollout
    engine, any stage, any TP rank). On each of them it yields (key, layer, full tensor) for the whole model,
    one tensor at a time (its own stage's first, gathered over its TP group, then each other stage's tensors as
    they arrive point-to-point from the rank of that stage in its own pipeline group); elsewhere it yields
    nothing. Pipeline groups holding no destination only take part in their TP all-gathers."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    rank = dist.get_rank()
    dsts = _dst_set(dst)
    pp = ps.get_pipeline_model_parallel_world_size()
    pp_ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group()) if pp > 1 else [rank]
    my_stage = ps.get_pipeline_model_parallel_rank()
    targets = [r for r in pp_ranks if r in dsts and r != rank] if pp > 1 else []  # fed by this rank's stage
    device = next(p.device for c in chunks for p in c.parameters())
    for stage in range(pp):
        if stage == my_stage:
            for key, layer, full in _stage_tensors(chunks):
                if rank in dsts:
                    yield key, layer, full
                for t in targets:
                    dist.send_object_list([(key, layer, tuple(full.shape), full.dtype)], dst=t)
                    dist.send(full.contiguous(), dst=t)
            for t in targets:
                dist.send_object_list([None], dst=t)  # end of this stage
        elif rank in dsts:
            src = pp_ranks[stage]
            while True:
                box = [None]
                dist.recv_object_list(box, src=src)
                if box[0] is None:
                    break
                key, layer, shape, dtype = box[0]
                t = torch.empty(shape, dtype=dtype, device=device)
                dist.recv(t, src=src)
                yield key, layer, t


def gather_full_tensors(chunks, dst: int = 0) -> Optional[dict]:
    """Collective. {(key, layer): full tensor} of the whole model on ``dst`` (None elsewhere): the whole
    model at once, for checks and tools; weight sync streams through :func:`iter_full_tensors` instead."""
    import torch.distributed as dist

    out = {(k, l): t for k, l, t in iter_full_tensors(chunks, dst)}
    return out if dist.get_rank() in _dst_set(dst) else None


def hf_tensors(full, mapping: ArchMapping, arch, role: str = "student") -> Iterator:
    """(hf name, tensor) for every gathered megatron tensor: ``full`` is a {(key, layer): tensor} dict or an
    iterator of (key, layer, tensor)."""
    tied = arch.tie_word_embeddings and role == "student"
    items = ((k, l, t) for (k, l), t in full.items()) if isinstance(full, dict) else full
    for key, layer, tensor in items:
        rule = mapping.rule_for(key, tied, role)
        yield from zip(rule.hf_names(layer), to_hf(rule, tensor, arch))


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


class WeightSync:
    """Pushes the live student weights into every rollout engine after every policy update, then (on by
    default) checks them: a fixed probe batch is scored by each engine and by the trainer, and the logprob gap
    is logged, warned about above ``warn_gap`` and fatal above ``stop_gap`` (on every rank, when any engine
    is off).

    Collective: construct and call :meth:`sync` on every rank. ``dst``: the ranks that own an engine (one rank,
    or the rollout topology's leaders); ``engine`` is this rank's engine there (None elsewhere).
    """

    def __init__(self, chunks, engine, arch, mapping: Optional[ArchMapping] = None, bucket_mb: float = 512,
                 dst=0, verify: bool = True, probe: Optional[list] = None, warn_gap: float = 1e-3,
                 stop_gap: float = 5e-2):
        self.chunks, self.engine, self.arch = chunks, engine, arch
        self.mapping = mapping or mapping_for(arch.model_type)
        self.bucket_mb = bucket_mb
        self.dsts = sorted(_dst_set(dst))
        self.verify = verify
        g = torch.Generator().manual_seed(1234)
        self.probe = probe or [torch.randint(1, arch.vocab_size, (24,), generator=g).tolist() for _ in range(4)]
        self.warn_gap, self.stop_gap = warn_gap, stop_gap
        self.verified = 0  # verifications done (the first is logged at INFO)

    @property
    def owns_engine(self) -> bool:
        import torch.distributed as dist

        return dist.get_rank() in self.dsts

    def sync(self) -> Optional[SyncStats]:
        """Stats on every engine-owning rank (the gap over every engine), None elsewhere."""
        t0 = time.perf_counter()
        stats = SyncStats()
        stream = iter_full_tensors(self.chunks, dst=self.dsts)
        if self.owns_engine:
            def counted():
                for bucket in buckets(hf_tensors(stream, self.mapping, self.arch), int(self.bucket_mb * 1024 * 1024)):
                    _sync_device()  # every gather of the bucket has finished before the engine reads it
                    stats.buckets += 1
                    stats.tensors += len(bucket)
                    stats.bytes += sum(t.numel() * t.element_size() for _, t in bucket)
                    yield bucket

            self.engine.update_weights(counted())
        for _ in stream:  # the other ranks drive their side of the collectives (yields nothing there)
            pass
        stats.seconds = time.perf_counter() - t0
        if self.verify:
            gaps = self.engine_gaps(self.probe)
            stats.engine_gaps = gaps
            stats.gap_mean = sum(m for m, _ in gaps) / len(gaps)
            stats.gap_max = max(x for _, x in gaps)
            self._judge((stats.gap_mean, stats.gap_max), gaps)
        return stats if self.owns_engine else None

    def engine_gaps(self, sequences: list) -> list:
        """Collective: per engine (in ``dst`` order), (mean, max) |engine logprob - trainer logprob| over
        ``sequences``; the same list on every rank."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        ours = token_logprobs(self.chunks, sequences)
        # The trainer's logprobs are the same in every DP replica: the last stage of rank 0's pipeline sends.
        src_box = [ps.get_pipeline_model_parallel_last_rank() if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(src_box, src=0)
        box = [ours]
        dist.broadcast_object_list(box, src=src_box[0])
        mine = None
        if self.owns_engine:
            theirs = self.engine.score(sequences)
            diffs = torch.cat([(a - b).abs() for a, b in zip(box[0], theirs)])
            mine = (diffs.mean().item(), diffs.max().item())
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        return [every[r] for r in self.dsts]

    def logprob_gap(self, sequences: list) -> Optional[tuple]:
        """Collective: (mean, max) gap of this rank's engine (None on ranks without one)."""
        import torch.distributed as dist

        gaps = self.engine_gaps(sequences)
        rank = dist.get_rank()
        return gaps[self.dsts.index(rank)] if rank in self.dsts else None

    def _judge(self, gap: tuple, per_engine: list) -> None:
        import logging

        import torch.distributed as dist

        log = logging.getLogger("gad_megatron.weight_sync")
        mean, mx = gap
        if dist.get_rank() == self.dsts[0]:  # the first verification said once; later ones are in metrics.jsonl
            log.log(logging.DEBUG if self.verified else logging.INFO,
                    "weight sync: trainer vs rollout logprob gap mean %.3e max %.3e (%d engine(s))", mean, mx,
                    len(per_engine))
        self.verified += 1
        if mx > self.stop_gap:
            bad = [f"engine {e} (rank {r}): max {g[1]:.3e}" for e, (r, g) in enumerate(zip(self.dsts, per_engine))
                   if g[1] > self.stop_gap]
            raise RuntimeError(
                f"weight sync verification failed: trainer vs rollout logprob gap max {mx:.3e} > stop_gap "
                f"{self.stop_gap:.1e} (mean {mean:.3e}; {', '.join(bad)}); the engine is not running the "
                f"trainer's weights"
            )
        if mx > self.warn_gap:
            log.warning("weight sync: logprob gap max %.3e above warn_gap %.1e", mx, self.warn_gap)

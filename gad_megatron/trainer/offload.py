"""Training state out of a colocated rollout engine's way: a TrainEngine's gradient buffers, optimizer state
(Adam moments, fp32 master copies) and, as a choice, its parameters go to (pinned) host memory before the engine
wakes, their device storages are freed (resized to 0 bytes: every view of them, megatron's ``main_grad`` views
into the DDP buffer included, stays valid), and they come back bitwise before the next update.

What moves is ``rollout.offload`` (``grads``, ``optimizer``, ``params``). Parameters leave only after the
weight sync has read them, and come back with the rest.
"""

from __future__ import annotations

from typing import Iterable

import torch

KINDS = ("grads", "optimizer", "params")


def _param_storages(chunks) -> list:
    return [p.untyped_storage() for c in chunks for p in c.parameters()]


def storages(engine, kind: str) -> list:
    """The device storages of one kind of a TrainEngine's state (deduplicated; parameters' storages never count
    as optimizer state, even where the optimizer steps the model's own fp32 parameters)."""
    chunks = engine.chunks
    if kind == "grads":
        found = [buf.grad_data.untyped_storage() for c in chunks for buf in list(c.buffers) + list(c.expert_parallel_buffers)]
    elif kind == "params":
        found = [buf.param_data.untyped_storage() for c in chunks for buf in list(c.buffers) + list(c.expert_parallel_buffers)
                 if getattr(buf, "param_data", None) is not None] + _param_storages(chunks)
    elif kind == "optimizer":
        found = []
        for opt in (getattr(o, "optimizer", o) for o in engine.megatron_optimizers()):  # the torch optimizers
            for state in opt.state.values():
                found += [v.untyped_storage() for v in state.values() if torch.is_tensor(v)]
            found += [p.untyped_storage() for g in opt.param_groups for p in g["params"]]  # master copies
        model = {s.data_ptr() for s in _param_storages(chunks)}
        found = [s for s in found if s.data_ptr() not in model]
    else:
        raise ValueError(f"offload kind {kind!r}: use {', '.join(KINDS)}")
    seen, out = set(), []
    for s in found:
        if s.nbytes() and s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            out.append(s)
    return out


def _whole(storage) -> torch.Tensor:
    """A uint8 tensor over all of ``storage``'s bytes."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, 0, (storage.nbytes(),))


class StateOffload:
    """Host copies of one TrainEngine's chosen state while its device storages are freed."""

    def __init__(self, engine):
        self.engine = engine
        self.away = {}  # kind -> [(storage, host copy)]

    def to_host(self, kinds: Iterable[str]) -> int:
        """Moves each kind not already away; returns the bytes freed on the device."""
        freed = 0
        pin = any(p.is_cuda for c in self.engine.chunks for p in c.parameters())  # GPU state: pinned host copies
        for kind in kinds:
            if kind in self.away:
                continue
            moved = []
            for s in storages(self.engine, kind):  # what is away already has 0 bytes: not listed again
                if not s.resizable():
                    raise RuntimeError(f"rollout.offload: a {s.nbytes():,}-byte storage of the {kind} cannot be freed "
                                       f"(not resizable: memory torch did not allocate)")
                host = torch.empty(s.nbytes(), dtype=torch.uint8, pin_memory=pin)
                host.copy_(_whole(s), non_blocking=pin)
                moved.append((s, host))
            if pin:
                torch.cuda.current_stream().synchronize()  # every copy has landed before the storages go
            for s, _ in moved:
                freed += s.nbytes()
                s.resize_(0)
            self.away[kind] = moved
        if freed and pin:
            torch.cuda.empty_cache()  # the engine's allocator (another process) sees the memory free
        return freed

    def to_device(self) -> None:
        """Everything away comes back, bitwise, into the same storages (every view of them sees it)."""
        for moved in self.away.values():
            for s, host in moved:
                s.resize_(host.numel())
                _whole(s).copy_(host, non_blocking=host.is_pinned())
        if any(host.is_pinned() for moved in self.away.values() for _, host in moved):
            torch.cuda.current_stream().synchronize()
        self.away = {}

"""Training checkpoints: G and D (model + Megatron optimizer state) as megatron-core dist checkpoints, plus
the trainer's own state, written so that a kill at any moment never leaves a checkpoint that gets chosen.

Layout under ``<run_dir>/checkpoints``::
    student/         gad-convert layout: latest_checkpointed_iteration.txt, iter_0000050/, hf/, gad_meta.json
    discriminator/   the same, role discriminator       (``gad-convert mcore-to-hf`` exports either)
    trainer/iter_0000050/state.json, rng_rank00000.json ...   step, data position, schedulers, counters, RNGs
    latest           "50": written last, atomically; the only pointer resume trusts

Each ``iter_*`` directory is written as ``iter_*.tmp`` and renamed when whole; the per-role trackers and then
``latest`` move only after every part of the step is in place. Leftover ``*.tmp`` directories (a kill during
a write) are removed on the next start and reported. Trainer state is JSON (no pickle is ever loaded).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from typing import Optional

import torch

from gad_megatron.convert.megatron_ckpt import (
    META,
    TRACKER,
    copy_hf_side_files,
    hf_config_dir,
    iter_dir,
    own_writer_queue,
)
from gad_megatron.convert.safe_metadata import load_metadata
from gad_megatron.models.roles import D_ROLE
from gad_megatron.runtime import on_cuda
from gad_megatron.trainer.disk import bytes_under

log = logging.getLogger("gad_megatron.checkpoint")
LATEST = "latest"
ROLES = ("student", D_ROLE)
# The distributed optimizer's default sharding cannot be re-read (see docs/platform.md); this one reshards.
DIST_OPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _state(engine, is_loading: bool = False, metadata: Optional[dict] = None, with_optimizer: bool = True) -> dict:
    chunks = engine.modules
    if len(chunks) == 1:
        model = {"model": chunks[0].sharded_state_dict()}
    else:
        model = {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}
    if not with_optimizer:
        return model
    optim = engine.optimizer.sharded_state_dict(model, is_loading=is_loading, metadata=metadata)
    return {**model, "optimizer": optim}


def _optim_metadata(engine) -> Optional[dict]:
    return DIST_OPT_METADATA if getattr(engine, "use_distributed_optimizer", False) else None


def clean_leftovers(ckpt_root: str) -> list:
    """Removes ``*.tmp`` directories and files left by a killed write (rank 0); returns what it removed."""
    removed = []
    if _rank() == 0 and os.path.isdir(ckpt_root):
        for sub in [ckpt_root] + [os.path.join(ckpt_root, d) for d in (*ROLES, "trainer")]:
            if not os.path.isdir(sub):
                continue
            for name in os.listdir(sub):
                if ".tmp" in name:
                    p = os.path.join(sub, name)
                    shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
                    removed.append(p)
    if removed:
        log.warning("removed %d leftover partial checkpoint part(s) from an interrupted write: %s", len(removed),
                    ", ".join(removed[:4]))
    _barrier()
    return removed


def latest_step(ckpt_root: str, step: Optional[int] = None, roles=ROLES) -> Optional[int]:
    """The step ``latest`` points to (or ``step``, when given), if that checkpoint is whole (every part the run
    trains, ``roles``, present); None when nothing was saved yet."""
    path = os.path.join(ckpt_root, LATEST)
    if not os.path.isfile(path):
        if step is not None:
            raise FileNotFoundError(f"{ckpt_root}: no checkpoint was completed there (no {LATEST})")
        trainer_dir = os.path.join(ckpt_root, "trainer")
        saved = sorted(d for d in os.listdir(trainer_dir) if d.startswith("iter_")) if os.path.isdir(trainer_dir) else []
        if saved:  # never a silent fresh start over a run's work
            raise FileNotFoundError(f"{path}: missing, but {trainer_dir} holds {', '.join(saved)}: resume one with "
                                    f"checkpoint.resume_step=N, or start over with checkpoint.resume=none")
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise ValueError(f"{path}: expected a step number, got {text!r}")
    if step is not None and step > int(text):
        raise FileNotFoundError(f"{ckpt_root}: step {step} is after the last completed checkpoint ({text})")
    step = int(text) if step is None else step
    parts = [iter_dir(os.path.join(ckpt_root, r), step) for r in roles] + [iter_dir(os.path.join(ckpt_root, "trainer"), step)]
    missing = [p for p in parts if not os.path.isdir(p)]
    kept = _kept_steps(ckpt_root)
    if missing and step not in kept:
        raise FileNotFoundError(f"{ckpt_root}: step {step} is not kept there (checkpoint.keep_last prunes older ones); "
                                f"kept: {', '.join(map(str, kept)) or 'none'}")
    if missing:
        raise FileNotFoundError(f"{path} names step {step} but {missing[0]} is missing: the checkpoint was damaged "
                                f"after it was written")
    return step


def _kept_steps(ckpt_root: str) -> list:
    trainer_dir = os.path.join(ckpt_root, "trainer")
    names = os.listdir(trainer_dir) if os.path.isdir(trainer_dir) else []
    return sorted(int(d[5:]) for d in names if d.startswith("iter_") and d[5:].isdigit())


def _fresh_tmp(final: str) -> str:
    """Collective: an empty ``<final>.tmp`` directory (made by rank 0) to write a checkpoint part into."""
    tmp = final + ".tmp"
    if _rank() == 0:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    _barrier()
    return tmp


class BackgroundSaves:
    """``checkpoint.async_save``: each model's shards are written by megatron-core's async ``dist_checkpointing``
    (a forked writer per rank, tensors staged to host memory first on GPU; on CPU the fork's copy-on-write
    pages are the snapshot) while training goes on. The checkpoint is published (parts renamed, trackers,
    ``latest``, pruning: the rules of a synchronous save) only once every rank's writer is done, in the
    finalisation this class runs between steps; a kill before that leaves ``latest`` on the previous whole
    checkpoint. One save in flight at a time (the next waits for it), as Megatron-LM does."""

    def __init__(self):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.queue = AsyncCallsQueue(persistent=False)
        self.failure = None  # (ckpt_root, tmps, step, engines) of the save in flight: a failed write names them
        self.staged = []  # the models' writes of the save being prepared: (fn, args with staged tensors, kwargs)
        self.finalize = []

    def stage(self, request) -> None:
        """A model's async request from ``dist_checkpointing.save``: its tensors staged to host memory now,
        before the next model's save is planned."""
        args = list(request.async_fn_args)
        if request.preload_fn is not None:
            args[1] = request.preload_fn()  # the write buckets, on the host
        self.staged.append((request.async_fn, tuple(args), dict(request.async_fn_kwargs)))
        self.finalize += list(request.finalize_fns)

    def schedule(self, publish) -> None:
        """Collective: one background writer runs every staged model write in turn, then (between steps) their
        finalisations and ``publish``. One writer, not one per model: megatron-core's writers report through
        one process-wide results queue, and two concurrent ones had a model's metadata take the other's
        results (the student's checkpoint named the discriminator's head)."""
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest

        staged, self.staged = self.staged, []

        def write_all():
            for fn, args, kwargs in staged:
                fn(*args, **kwargs)

        request = AsyncRequest(write_all, (), self.finalize + [publish])
        self.finalize = []
        self.queue.schedule_async_request(request)

    def poll(self, blocking: bool = False) -> None:
        """Collective: publishes the saves whose writers are done on every rank (``blocking``: waits for them)."""
        from torch.distributed.checkpoint.api import CheckpointException

        if not self.queue.get_num_unfinalized_calls():
            return
        try:
            self.queue.maybe_finalize_async_calls(blocking=blocking)
        except (OSError, RuntimeError, CheckpointException) as e:
            raise _write_failed(*self.failure, e) from None

    def wait(self) -> None:
        self.poll(blocking=True)


def save(ckpt_root: str, step: int, engines: dict, hf_dirs: dict, metas: dict, trainer_state: dict,
         keep_last: int, background: Optional[BackgroundSaves] = None) -> str:
    """Collective. ``engines`` / ``hf_dirs`` / ``metas``: per role (``student`` and, in GAD, ``discriminator``).
    ``trainer_state`` is JSON-able and the same on every rank; RNG states are taken per rank here.
    ``background``: the models' shards are written in the background and published by its ``poll``."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: caught by name

    own_writer_queue()
    if background is not None:
        background.wait()  # the previous save is published before this one starts
    for engine in engines.values():
        if hasattr(engine, "ensure_resident"):
            engine.ensure_resident()  # state offloaded for a rollout engine comes back before it is read
    parts, tmps = [], []
    trainer_dir = os.path.join(ckpt_root, "trainer")
    t_final = iter_dir(trainer_dir, step)
    started = time.perf_counter()

    def publish():  # a background save's last finalisation: every rank's writers are done
        _publish(ckpt_root, step, parts, hf_dirs, metas, keep_last)
        if _rank() == 0:
            log.info("checkpoint at step %d: written in the background, published after %.1f s", step,
                     time.perf_counter() - started)

    if background is not None:
        background.failure = (ckpt_root, tmps, step, engines)
    try:
        for role, engine in engines.items():
            role_dir = os.path.join(ckpt_root, role)
            final = iter_dir(role_dir, step)
            tmp = _fresh_tmp(final)
            tmps.append(tmp)
            # A distributed optimizer before its first step has no state to save (megatron asserts on it); the
            # loader then keeps its optimizer fresh, as it does for any model saved before its first step.
            fresh = getattr(engine, "use_distributed_optimizer", False) and not engine.has_optimizer_state()
            state = _state(engine, metadata=_optim_metadata(engine), with_optimizer=not fresh)
            state.update({"checkpoint_version": 3.0, "iteration": step})
            parts.append((role_dir, tmp, final, role))
            request = dist_checkpointing.save(state, tmp, async_sharded_save=background is not None)
            if background is not None:
                background.stage(request)
        t_tmp = _fresh_tmp(t_final)
        tmps.append(t_tmp)
        with open(os.path.join(t_tmp, f"rng_rank{_rank():05d}.json"), "w") as f:
            json.dump(rng_state(), f)
        _barrier()
        if _rank() == 0:
            with open(os.path.join(t_tmp, "state.json"), "w") as f:
                json.dump({**trainer_state, "step": step}, f, indent=1, sort_keys=True)
    except (OSError, RuntimeError, CheckpointException) as e:  # a writer's OSError comes wrapped in the latter
        raise _write_failed(ckpt_root, tmps, step, engines, e) from None
    parts.append((trainer_dir, t_tmp, t_final, None))
    if background is None:
        _publish(ckpt_root, step, parts, hf_dirs, metas, keep_last)
        return t_final
    background.schedule(publish)
    if os.environ.get("GAD_FAULT_KILL_DURING_SAVE") == str(step):
        os.kill(os.getpid(), 9)  # fault injection for the kill -9 test: the writers run, nothing is published
    return t_final


def _publish(ckpt_root: str, step: int, parts: list, hf_dirs: dict, metas: dict, keep_last: int) -> None:
    """Collective, once every part is whole: rank 0 moves each into place, then the per-role trackers, then
    ``latest`` last, and prunes."""
    if _rank() == 0:
        for i, (role_dir, tmp, final, role) in enumerate(parts):
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            if i == 0 and os.environ.get("GAD_FAULT_KILL_DURING_SAVE") == str(step):
                # Fault injection for the kill -9 test: dies with one part renamed and `latest` not yet moved.
                os.kill(os.getpid(), 9)
        models = [p for p in parts if p[3] is not None]
        for role_dir, _, _, role in models:
            if not os.path.isdir(hf_config_dir(role_dir)):
                copy_hf_side_files(hf_dirs[role], hf_config_dir(role_dir))
            _write_atomic(os.path.join(role_dir, META), json.dumps(metas[role], indent=2))
            _write_atomic(os.path.join(role_dir, TRACKER), str(step))
        _write_atomic(os.path.join(ckpt_root, LATEST), str(step))
        _prune(ckpt_root, keep_last, [r for _, _, _, r in models], step)
    _barrier()


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (most often: the disk is full). The previous checkpoint is whole."""


def _write_failed(ckpt_root: str, tmps: list, step: int, engines: dict, err: Exception) -> CheckpointWriteError:
    """One line naming the place and the bytes; the partial parts are removed (only finished ones are renamed)."""
    written = sum(bytes_under(t) for t in tmps)
    for t in tmps:
        shutil.rmtree(t, ignore_errors=True)
    need = 0
    for engine in engines.values():  # weights + Adam's two fp32 moments (+ fp32 master weights in bf16 / fp16)
        for c in engine.modules:
            for p in c.parameters():
                need += p.numel() * (p.element_size() + 8 + (4 if p.element_size() < 4 else 0))
    free = shutil.disk_usage(ckpt_root).free if os.path.isdir(ckpt_root) else 0
    reason = str(err).strip().splitlines()[-1][:200] if str(err).strip() else type(err).__name__
    return CheckpointWriteError(
        f"{ckpt_root}: writing the step-{step} checkpoint failed after {written:,} bytes; this rank's part needs about "
        f"{need:,} bytes and the filesystem has {free:,} bytes free ({reason}). The partial checkpoint was removed; "
        f"any earlier one ('latest') is whole: free space and run the same command to resume")


def _prune(ckpt_root: str, keep_last: int, roles: list, step: int) -> None:
    """Keeps ``step`` (just written, named by ``latest``) and the ``keep_last - 1`` newest before it; steps after
    it (a run resumed from an earlier checkpoint) are not this timeline's to delete, nor the best's."""
    trainer_dir = os.path.join(ckpt_root, "trainer")
    steps = sorted(int(d[5:]) for d in os.listdir(trainer_dir) if d.startswith("iter_") and d[5:].isdigit())
    older = [s for s in steps if s < step]
    for old in older[: max(0, len(older) - (keep_last - 1))]:
        for sub in [trainer_dir] + [os.path.join(ckpt_root, r) for r in roles]:
            shutil.rmtree(iter_dir(sub, old), ignore_errors=True)


def load(ckpt_root: str, step: int, engines: dict) -> dict:
    """Collective: loads models and optimizer states (any TP/PP/DP layout) and this rank's RNG state;
    returns the trainer state."""
    from megatron.core import dist_checkpointing

    for role, engine in engines.items():
        if hasattr(engine, "ensure_resident"):
            engine.ensure_resident()
        d = iter_dir(os.path.join(ckpt_root, role), step)
        md = load_metadata(d)  # refuses a crafted .metadata / byte item before megatron unpickles anything
        # A model saved before its first optimizer step (G during critic warmup) has no Adam state to load:
        # its optimizer stays fresh (not even allocated: Adam allocates at its first step), as it was saved.
        stepped = any(k.startswith("optimizer.") for k in md.state_dict_metadata)
        if stepped and hasattr(engine, "allocate_optimizer_state"):
            engine.allocate_optimizer_state()  # a fresh distributed optimizer reads its own state while loading
        state = _state(engine, is_loading=True, metadata=_optim_metadata(engine), with_optimizer=stepped)
        loaded = dist_checkpointing.load(state, d)
        chunks = engine.modules
        for i, c in enumerate(chunks):
            c.load_state_dict(loaded["model"] if len(chunks) == 1 else loaded[f"model{i}"], strict=True)
        if stepped:
            engine.optimizer.load_state_dict(loaded["optimizer"])
    t_dir = iter_dir(os.path.join(ckpt_root, "trainer"), step)
    state = _read_json(os.path.join(t_dir, "state.json"))
    rng_file = os.path.join(t_dir, f"rng_rank{_rank():05d}.json")
    if os.path.isfile(rng_file):
        set_rng_state(_read_json(rng_file))
    else:  # resumed on more ranks than were saved: this rank keeps its fresh seeding
        log.warning("%s: no RNG state for rank %d (resumed at another world size); keeping its seeded state",
                    t_dir, _rank())
    return state


def _read_json(path: str):
    """A trainer JSON file; a damaged one is one error naming it (not a JSON traceback)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: damaged trainer state ({e}); resume an earlier checkpoint with "
                         f"checkpoint.resume_step=N") from None


def rng_state() -> dict:
    """Python, numpy, torch and megatron's model-parallel RNG tracker states, as JSON."""
    import numpy as np
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    py = random.getstate()
    npst = np.random.get_state()
    tracker = {k: v.tolist() for k, v in get_cuda_rng_tracker().get_states().items()}
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])],
        "torch": torch.get_rng_state().tolist(),
        "cuda": torch.cuda.get_rng_state().tolist() if on_cuda() else None,
        "megatron_tracker": tracker,
    }


def set_rng_state(s: dict) -> None:
    import numpy as np
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    np.random.set_state((s["numpy"][0], np.array(s["numpy"][1], dtype=np.uint32), *s["numpy"][2:]))
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
    if s.get("cuda") is not None and on_cuda():
        torch.cuda.set_rng_state(torch.tensor(s["cuda"], dtype=torch.uint8))
    if s.get("megatron_tracker"):
        get_cuda_rng_tracker().set_states({k: torch.tensor(v, dtype=torch.uint8) for k, v in s["megatron_tracker"].items()})

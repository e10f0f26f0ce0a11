"""Megatron-LM-layout distributed checkpoints (``torch_dist``), written atomically.

Layout::
    CKPT/
      latest_checkpointed_iteration.txt      # "0"
      iter_0000000/                          # dist_checkpointing (torch_dist) of {"model": ...}
      hf/config.json (+ tokenizer files)     # the HF config the model was built from
      gad_meta.json                          # role (student | discriminator), model_type, source

The state dict keys are megatron-core GPTModel's standard ``sharded_state_dict`` keys (``_extra_state``
included), so Megatron-LM loads it, and it can be re-read at any TP/PP.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch

from gad_megatron.convert.safe_metadata import load_metadata, safe_filesystem_reader
from gad_megatron.models.roles import D_ROLE
from gad_megatron.runtime.launch import die_with_parent
from gad_megatron.runtime.outputs import clean_stale_tmp, make_tmp_dir, publish_dir, read_json
from gad_megatron.runtime.signals import ignored_by_children

TRACKER = "latest_checkpointed_iteration.txt"
META = "gad_meta.json"
HF_SUBDIR = "hf"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "generation_config.json", "chat_template.jinja",
)


def iter_dir(ckpt: str, iteration: int) -> str:
    return os.path.join(ckpt, f"iter_{iteration:07d}")


def read_iteration(ckpt: str) -> int:
    path = os.path.join(ckpt, TRACKER)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not a megatron checkpoint (no {TRACKER})")
    text = open(path).read().strip()
    if text == "release":
        raise ValueError(f"{path}: 'release' checkpoints are not in iter_* layout; re-save with an iteration")
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path}: expected an iteration number, got {text!r}") from None


def read_meta(ckpt: str) -> dict:
    path = os.path.join(ckpt, META)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: missing (not written by gad-convert / gad-megatron)")

    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("role") not in ("student", D_ROLE):
        raise ValueError(f"{path}: expected an object with \"role\": \"student\" or \"discriminator\"")
    return meta


def hf_config_dir(ckpt: str) -> str:
    return os.path.join(ckpt, HF_SUBDIR)


def _model_state(chunks) -> dict:
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _broadcast_str(value: Optional[str]) -> str:
    import torch.distributed as dist

    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


_WRITER_MANAGER = None


def _writer_helper_init() -> None:
    import signal

    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    die_with_parent()


def own_writer_queue() -> None:
    """megatron's async checkpoint writer reports through a multiprocessing Manager that it spawns on first
    use; that server process outlives a rank killed with SIGKILL (holding the rank's stdout). Start it
    ourselves, set to die with its parent, before megatron would."""
    global _WRITER_MANAGER
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except ImportError:  # pragma: no cover - layout of other megatron-core versions
        return
    if getattr(fa, "_results_queue", "absent") is not None or _WRITER_MANAGER is not None:
        return
    import multiprocessing as mp
    import signal
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=mp.get_context("spawn"))
    # Started with SIGINT ignored (inherited across exec; Python then installs no KeyboardInterrupt handler):
    # Ctrl-C reaches the whole process group, and the trainer, not this helper, decides how to stop. SIGUSR1
    # (Slurm's, also to the whole step) is ignored by the helper itself: this call can come mid-run, and a
    # SIGUSR1 arriving while the trainer itself ignored it would be lost.
    with ignored_by_children(signal.SIGINT):
        manager.start(initializer=_writer_helper_init)
    _WRITER_MANAGER = manager
    fa._results_queue = manager.Queue()


def save_checkpoint(
    chunks,
    ckpt: str,
    hf_dir: str,
    meta: dict,
    iteration: int = 0,
    overwrite: bool = False,
    extra_state: Optional[dict] = None,
    strategy=None,
) -> str:
    """Collective: every rank calls it. Written into a temp dir beside ``ckpt``, renamed at the end.
    ``strategy``: megatron's sharded save strategy (default: its torch_dist one)."""
    from megatron.core import dist_checkpointing

    ckpt = os.path.abspath(ckpt)
    tmp = None
    if _rank0():
        if os.path.exists(ckpt) and not overwrite:
            tmp = f"ERROR:{ckpt} already exists (pass --overwrite to replace it)"
        else:
            clean_stale_tmp(ckpt)
            tmp = make_tmp_dir(ckpt)
            os.makedirs(iter_dir(tmp, iteration))
    tmp = _broadcast_str(tmp)
    if tmp.startswith("ERROR:"):
        raise FileExistsError(tmp[len("ERROR:"):])
    if strategy is None:  # megatron's async writer (the trainer's checkpoints); the lazy one writes in-process
        own_writer_queue()
    try:
        state = _model_state(chunks)
        state.update({"checkpoint_version": 3.0, "iteration": iteration, **(extra_state or {})})
        dist_checkpointing.save(state, iter_dir(tmp, iteration), sharded_strategy=strategy)
        _barrier()
        if _rank0():
            with open(os.path.join(tmp, TRACKER), "w") as f:
                f.write(str(iteration))
            copy_hf_side_files(hf_dir, hf_config_dir(tmp))
            with open(os.path.join(tmp, META), "w") as f:
                json.dump(meta, f, indent=2)
            publish_dir(tmp, ckpt, overwrite)
    except BaseException:
        if _rank0():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()
    return ckpt


def copy_hf_side_files(hf_dir: str, dst: str, config: Optional[dict] = None) -> None:
    """config.json (or ``config`` when given) and whatever tokenizer files the source has."""
    os.makedirs(dst, exist_ok=True)
    if config is None:
        shutil.copy(os.path.join(hf_dir, "config.json"), os.path.join(dst, "config.json"))
    else:
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    for name in TOKENIZER_FILES:
        src = os.path.join(hf_dir, name)
        if os.path.exists(src):
            shutil.copy(src, os.path.join(dst, name))


def load_checkpoint(chunks, ckpt: str, skip_keys=()) -> int:
    """Collective: loads ``ckpt`` into the (any-layout) model chunks; returns the iteration. ``skip_keys``
    (top-level module keys, e.g. ``output_layer.weight``) keep the model's own values."""
    from megatron.core import dist_checkpointing

    iteration = read_iteration(ckpt)
    load_metadata(iter_dir(ckpt, iteration))  # refuses a crafted .metadata before megatron unpickles it
    state = _model_state(chunks)
    for sd in state.values():
        for k in skip_keys:
            sd.pop(k, None)
    loaded = dist_checkpointing.load(state, iter_dir(ckpt, iteration))
    for i, c in enumerate(chunks):
        sd = loaded["model"] if len(chunks) == 1 else loaded[f"model{i}"]
        missing, unexpected = c.load_state_dict(sd, strict=False)
        missing = [k for k in missing if k not in skip_keys]
        if missing or unexpected:
            raise KeyError(f"{ckpt}: checkpoint does not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return iteration


class CheckpointTensorReader:
    """Reads full per-layer tensors from a torch_dist checkpoint, a few at a time (streaming export).

    Uses torch.distributed.checkpoint directly with a planner that asks for one layer's slice of each stacked
    ``decoder.layers.*`` tensor, so only those bytes are read. No process group is needed.
    """

    def __init__(self, ckpt: str):
        self.ckpt = ckpt
        self.dir = iter_dir(ckpt, read_iteration(ckpt))
        self._storage = safe_filesystem_reader(self.dir)
        self.meta = self._storage.read_metadata().state_dict_metadata

    def shape(self, key: str) -> tuple:
        return tuple(self._tensor_meta(key).size)

    def _tensor_meta(self, key: str):
        md = self.meta.get(key)
        if md is None or not hasattr(md, "size"):
            raise KeyError(f"{self.dir}: tensor {key!r} not in checkpoint")
        return md

    def dtype(self, key: str) -> torch.dtype:
        return self._tensor_meta(key).properties.dtype

    def read(self, requests) -> dict:
        """``requests``: [(key, layer or None)], each key at most once -> {(key, layer): tensor}."""
        import torch.distributed.checkpoint as dcp

        dests, offsets = {}, {}
        for key, layer in requests:
            md = self._tensor_meta(key)
            shape = tuple(md.size)
            if layer is None:
                dests[key], offsets[key] = torch.empty(shape, dtype=md.properties.dtype), (0,) * len(shape)
            else:
                if not 0 <= layer < shape[0]:
                    raise KeyError(f"{self.dir}: {key!r} has {shape[0]} layers, asked for layer {layer}")
                dests[key] = torch.empty((1,) + shape[1:], dtype=md.properties.dtype)
                offsets[key] = (layer,) + (0,) * (len(shape) - 1)
        try:
            dcp.load(dests, storage_reader=self._storage, planner=_SlicePlanner(offsets), no_dist=True)
        except (Exception, dcp.api.CheckpointException) as e:  # noqa: BLE001  (CheckpointException is a
            # BaseException; a truncated or damaged shard becomes one line naming the files)
            shards = sorted(f for f in os.listdir(self.dir) if f.endswith(".distcp"))
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise ValueError(f"{self.dir}: cannot read {', '.join(sorted(dests))[:120]} from its shards "
                             f"({', '.join(shards)}): damaged or truncated checkpoint ({msg[:300]})") from None
        return {(k, l): dests[k] if l is None else dests[k][0] for k, l in requests}


def _slice_planner_class():
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class SlicePlanner(DefaultLoadPlanner):
        """Each destination tensor is the chunk of its checkpoint tensor that starts at ``offsets[key]``."""

        def __init__(self, offsets: dict):
            super().__init__()
            self.offsets = offsets

        def create_local_plan(self):
            items = []
            for key, off in self.offsets.items():
                chunk = ChunkStorageMetadata(offsets=torch.Size(off), sizes=self.state_dict[key].shape)
                items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
            return LoadPlan(items)

        def resolve_tensor(self, read_item):
            # Destinations are plain tensors (not torch ShardedTensors): narrow by the item's own offsets.
            t = self.state_dict[read_item.dest_index.fqn]
            for dim, (o, n) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
                t = t.narrow(dim, o, n)
            return t

    return SlicePlanner


def _SlicePlanner(offsets: dict):
    return _slice_planner_class()(offsets)

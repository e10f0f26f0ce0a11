"""What a resumed run may change from the run it continues.

Each checkpoint's ``state.json`` holds the resolved config that ran and the sha256 of the training data. On
resume the new config is compared with it, key by key: keys about how long to run, where and how to save,
log, lay out or carry the run may change (``MAY_CHANGE``) and take effect; any other difference is one error
listing every changed key, unless ``checkpoint.allow_changes`` names it (a key, or a section such as
``g_optim``). The learning-rate schedulers are then rebuilt from the new config (megatron's
``override_opt_param_scheduler``) with the checkpoint's step count, so an accepted ``g_optim.lr`` is the
learning rate that runs, not the checkpoint's.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from typing import Optional

# Keys (or whole sections) a resume may change without being asked to.
MAY_CHANGE = (
    "train.total_steps", "train.stop_after", "train.max_skipped_steps", "checkpoint", "log", "parallel",
    "eval.heldout_every", "eval.at_start", "eval.after_warmup", "guard", "model.offload_reference", "model.recompute_granularity",
    "rollout.engine", "rollout.transport", "rollout.in_process", "rollout.verify_every", "rollout.stop_gap",
    "rollout.max_batch_tokens", "rollout.enforce_eager", "rollout.bucket_mb", "rollout.kv_cache_gb",
    "rollout.gpu_memory_utilization", "rollout.sleep_between_rollouts", "rollout.colocated",
    "rollout.vllm_tensor_parallel",
)


# Compared like config keys on resume (and named so in checkpoint.allow_changes): the data files' contents and
# the OPD teacher folder's identity (another model under the same path changes every OPD advantage).
DATA_KEYS = ("data_sha256", "heldout_sha256", "teacher_sha256")


class ResumeConfigError(ValueError):
    """The config differs from the checkpoint's in keys a resume may not change."""


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _listed(key: str, names) -> bool:
    """``key`` is one of ``names``, in a section named there, or ``names`` holds ``*`` (everything)."""
    return any(n == "*" or key == n or key.startswith(n + ".") for n in names)


def changed_keys(saved: dict, now: dict, defaults: Optional[dict] = None) -> list:
    """``[(key, checkpoint value, new value)]`` for every key that differs (sorted). A key the checkpoint's
    config does not have (it was written before the key existed) counts as its default there: a run that
    leaves a new key at its default resumes a checkpoint written before it."""
    a, b = {**flatten(defaults or {}), **flatten(saved)}, flatten(now)
    return [(k, a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_resume_config(saved: Optional[dict], now: dict, allow: list, where: str,
                        defaults: Optional[dict] = None) -> list:
    """The changed keys a resume applies; raises :class:`ResumeConfigError` naming every refused one.
    ``saved`` None (a checkpoint from before configs were recorded): nothing to compare."""
    if saved is None:
        return []
    changes = changed_keys(saved, now, defaults)
    refused = [c for c in changes if not _listed(c[0], MAY_CHANGE) and not _listed(c[0], allow)]
    if refused:
        lines = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in refused)
        raise ResumeConfigError(
            f"resuming {where}: the config differs from the one it ran with in {len(refused)} key(s) a resume may "
            f"not change: {lines}. Start a new run (another log.run_dir, or checkpoint.resume=none), or accept "
            f"them with checkpoint.allow_changes=[{','.join(k for k, _, _ in refused)}]")
    return changes


@lru_cache(maxsize=8)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_digest(path: str) -> Optional[str]:
    """sha256 of the training data: a file's bytes, or a saved ``datasets`` folder's files (relative names and
    bytes, in name order); None for a missing path. Each file's digest is computed once per version."""
    if os.path.isfile(path):
        st = os.stat(path)
        return _digest(os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if not os.path.isdir(path):
        return None
    h = hashlib.sha256()
    for rel, full in _files_in_order(path):
        h.update(f"{rel}\0{data_digest(full)}\0".encode())
    return h.hexdigest()


def _files_in_order(path: str):
    """(relative name, full path) of every file under ``path``, folders and names sorted: a stable walk."""
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            yield os.path.relpath(full, path), full


def model_digest(path: Optional[str]) -> Optional[str]:
    """sha256 of what tells one model folder from another without reading its weights (a 14B teacher is ~28 GB):
    every file's relative name and size, the whole of each small file (configs, tokenizer, checkpoint metadata)
    and each safetensors file's header (tensor names, shapes, offsets). None for no path or no folder."""
    import struct

    if not path or not os.path.isdir(path):
        return None
    h = hashlib.sha256()
    for rel, full in _files_in_order(path):
        size = os.path.getsize(full)
        h.update(f"{rel}\0{size}\0".encode())
        with open(full, "rb") as f:
            if size <= 1 << 20:
                h.update(f.read())
            elif full.endswith(".safetensors"):
                n = struct.unpack("<Q", f.read(8))[0]
                h.update(f.read(min(n, 1 << 26)))
    return h.hexdigest()

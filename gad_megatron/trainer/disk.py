"""The run directory's free space, checked before any model is built: a 24-hour job that fills its disk at the
third checkpoint has wasted its allocation."""

from __future__ import annotations

import os

from gad_megatron.models.storage import checkpoint_bytes, disk_need_bytes


def _existing(path: str) -> str:
    """The nearest directory that exists (the run directory may not yet)."""
    path = os.path.abspath(path)
    while not os.path.isdir(path):
        path = os.path.dirname(path)
    return path


def bytes_under(path: str) -> int:
    """Bytes of the files under ``path`` (0 when it does not exist)."""
    total = 0
    for root, _, names in os.walk(path):
        for n in names:
            try:
                total += os.lstat(os.path.join(root, n)).st_size
            except OSError:
                pass
    return total


def check_free_space(cfg, arch) -> None:
    """Raises OSError naming log.run_dir when its filesystem has less free space than ``keep_last`` checkpoints,
    the one being written and the HF export need, less what the run's own checkpoints already hold (a resume
    replaces them as it goes). ``checkpoint.check_free_space=false`` skips it."""
    if not cfg.checkpoint.check_free_space:
        return
    gad = cfg.train.stage == "gad"
    need = disk_need_bytes(arch, cfg.model.dtype, cfg.checkpoint.keep_last, cfg.checkpoint.export_hf_at_end, gad)
    need -= bytes_under(os.path.join(cfg.log.run_dir, "checkpoints"))
    st = os.statvfs(_existing(cfg.log.run_dir))
    free = st.f_bavail * st.f_frsize
    if free < need:
        one = checkpoint_bytes(arch, cfg.model.dtype, gad)
        raise OSError(f"log.run_dir={cfg.log.run_dir}: {free / 1e9:.2f} GB free on its filesystem, the run needs "
                      f"{need / 1e9:.2f} GB ({cfg.checkpoint.keep_last} checkpoints kept + the one being written, "
                      f"{one / 1e9:.2f} GB each{', + the HF export' if cfg.checkpoint.export_hf_at_end else ''}); "
                      f"free space, lower checkpoint.keep_last, or set checkpoint.check_free_space=false")

"""Process-level runtime: torch.distributed + megatron parallel_state on GPU (nccl) or CPU (gloo), and the one
device decision (``device()``) every module asks."""

import sys


def cpu_shim_applied() -> bool:
    # Checked through sys.modules so that asking never imports the shim on a GPU run.
    shim = sys.modules.get("gad_megatron.runtime.cpu_shim")
    return bool(shim and shim.is_applied())


from gad_megatron.runtime.parallel import (  # noqa: E402
    LayoutError,
    ParallelConfig,
    destroy,
    device,
    initialize,
    on_cuda,
    set_seed,
    validate_layout,
)

__all__ = [
    "LayoutError",
    "ParallelConfig",
    "cpu_shim_applied",
    "destroy",
    "device",
    "initialize",
    "on_cuda",
    "set_seed",
    "validate_layout",
]

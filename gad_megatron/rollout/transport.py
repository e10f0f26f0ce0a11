"""How weight buckets reach a vLLM engine: one class per transport, chosen by :func:`make_transport`.

- :class:`InProcessTransport`: the engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``);
  buckets are handed over as tensors and consumed lazily by one in-place reload.
- :class:`SharedMemoryFileTransport`: the engine core is another process (vLLM's default); each bucket is
  written as a safetensors file under ``/dev/shm`` and the worker streams the files into one reload
  (tensors passed as RPC arguments would arrive as Python lists).
GPU transports (CUDA IPC handles when colocated, NCCL broadcast to engines on other GPUs) belong here too;
they are not written yet.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Iterable


class InProcessTransport:
    name = "in-process"

    def push(self, llm, buckets: Iterable) -> None:
        llm.collective_rpc("gad_reload_from_buckets", args=(buckets,))


class SharedMemoryFileTransport:
    name = "shm-files"

    def __init__(self, transfer_dir: str = "/dev/shm"):
        self.transfer_dir = transfer_dir if os.path.isdir(transfer_dir) else tempfile.gettempdir()

    def push(self, llm, buckets: Iterable) -> None:
        from safetensors.torch import save_file

        tmp = tempfile.mkdtemp(prefix="gad-sync-", dir=self.transfer_dir)
        try:
            files = []
            for i, bucket in enumerate(buckets):
                path = os.path.join(tmp, f"bucket-{i:05d}.safetensors")
                save_file({n: t.detach().cpu().contiguous() for n, t in bucket}, path)
                files.append(path)
            llm.collective_rpc("gad_reload_from_files", args=(files,))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def make_transport(in_process: bool, transfer_dir: str = "/dev/shm"):
    return InProcessTransport() if in_process else SharedMemoryFileTransport(transfer_dir)

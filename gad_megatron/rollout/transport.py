"""How weight buckets reach a vLLM engine: one class per transport, chosen by :func:`make_transport`.

- :class:`InProcessTransport` (``in-process``): the engine core runs in this process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``); buckets are handed over as tensors and consumed lazily by one
  in-place reload.
- :class:`SharedMemoryFileTransport` (``shm-files``): the engine core is another process on a CPU machine;
  each bucket is written as a safetensors file under ``/dev/shm`` and the worker streams the files into one
  reload (tensors passed as RPC arguments would arrive as Python lists).
- :class:`CudaIpcTransport` (``cuda-ipc``): the engine shares this GPU (colocated): each bucket is packed
  into one of two reused device buffers, whose CUDA IPC handle the worker opens (zero copy; the producer's
  stream is synchronised before the handle is sent, and a buffer is refilled only after the worker has read
  it).
- :class:`CollectiveTransport` (``collective``): the engine's workers join a small process group with the
  trainer's sending rank (a TCP-store rendezvous, independent of both worlds) and receive every tensor by
  broadcast: NCCL on GPU (engines on other GPUs / nodes), gloo on CPU (so the tests run the same code). Each
  engine worker receives whole tensors and shards them itself, so the engine's TP need not equal training's.

``make_transport("auto", ...)`` decides once, from the device and where the engine runs: in-process when
the engine is; on GPU ``cuda-ipc`` for a colocated engine and ``collective`` otherwise; on CPU ``shm-files``.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import socket
import tempfile
from typing import Iterable

import torch

from gad_megatron.runtime import on_cuda

class Transport:
    """What a transport is: ``push(llm, buckets)`` delivers every bucket (a list of ``(HF name, tensor)``) into
    the engine's weights and returns when the engine has reloaded them. ``make(...)`` builds one from the
    engine's situation (the keyword arguments of :func:`make_transport`). Subclasses register by name."""

    name = ""

    @classmethod
    def make(cls, **situation) -> "Transport":
        return cls()

    def push(self, llm, buckets: Iterable) -> None:
        raise NotImplementedError


TRANSPORTS: dict = {}  # name -> Transport class; the config's choices are "auto" + these names


def register(cls):
    TRANSPORTS[cls.name] = cls
    return cls


def transport_choices() -> tuple:
    return ("auto",) + tuple(TRANSPORTS)


@register
class InProcessTransport(Transport):
    name = "in-process"

    @classmethod
    def make(cls, in_process: bool = False, **_):
        if not in_process:
            raise ValueError("the in-process transport needs the engine core in this process "
                             "(VLLM_ENABLE_V1_MULTIPROCESSING=0)")
        return cls()

    def push(self, llm, buckets: Iterable) -> None:
        llm.collective_rpc("gad_reload_from_buckets", args=(buckets,))


@register
class SharedMemoryFileTransport(Transport):
    name = "shm-files"

    @classmethod
    def make(cls, transfer_dir: str = "/dev/shm", **_):
        return cls(transfer_dir)

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _host() -> str:
    return os.environ.get("GAD_SYNC_HOST") or socket.gethostbyname(socket.gethostname())


def standalone_group(host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float = 600.0):
    """A process group of its own (not the default world, not vLLM's): a TCP store plus a gloo or NCCL
    backend object, so a trainer rank and the engine's workers can talk whatever worlds they are in."""
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.TCPStore(host, port, world_size, is_master=(rank == 0), timeout=timedelta(seconds=timeout_s),
                          wait_for_workers=False)
    store = dist.PrefixStore("gad-weight-sync", store)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timedelta(seconds=timeout_s)
        return dist.ProcessGroupNCCL(store, rank, world_size, opts)
    return dist.ProcessGroupGloo(store, rank, world_size, timedelta(seconds=timeout_s))


_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32,
                               torch.uint8, torch.int8)}


def broadcast_meta(group, meta, device) -> object:
    """A small picklable object from rank 0 of ``group`` to all (length, then bytes), on ``device``."""
    import pickle

    import torch.distributed as dist

    if group.rank() == 0:
        data = torch.frombuffer(bytearray(pickle.dumps(meta)), dtype=torch.uint8).to(device)
        n = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    else:
        n = torch.zeros(1, dtype=torch.int64, device=device)
    group.broadcast([n], dist.BroadcastOptions()).wait()
    if group.rank() != 0:
        data = torch.empty(int(n.item()), dtype=torch.uint8, device=device)
    group.broadcast([data], dist.BroadcastOptions()).wait()
    return pickle.loads(data.cpu().numpy().tobytes()) if group.rank() != 0 else meta


@register
class CollectiveTransport(Transport):
    """Broadcast from the trainer's sending rank to every engine worker over a group of its own."""

    name = "collective"

    @classmethod
    def make(cls, engine_world_size: int = 1, **_):
        return cls(engine_world_size=engine_world_size)

    def __init__(self, backend: str = None, engine_world_size: int = 1, timeout_s: float = 600.0):
        self.backend = backend or ("nccl" if on_cuda() else "gloo")
        self.engine_world_size = engine_world_size
        self.timeout_s = timeout_s
        self.group = None
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def _join(self, llm) -> None:
        host, port = _host(), _free_port()
        world = 1 + self.engine_world_size
        # The workers start their side in a background thread and return at once; ours completes the rendezvous.
        llm.collective_rpc("gad_join_weight_group", args=(host, port, world, self.backend, self.timeout_s))
        self.group = standalone_group(host, port, 0, world, self.backend, self.timeout_s)

    def push(self, llm, buckets: Iterable) -> None:
        import torch.distributed as dist

        if self.group is None:
            self._join(llm)

        def send():
            for bucket in buckets:
                meta = [(n, tuple(t.shape), str(t.dtype)) for n, t in bucket]
                broadcast_meta(self.group, meta, self.device)
                for _, t in bucket:
                    t = t.detach().to(self.device).contiguous()
                    self.group.broadcast([t], dist.BroadcastOptions()).wait()
            broadcast_meta(self.group, None, self.device)  # end of this sync

        _with_rpc(llm, "gad_reload_from_collective", send, self.timeout_s)


@register
class CudaIpcTransport(CollectiveTransport):
    """Colocated engine on the GPUs of the trainer's node (any engine TP): each bucket is packed into one of two
    reused buffers on the sending rank's GPU and travels as a CUDA IPC handle (no host copy), which each of the
    engine's workers opens on that GPU (found by its UUID: the workers number their visible GPUs otherwise)
    and copies its shards out of; the handles and the workers' acknowledgements go over a gloo group of their
    own, sized 1 + engine TP."""

    name = "cuda-ipc"

    @classmethod
    def make(cls, bucket_bytes: int = 512 * 1024**2, engine_world_size: int = 1, **_):
        if not on_cuda():
            raise ValueError("the cuda-ipc transport needs a GPU shared with the engine")
        return cls(bucket_bytes, engine_world_size)

    def __init__(self, bucket_bytes: int = 512 * 1024**2, engine_world_size: int = 1, timeout_s: float = 600.0):
        super().__init__(backend="gloo", engine_world_size=engine_world_size, timeout_s=timeout_s)
        self.bucket_bytes = bucket_bytes
        self.buffers = [None, None]  # alternated: one is filled while the worker copies out of the other

    def _buffer(self, i: int, nbytes: int) -> torch.Tensor:
        buf = self.buffers[i % 2]
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, self.bucket_bytes), dtype=torch.uint8, device="cuda")
            self.buffers[i % 2] = buf
        return buf

    def push(self, llm, buckets: Iterable) -> None:
        from torch.multiprocessing.reductions import reduce_tensor

        if self.group is None:
            self._join(llm)

        def send():
            # Group ops in the workers' order: meta k, ack k, meta k+1, ... Bucket k+1 is packed into the other
            # buffer while the workers copy bucket k out; a buffer is reused only after every worker's ack.
            sent = 0
            uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
            for bucket in buckets:
                nbytes = sum(t.numel() * t.element_size() for _, t in bucket)
                buf = self._buffer(sent, nbytes)
                meta, off = [], 0
                for name, t in bucket:
                    n = t.numel() * t.element_size()
                    buf[off:off + n].copy_(t.detach().contiguous().view(-1).view(torch.uint8))
                    meta.append((name, tuple(t.shape), str(t.dtype), off))
                    off += n
                torch.cuda.current_stream().synchronize()  # the copies are done before another process reads
                if sent:
                    self.group.barrier().wait()  # the worker has copied bucket sent-1 out
                broadcast_meta(self.group, (reduce_tensor(buf), meta, uuid), torch.device("cpu"))
                sent += 1
            if sent:
                self.group.barrier().wait()
            broadcast_meta(self.group, None, torch.device("cpu"))

        _with_rpc(llm, "gad_reload_from_ipc", send, self.timeout_s)


def _with_rpc(llm, method: str, send, timeout_s: float) -> None:
    """Runs the engine's receiving RPC in a helper thread (it returns only when the reload is done) while
    ``send`` feeds it from this thread. On a failure here the helper is not waited for: the workers give up
    at the group's timeout."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    failed = True
    try:
        done = pool.submit(llm.collective_rpc, method)
        send()
        done.result(timeout=timeout_s)
        failed = False
    finally:
        pool.shutdown(wait=not failed, cancel_futures=True)


def make_transport(kind: str = "auto", in_process: bool = False, colocated: bool = True,
                   transfer_dir: str = "/dev/shm", engine_world_size: int = 1, bucket_bytes: int = 512 * 1024**2):
    """The transport for this engine; ``auto`` decides from the device and where the engine runs."""
    if kind not in transport_choices():
        raise ValueError(f"weight-sync transport {kind!r}: use one of {', '.join(transport_choices())}")
    if kind == "auto":
        if in_process:
            kind = "in-process"
        elif on_cuda():
            kind = "cuda-ipc" if colocated else "collective"
        else:
            kind = "shm-files"
    return TRANSPORTS[kind].make(in_process=in_process, colocated=colocated, transfer_dir=transfer_dir,
                                 engine_world_size=engine_world_size, bucket_bytes=bucket_bytes)

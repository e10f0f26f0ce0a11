"""vLLM worker extension (``LLM(worker_extension_cls=...)``): in-place weight reload through
``model_runner.reload_weights``, the path that works on CPU too (``model.load_weights`` does not: oneDNN
repacks linear weights). Runs inside vLLM's worker process; keep its imports light."""

from __future__ import annotations

import hashlib

from gad_megatron.rollout.transport import _DTYPES, broadcast_meta, standalone_group


def _retie_embeddings(model_runner) -> bool:
    """vLLM ties ``lm_head.weight`` to the embedding's Parameter object; the in-place reload gives the embedding
    a new Parameter, leaving the head on the old weights (and, on CPU, its packed GEMM handle). Re-tie it and
    redo the head's post-load processing. Returns True when it re-tied."""
    model = model_runner.get_model()
    lm_head = getattr(model, "lm_head", None)
    inner = getattr(model, "model", None)
    embed = getattr(inner, "embed_tokens", None)
    cfg = getattr(model_runner, "model_config", None)
    tied = bool(getattr(getattr(cfg, "hf_config", None), "tie_word_embeddings", False))
    if not (tied and lm_head is not None and embed is not None and hasattr(lm_head, "tie_weights")):
        return False
    if lm_head.weight is not embed.weight:
        lm_head.tie_weights(embed)
    lm_head.quant_method.process_weights_after_loading(lm_head)
    return True


class _Digest:
    """A hash of every (name, bytes) received in one sync, independent of arrival order (files list names
    sorted, streams in model order): lets tests prove that transports deliver the same bits."""

    def __init__(self):
        self.per_name = {}
        self.count = 0

    def add(self, name, tensor):
        import torch

        data = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        self.per_name[name] = hashlib.sha256(data).hexdigest()
        self.count += 1

    def hexdigest(self) -> str:
        return tensor_digest(self.per_name)


def tensor_digest(per_name: dict) -> str:
    """sha256 over sorted (name, sha256(bytes)) pairs."""
    h = hashlib.sha256()
    for name in sorted(per_name):
        h.update(f"{name}:{per_name[name]};".encode())
    return h.hexdigest()


def _local_uuids() -> list:
    import torch

    return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]


def ipc_args_on_device(args: tuple, uuid: str, local_uuids: list) -> tuple:
    """``torch.multiprocessing.reductions.reduce_tensor``'s rebuild arguments with the storage's device index
    (position 6) renumbered for this process: the sender's GPU by its UUID among the GPUs this worker sees
    (an engine's workers see only the engine's GPUs, numbered from 0)."""
    if uuid not in local_uuids:
        raise RuntimeError(f"the weight-sync buffer is on GPU {uuid}, which this engine worker does not see "
                           f"(it sees {local_uuids}): the engine's GPUs must include its leader's")
    return tuple(args[:6]) + (local_uuids.index(uuid),) + tuple(args[7:])


class WeightSyncExtension:
    def _gad_reload(self, named) -> int:
        digest = _Digest()

        def counted():
            for name, tensor in named:
                if getattr(self, "_gad_record_digest", False):
                    digest.add(name, tensor)
                else:
                    digest.count += 1
                yield name, tensor

        self.model_runner.reload_weights(weights_iterator=counted())
        _retie_embeddings(self.model_runner)
        self._gad_last_digest = digest.hexdigest()
        return digest.count

    def gad_record_digest(self, on: bool = True) -> None:
        self._gad_record_digest = on

    def gad_last_digest(self) -> str:
        return getattr(self, "_gad_last_digest", None)

    def gad_reload_from_buckets(self, buckets) -> int:
        """In-process engine: ``buckets`` is an iterable of [(hf name, tensor)] lists, consumed lazily."""
        return self._gad_reload((name, tensor) for bucket in buckets for name, tensor in bucket)

    def gad_reload_from_files(self, files) -> int:
        """Separate engine process: each bucket arrives as a safetensors file (e.g. under /dev/shm)."""
        from safetensors import safe_open

        def named():
            for path in files:
                with safe_open(path, framework="pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)

        return self._gad_reload(named())

    # -- collective transport: a process group with the trainer's sending rank ------------------------------
    def gad_join_weight_group(self, host, port, world_size, backend, timeout_s) -> None:
        """Starts this worker's side of the rendezvous in a thread and returns, so that the trainer (rank 0)
        can complete it after this call."""
        import threading

        rank = 1 + int(getattr(self, "rank", 0))
        box = {}

        def join():
            try:
                box["group"] = standalone_group(host, port, rank, world_size, backend, timeout_s)
            except BaseException as e:  # noqa: BLE001  (reported by the next reload)
                box["error"] = e

        t = threading.Thread(target=join, daemon=True)
        t.start()
        self._gad_join = (t, box, backend)

    def _gad_group(self):
        t, box, backend = self._gad_join
        t.join()
        if "error" in box:
            raise RuntimeError(f"joining the weight-sync group failed: {box['error']}")
        import torch

        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        return box["group"], device

    def gad_reload_from_collective(self) -> int:
        """Receives every tensor by broadcast from the trainer, bucket by bucket, into one in-place reload."""
        import torch
        import torch.distributed as dist

        group, device = self._gad_group()

        def named():
            while True:
                meta = broadcast_meta(group, None, device)
                if meta is None:
                    return
                for name, shape, dtype in meta:
                    t = torch.empty(shape, dtype=_DTYPES[dtype], device=device)
                    group.broadcast([t], dist.BroadcastOptions()).wait()
                    yield name, t

        return self._gad_reload(named())

    def gad_reload_from_ipc(self) -> int:
        """Colocated GPU engine: buckets arrive as CUDA IPC handles (metadata over the gloo group). Each bucket
        is copied out of the shared buffer on arrival (the reload may hold tensors until a layer is whole),
        then acknowledged so that the trainer may refill that buffer."""
        import torch

        group, _ = self._gad_group()

        def named():
            while True:
                msg = broadcast_meta(group, None, torch.device("cpu"))
                if msg is None:
                    return
                (rebuild, args), meta, uuid = msg
                buf = rebuild(*ipc_args_on_device(args, uuid, _local_uuids()))
                tensors = []
                for name, shape, dtype, off in meta:
                    dt = _DTYPES[dtype]
                    n = int(torch.Size(shape).numel()) * torch.empty((), dtype=dt).element_size()
                    tensors.append((name, buf[off:off + n].view(dt).view(shape).clone()))
                torch.cuda.current_stream().synchronize()
                del buf
                group.barrier().wait()  # this bucket's buffer may be refilled
                yield from tensors

        return self._gad_reload(named())

"""HF checkpoint I/O: a validating safetensors reader and a streaming, size-bounded safetensors writer.

Only safetensors is ever read (no pickle), and every problem with the input (non-safetensors weights, a
truncated shard, missing / extra / mis-shaped tensors) is reported in one error naming the file or tensor,
before any compute.
"""

from __future__ import annotations

import collections
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Optional

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """Bad input checkpoint; the message names the file or tensor."""


_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1,
}


def _read_header(path: str) -> dict:
    """Parses a safetensors header and checks that the file holds every byte the header promises."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n <= 0 or n > min(size - 8, 100 * 1024 * 1024):
            raise CheckpointError(f"{path}: not a safetensors file (header length {n} does not fit the file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        try:
            lo, hi = info["data_offsets"]
            shape = info["shape"]
            nbytes = _DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry") from None
        numel = 1
        for s in shape:
            numel *= s
        if hi - lo != numel * nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} byte range does not match its shape {shape}")
        end = max(end, hi)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file ({size} bytes, header needs {8 + n + end}); "
            "re-download or re-export it"
        )
    return header


class SafetensorsReader:
    """All tensors of an HF checkpoint directory, lazily (memory-mapped, one tensor at a time)."""

    def __init__(self, hf_dir: str):
        self.dir = hf_dir
        if not os.path.isdir(hf_dir):
            raise CheckpointError(f"{hf_dir}: not a directory")
        index = os.path.join(hf_dir, INDEX_NAME)
        single = os.path.join(hf_dir, SINGLE_NAME)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: malformed safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        elif os.path.exists(single):
            files, weight_map = [SINGLE_NAME], None
        else:
            others = [f for f in os.listdir(hf_dir) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
            hint = f" (found {', '.join(sorted(others))}: pickle weights are never loaded; convert them to " \
                   "safetensors with transformers' save_pretrained(safe_serialization=True))" if others else ""
            raise CheckpointError(f"{hf_dir}: no {SINGLE_NAME} or {INDEX_NAME}{hint}")
        self.shapes: dict = {}
        self.dtypes: dict = {}
        self._file_of: dict = {}
        for fname in files:
            path = os.path.join(hf_dir, fname)
            if not os.path.exists(path):
                raise CheckpointError(f"{path}: listed in {INDEX_NAME} but missing")
            for name, info in _read_header(path).items():
                if name in self._file_of:
                    raise CheckpointError(f"{path}: tensor {name!r} also stored in {self._file_of[name]}")
                self._file_of[name] = path
                self.shapes[name] = tuple(info["shape"])
                self.dtypes[name] = info["dtype"]
        if weight_map is not None:
            for name, fname in weight_map.items():
                if self._file_of.get(name) != os.path.join(hf_dir, fname):
                    raise CheckpointError(f"{index}: tensor {name!r} is mapped to {fname} but not stored there")
    def names(self) -> list:
        return list(self.shapes)

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self._file_of.get(name)
        if path is None:
            raise CheckpointError(f"{self.dir}: tensor {name!r} not found")
        # Opened per tensor: a handle kept open keeps every page it touched mapped (and counted in RSS),
        # which for a whole model is the model's size again.
        with safe_open(path, framework="pt") as h:
            return h.get_tensor(name)

    def get_slice(self, name: str, slices: tuple) -> torch.Tensor:
        """``tensor[slices]`` reading only those bytes (safetensors' lazy slicing)."""
        from safetensors import safe_open

        path = self._file_of.get(name)
        if path is None:
            raise CheckpointError(f"{self.dir}: tensor {name!r} not found")
        with safe_open(path, framework="pt") as h:
            return h.get_slice(name)[slices]

    def validate(self, expected: dict, ignore_suffixes: Iterable[str] = (), optional: Iterable[str] = ()) -> None:
        """``expected``: {name: shape}. One error listing every missing, extra and mis-shaped tensor."""
        optional = set(optional)
        ignore = tuple(ignore_suffixes)
        missing = [n for n in expected if n not in self.shapes]
        extra = [n for n in self.shapes if n not in expected and n not in optional and not n.endswith(ignore)]
        bad = [
            f"{n} has shape {list(self.shapes[n])}, expected {list(s)}"
            for n, s in expected.items()
            if n in self.shapes and tuple(self.shapes[n]) != tuple(s)
        ]
        problems = []
        if missing:
            problems.append("missing tensors: " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
        if extra:
            problems.append("unexpected tensors: " + ", ".join(extra[:20]) + (" ..." if len(extra) > 20 else ""))
        if bad:
            problems.append("mis-shaped tensors: " + "; ".join(bad[:20]))
        if problems:
            raise CheckpointError(f"{self.dir}: " + " | ".join(problems))


_TORCH_TO_ST = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


# Bytes go to a file in pieces of this size: one write() of a whole several-hundred-MB tensor was 2-3x slower than
# the same bytes in 1 MiB pieces on the benchmark machine (the pieces stay in the CPU cache on their way into the
# page cache).
WRITE_PIECE = 1 << 20


def write_pieces(fh, data) -> int:
    mv = memoryview(data).cast("B")
    for i in range(0, len(mv), WRITE_PIECE):
        fh.write(mv[i:i + WRITE_PIECE])
    return len(mv)


class StreamingSafetensorsWriter:
    """Writes a planned list of tensors into size-bounded safetensors shards, one tensor at a time.

    The safetensors library can only write a shard from tensors all held in memory; since the names, shapes
    and dtypes of an export are known up front, the shard headers are written first and each tensor's bytes
    are appended as it arrives, so memory stays at one tensor. Files are plain safetensors (read back with
    the library in the tests) plus ``model.safetensors.index.json`` when there is more than one shard.
    """

    def __init__(self, out_dir: str, plan: list, max_shard_bytes: int = 5 * 1024**3, metadata: Optional[dict] = None):
        """``plan``: [(name, shape, torch dtype)] in the order :meth:`add` will be called."""
        self.out_dir = out_dir
        self.metadata = {"format": "pt", **(metadata or {})}
        shards, current, size = [], [], 0
        for name, shape, dtype in plan:
            nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            if current and size + nbytes > max_shard_bytes:
                shards.append(current)
                current, size = [], 0
            current.append((name, tuple(shape), dtype, nbytes))
            size += nbytes
        if current or not shards:
            shards.append(current)
        n = len(shards)
        self.files = [SINGLE_NAME if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        self._shards = shards
        self._order = [(k, entry) for k, shard in enumerate(shards) for entry in shard]
        self._next = 0
        self._fh = None
        self._open_shard = -1
        self.total_bytes = sum(e[3] for _, e in self._order)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="safetensors-writer")
        self._pending = collections.deque()  # (future, bytes) of tensors handed to the writer thread
        self._max_pending = max((e[3] for _, e in self._order), default=0)

    def _start_shard(self, k: int) -> None:
        if self._fh is not None:
            self._finish_file()
        header, offset = {"__metadata__": self.metadata}, 0
        for name, shape, dtype, nbytes in self._shards[k]:
            header[name] = {"dtype": _TORCH_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment
        self._fh = open(os.path.join(self.out_dir, self.files[k]), "wb")
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)
        self._open_shard = k

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order):
            raise ValueError(f"tensor {name!r} is not in the export plan")
        k, (want, shape, dtype, nbytes) = self._order[self._next]
        if name != want or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(
                f"export plan expected {want} {list(shape)} {dtype}, got {name} {list(tensor.shape)} {tensor.dtype}"
            )
        t = tensor.detach().cpu().contiguous()
        # The bytes go to disk on a thread of their own (file writes release the GIL) while the caller reads and
        # converts the next tensors; at most the largest tensor's worth waits, so memory stays bounded.
        self._pending.append((self._pool.submit(self._write, k, t), nbytes))
        self._next += 1
        self._drain(self._max_pending)

    def _write(self, k: int, t: torch.Tensor) -> None:  # on the writer thread, in order
        if k != self._open_shard:
            self._start_shard(k)
        if t.numel():
            write_pieces(self._fh, t.reshape(-1).view(torch.uint8).numpy().data)  # no copy of the bytes

    def _drain(self, limit: int) -> None:
        while self._pending and sum(n for _, n in self._pending) > limit:
            self._pending.popleft()[0].result()  # re-raises the writer's error here

    def _finish_file(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())  # on disk before the directory is published
        self._fh.close()

    def close(self) -> list:
        if self._next != len(self._order):
            missing = [e[0] for _, e in self._order[self._next:]]
            self.abort()
            raise ValueError(f"export incomplete: {len(missing)} tensors never written (first: {missing[0]})")
        self._drain(-1)
        self._pool.shutdown()
        if self._fh is None:
            self._start_shard(0)
        self._finish_file()
        if len(self.files) > 1:
            weight_map = {e[0]: self.files[k] for k, e in self._order}
            with open(os.path.join(self.out_dir, INDEX_NAME), "w") as f:
                json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, f, indent=2)
        return list(self.files)

    def abort(self) -> None:
        """Stops writing (after an error elsewhere): waits for the write in progress, closes the file."""
        for fut, _ in self._pending:
            fut.cancel()
        self._pool.shutdown(wait=True)
        self._pending.clear()
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:  # flushing what is buffered can fail the same way (disk full); the file is dropped anyway
                pass


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n

"""Checkpoint metadata read without running code from the checkpoint.

torch's distributed-checkpoint reader ``pickle.load``s ``iter_*/.metadata``: a crafted checkpoint could run
anything on load. We unpickle it here with an allow-list of the classes torch writes into it (the metadata
dataclasses, torch.Size, dtypes, layouts) before torch or megatron-core reads the directory, and our own
tensor reader uses only this loader. The byte items inside the ``.distcp`` shards (megatron's ``_extra_state``
objects, ``torch.save`` payloads) are unpickled by torch with ``weights_only=False`` when megatron loads the
checkpoint: :func:`load_metadata` opens each one first with ``weights_only=True`` (tensors and plain data
only) and refuses the directory, naming the shard and the item, if one asks for anything else. ``common.pt``
and per-object ``*.pt`` files are read by megatron-core with ``torch.load``'s default ``weights_only=True``.
"""

from __future__ import annotations

import io
import os
import pickle

import torch

METADATA_FILE = ".metadata"

_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
}


class UntrustedCheckpointError(ValueError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, f, source: str):
        super().__init__(f)
        self.source = source

    def find_class(self, module, name):
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise UntrustedCheckpointError(
            f"{self.source}: refused to load: it asks for {module}.{name}, which checkpoint metadata never "
            f"contains (a crafted or foreign file; nothing from it was run)")


def load_metadata(ckpt_dir: str):
    """The torch ``Metadata`` of a dist-checkpoint directory, unpickled through the allow-list."""
    path = os.path.join(ckpt_dir, METADATA_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing (not a torch_dist checkpoint, or an unfinished one)")
    with open(path, "rb") as f:
        data = f.read()
    try:
        md = _RestrictedUnpickler(io.BytesIO(data), path).load()
    except UntrustedCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001  (truncated / garbage metadata: one clear line)
        raise ValueError(f"{path}: unreadable checkpoint metadata ({type(e).__name__}: {e})") from None
    _check_shard_sizes(ckpt_dir, md)
    _check_byte_items(ckpt_dir, md)
    return md


def _check_byte_items(ckpt_dir: str, md) -> None:
    """Every byte item must be plain data (see the module's docstring); nothing in it is run here."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    byte_keys = {k for k, v in md.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    for index, info in (getattr(md, "storage_data", None) or {}).items():
        if index.fqn not in byte_keys:
            continue
        path = os.path.join(ckpt_dir, info.relative_path)
        if getattr(info, "transform_descriptors", None):
            raise UntrustedCheckpointError(f"{path}: item {index.fqn!r} is stored transformed "
                                           f"({info.transform_descriptors}); refused to load")
        with open(path, "rb") as f:
            f.seek(int(info.offset))
            data = f.read(int(info.length))
        try:
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  (any refusal or damage: one line, nothing run)
            why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise UntrustedCheckpointError(f"{path}: refused to load item {index.fqn!r}: not plain data ({why}); a "
                                           f"crafted or foreign checkpoint, nothing from it was run") from None


def _check_shard_sizes(ckpt_dir: str, md) -> None:
    """Every shard file must hold the bytes the metadata places in it (a truncated copy is named here, not
    found as an EOFError deep inside torch)."""
    need: dict = {}
    for info in (getattr(md, "storage_data", None) or {}).values():
        rel = getattr(info, "relative_path", None)
        if rel is not None:
            need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    for rel, end in sorted(need.items()):
        path = os.path.join(ckpt_dir, rel)
        if not os.path.isfile(path):
            raise ValueError(f"{path}: missing (the checkpoint metadata refers to it)")
        size = os.path.getsize(path)
        if size < end:
            raise ValueError(f"{path}: truncated ({size} bytes, the checkpoint metadata needs {end}): a damaged "
                             f"or unfinished copy")


def safe_filesystem_reader(ckpt_dir: str):
    """torch's ``FileSystemReader`` whose ``read_metadata`` goes through :func:`load_metadata`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            md = load_metadata(ckpt_dir)
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return SafeReader(ckpt_dir)

"""hf-to-mcore without materialising the model: megatron's own ``dist_checkpointing.save`` of a model built on
the meta device, with a save strategy whose tensors are made from the HF files one chunk at a time, as the
writer asks for them.

Why: building the model and then saving it holds the whole model (plus megatron's writer's staging copy) in
memory -- 3.4 GiB for a 1B model, ~30 GiB per rank for 14B at TP1 -- and the writer waits for all of it. Here
megatron still plans the checkpoint (keys, global shapes, TP/PP chunks, replica de-duplication, common.pt,
metadata.json: the same files a real save writes), but every tensor chunk is read from the safetensors,
converted through the architecture's mapping (``mapping.mcore_row_sources``: the HF rows a chunk is made of)
and written before the next one is made. Peak memory is about one chunk per writer thread (at TP1 a chunk is a
whole per-layer tensor), whatever the model's size.

Each rank of the TP*PP group writes its own chunks (its own ``__<rank>_<thread>.distcp`` files), so conversion of a
big model spreads over the ranks srun starts.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from gad_megatron.convert.hf_io import write_pieces
from gad_megatron.models.mapping import LAYER_PREFIX


def _lazy_planner_class():
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner

    class LazySavePlanner(MCoreSavePlanner):
        """megatron's save planner whose meta-device chunks are made on demand by ``materialise``."""

        def __init__(self, materialise: Callable, **kwargs):
            super().__init__(**kwargs)
            self.materialise = materialise

        def resolve_data(self, write_item):
            obj = self.lookup_object(write_item.index)
            if isinstance(obj, torch.Tensor) and obj.is_meta:  # in the model's dtype, as a real save would write
                t = self.materialise(write_item.index.fqn, tuple(write_item.index.offset), tuple(obj.shape))
                if tuple(t.shape) != tuple(obj.shape):
                    raise RuntimeError(f"{write_item.index.fqn} at {tuple(write_item.index.offset)}: made "
                                       f"{tuple(t.shape)}, the checkpoint plans {tuple(obj.shape)}")
                return t.to(obj.dtype).contiguous()
            return super().resolve_data(write_item)

    return LazySavePlanner


# Two writer threads per rank (two files): one reads the next chunk while the other's bytes go to disk; measured
# ~20 % faster than one on the 1B benchmark. Each thread holds one chunk.
WRITER_THREADS = 2


class PiecewiseWrites:
    """A file whose ``write`` hands the kernel at most ``hf_io.WRITE_PIECE`` bytes at a time."""

    def __init__(self, raw):
        self.raw = raw

    def write(self, b) -> int:
        return write_pieces(self.raw, b)

    def __getattr__(self, name):  # tell, flush, fileno (fsync), close, ...
        return getattr(self.raw, name)


def _file_system_class():
    from torch.distributed.checkpoint.filesystem import FileSystem

    class PiecewiseFileSystem(FileSystem):
        @contextlib.contextmanager
        def create_stream(self, path, mode):
            with super().create_stream(path, mode) as stream:
                yield PiecewiseWrites(stream) if "w" in mode else stream

    return PiecewiseFileSystem


def _writer_class():
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Writer(FileSystemWriter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.fs = _file_system_class()()

        def storage_meta(self):
            # The directory as a plain string (as megatron's own writer records it): a path object would be
            # one more class for the metadata's allow-list (convert/safe_metadata.py) to accept.
            return StorageMeta(checkpoint_id=str(self.checkpoint_id), save_id=self.save_id)

    return Writer


def lazy_strategy(materialise: Callable):
    """A ``torch_dist`` (version 1) save strategy: megatron's key translation and planner, torch's file-system
    writer (WRITER_THREADS files per rank, each thread resolving one chunk at a time)."""
    from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
    from megatron.core.dist_checkpointing.strategies.torch import (
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )

    class LazyTorchDistSaveStrategy(SaveShardedStrategy):
        def __init__(self):
            super().__init__("torch_dist", 1)

        @property
        def can_handle_sharded_objects(self):
            return True

        def save(self, sharded_state_dict, checkpoint_dir):
            import torch.distributed.checkpoint as dcp

            sd, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
            pyt = mcore_to_pyt_state_dict(sd, False)
            planner = _lazy_planner_class()(materialise, dedup_replicated_tensors=False, flatten_state_dict=False)
            writer = _writer_class()(str(checkpoint_dir), single_file_per_rank=True, thread_count=WRITER_THREADS)
            dcp.save(pyt, storage_writer=writer, planner=planner)

    return LazyTorchDistSaveStrategy()


class ChunkMaker:
    """``materialise(key, offset, shape)`` (a chunk's global offset and shape) for the lazy planner from an HF
    weight source: each chunk is read from exactly the HF rows it is made of (``HFWeightSource.read_rows``: a
    slice of a plain tensor, or the query groups / the gate or up half a TP chunk of a fused tensor holds).
    ``fresh``: {key: full tensor} for weights the HF model does not have (a new discriminator head)."""

    def __init__(self, source, fresh: Optional[dict] = None):
        self.source, self.fresh = source, fresh or {}

    def __call__(self, key: str, offset: tuple, shape: tuple) -> torch.Tensor:
        layer = None
        if key.startswith(LAYER_PREFIX):  # layers stacked on a leading axis; chunks hold one layer each
            if shape[0] != 1:
                raise RuntimeError(f"{key}: a chunk of {shape[0]} layers (expected one per chunk)")
            layer, offset, shape = offset[0], offset[1:], shape[1:]
        slices = tuple(slice(o, o + n) for o, n in zip(offset, shape))
        part = self.fresh[key][slices] if key in self.fresh else self.source.read_rows(key, layer, slices)
        return part.unsqueeze(0) if layer is not None else part

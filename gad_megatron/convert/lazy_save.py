"""hf-to-mcore without materialising the model: megatron's own ``dist_checkpointing.save`` of a model built on
the meta device, with a save strategy whose tensors are made from the HF files one chunk at a time, as the
writer asks for them.

Why: building the model and then saving it holds the whole model (plus megatron's writer's staging copy) in
memory -- 3.4 GiB for a 1B model, ~30 GiB per rank for 14B at TP1 -- and the writer waits for all of it. Here
megatron still plans the checkpoint (keys, global shapes, TP/PP chunks, replica de-duplication, common.pt,
metadata.json: the same files a real save writes), but every tensor chunk is read from the safetensors,
converted through the architecture's mapping (``mapping.to_mcore``) and written before the next one is made.
Peak memory is about one full per-layer tensor (a fused QKV / fc1 is built whole, then sliced per TP chunk)
plus the chunk being written, whatever the model's size.

Each rank of the TP*PP group writes its own chunks (its own ``__<rank>_0.distcp``), so conversion of a big model
spreads over the ranks srun starts.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch


def _lazy_planner_class():
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner

    class LazySavePlanner(MCoreSavePlanner):
        """megatron's save planner whose meta-device chunks are made on demand by ``materialise``."""

        def __init__(self, materialise: Callable, **kwargs):
            super().__init__(**kwargs)
            self.materialise = materialise

        def resolve_data(self, write_item):
            obj = self.lookup_object(write_item.index)
            if isinstance(obj, torch.Tensor) and obj.is_meta:
                t = self.materialise(write_item.index.fqn, tuple(write_item.index.offset), tuple(obj.shape),
                                     tuple(write_item.tensor_data.size))
                if tuple(t.shape) != tuple(obj.shape) or t.dtype != obj.dtype:
                    raise RuntimeError(f"{write_item.index.fqn} at {tuple(write_item.index.offset)}: made "
                                       f"{tuple(t.shape)} {t.dtype}, the checkpoint plans {tuple(obj.shape)} {obj.dtype}")
                return t
            return super().resolve_data(write_item)

    return LazySavePlanner


def _writer_class():
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Writer(FileSystemWriter):
        def storage_meta(self):
            # The directory as a plain string (as megatron's own writer records it): a path object would be
            # one more class for the metadata's allow-list (convert/safe_metadata.py) to accept.
            return StorageMeta(checkpoint_id=str(self.checkpoint_id), save_id=self.save_id)

    return Writer


def lazy_strategy(materialise: Callable):
    """A ``torch_dist`` (version 1) save strategy: megatron's key translation and planner, torch's serial
    file-system writer (one file per rank, one chunk resolved at a time)."""
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
            writer = _writer_class()(str(checkpoint_dir), single_file_per_rank=True, thread_count=1)
            dcp.save(pyt, storage_writer=writer, planner=planner)

    return LazyTorchDistSaveStrategy()


class ChunkMaker:
    """``materialise(key, offset, shape, global_shape)`` for the lazy planner from an HF weight source: a chunk
    of a plain-copy tensor is read as a slice of its safetensors entry; a fused one (QKV, gate+up) is built
    whole for its layer once (kept while the writer asks for that layer's other chunks) and sliced.
    ``fresh``: {key: full tensor} for weights the HF model does not have (a new discriminator head)."""

    def __init__(self, source, dtype: torch.dtype, fresh: Optional[dict] = None):
        from gad_megatron.convert.mapping import LAYER_PREFIX

        self.source, self.dtype, self.fresh = source, dtype, fresh or {}
        self._layer_prefix = LAYER_PREFIX
        self._cached = (None, None)

    def __call__(self, key: str, offset: tuple, shape: tuple, global_shape: tuple) -> torch.Tensor:
        layer = None
        if key.startswith(self._layer_prefix):  # layers stacked on a leading axis; chunks hold one layer each
            if shape[0] != 1:
                raise RuntimeError(f"{key}: a chunk of {shape[0]} layers (expected one per chunk)")
            layer, offset, shape, global_shape = offset[0], offset[1:], shape[1:], global_shape[1:]
        slices = tuple(slice(o, o + n) for o, n in zip(offset, shape))
        if key in self.fresh:
            part = self.fresh[key][slices]
        else:
            part = self.source.read_slice(key, layer, slices, global_shape)
            if part is None:
                if self._cached[0] != (key, layer):
                    self._cached = (None, None)  # let the previous one go before making the next
                    full = self.source(key, layer)
                    if tuple(full.shape) != tuple(global_shape):
                        raise ValueError(f"{key} (layer {layer}): source shape {tuple(full.shape)} != {global_shape}")
                    self._cached = ((key, layer), full)
                part = self._cached[1][slices]
        part = part.to(self.dtype).contiguous()
        return part.unsqueeze(0) if layer is not None else part

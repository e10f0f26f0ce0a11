"""Moving whole (un-sharded, per-layer) tensors in and out of a live TP/PP-sharded megatron model.

Which slice of a full tensor a rank holds is read from megatron's own ``sharded_state_dict`` metadata
(``global_offset`` and the local shape of every ShardedTensor, with SwiGLU factories expanded), so TP, PP and
VPP are handled in one place without per-layer knowledge of split axes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from gad_megatron.convert.hf_io import SafetensorsReader
from gad_megatron.models.mapping import LAYER_PREFIX, ArchMapping, expected_hf_tensors, mcore_row_sources
from gad_megatron.models.roles import D_ROLE


@dataclass
class LocalShard:
    key: str  # canonical checkpoint key
    layer: Optional[int]  # global layer index for decoder.layers.* keys
    data: torch.Tensor  # view of this rank's parameter storage
    slices: tuple  # where ``data`` sits inside the full per-layer tensor
    full_shape: tuple
    is_main_replica: bool
    # this rank's copy is a whole model's own (replica_id's pipeline entry 0: not the tied output layer of the
    # last stage), whatever its TP / DP copy index: what a weight sync into an engine led by this rank reads
    is_model_copy: bool = True


def _flatten(sd) -> Iterator:
    if isinstance(sd, dict):
        for v in sd.values():
            yield from _flatten(v)
    elif isinstance(sd, (list, tuple)):
        for v in sd:
            yield from _flatten(v)
    else:
        yield sd


def local_shards(chunks) -> list:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out = []
    for model in chunks:
        for obj in _flatten(model.sharded_state_dict()):
            pieces = obj.build() if isinstance(obj, ShardedTensorFactory) else [obj]
            if isinstance(obj, ShardedTensorFactory):
                whole = _whole_factory(obj, list(_flatten(pieces)))
                if whole is not None:
                    out.append(whole)
                    continue
            for st in _flatten(pieces):
                if not isinstance(st, ShardedTensor):
                    continue  # _extra_state objects and the like carry no weights
                p = st.prepend_axis_num
                layer = None
                if st.key.startswith(LAYER_PREFIX):
                    if p != 1:
                        raise RuntimeError(f"{st.key}: expected one stacked layer axis, got {p}")
                    layer = int(st.global_offset[0])
                offs = st.global_offset[p:]
                slices = tuple(slice(o, o + s) for o, s in zip(offs, st.data.shape))
                out.append(LocalShard(st.key, layer, st.data, slices, tuple(st.global_shape[p:]), _is_main(st),
                                      _is_main(st, model_copy=True)))
    return out


def _whole_factory(obj, pieces: list) -> Optional[LocalShard]:
    """A SwiGLU factory whose pieces make up the whole tensor (TP=1): one shard over the parameter itself,
    which is then already in the checkpoint's [gate; up] layout. Saves a copy per layer in weight sync."""
    p = pieces[0].prepend_axis_num
    full_shape = tuple(pieces[0].global_shape[p:])
    if tuple(obj.data.shape) != full_shape or sum(st.data.numel() for st in pieces) != obj.data.numel():
        return None
    layer = int(pieces[0].global_offset[0]) if obj.key.startswith(LAYER_PREFIX) else None
    return LocalShard(obj.key, layer, obj.data, tuple(slice(0, n) for n in full_shape), full_shape, _is_main(pieces[0]),
                      _is_main(pieces[0], model_copy=True))


def _is_main(st, model_copy: bool = False) -> bool:
    """megatron's replica_id is an int or a tuple (pipeline copy, TP copy, DP rank); the main replica is all
    zeros. ``model_copy``: only the pipeline entry is read (every TP and DP rank holds its model's copy)."""
    replica = st.replica_id if isinstance(st.replica_id, tuple) else (st.replica_id,)
    if model_copy and len(replica) == 3:
        replica = replica[:1]
    return all(r == 0 for r in replica)


@torch.no_grad()
def fill_model(chunks, source, skip_keys=()) -> int:
    """Copies into every local parameter its slice, ``source.read_rows(key, layer, slices)``; returns the count.
    Each rank reads only the rows its chunk is made of (the embedding and output layer at TP8 read 1/8 each; a
    TP chunk of a fused QKV / gate+up reads its own query groups / half)."""
    n = 0
    for sh in local_shards(chunks):
        if sh.key in skip_keys:
            continue
        part = source.read_rows(sh.key, sh.layer, sh.slices)
        if part.shape != sh.data.shape:  # copy_ would broadcast a wrong-sized source silently
            raise ValueError(f"{sh.key} (layer {sh.layer}): source slice {tuple(part.shape)} != {tuple(sh.data.shape)}")
        sh.data.copy_(part)
        n += 1
    return n


class HFWeightSource:
    """Megatron tensors (any chunk of one layer's) read from an HF safetensors checkpoint through the
    architecture's mapping."""

    def __init__(self, hf_dir: str, mapping: ArchMapping, arch, role: str = "student", reader=None):
        self.reader = reader or SafetensorsReader(hf_dir)
        self.mapping, self.arch, self.role = mapping, arch, role

    def validate(self) -> None:
        expected = expected_hf_tensors(self.mapping, self.arch, self.role)
        optional = []
        # Tied exporters may still write lm_head; a discriminator drops the LM head for its scalar head.
        if self.arch.tie_word_embeddings or self.role == D_ROLE:
            optional.append("lm_head.weight")
        if self.role == D_ROLE and not self.has_head():
            expected.pop("score.weight", None)  # a causal-LM checkpoint: the head starts fresh
        self.reader.validate(expected, self.mapping.ignore_suffixes, optional)

    def has_head(self) -> bool:
        return "score.weight" in self.reader.shapes

    def read_rows(self, key: str, layer: Optional[int], slices: tuple) -> torch.Tensor:
        """``[slices]`` of megatron tensor ``key`` (of ``layer``), from just the HF rows it is made of (a TP chunk
        of a fused QKV or gate+up reads its own query groups / its half, never the whole tensor)."""
        rule = self.mapping.rule_for(key, self.arch.tie_word_embeddings, self.role)
        rows, rest = slices[0], tuple(slices[1:])
        names = rule.hf_names(layer)
        parts = [self.reader.get_slice(names[i], (slice(a, b),) + rest)
                 for i, a, b in mcore_row_sources(rule, self.arch, rows.start, rows.stop)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def load_hf_into_model(chunks, source: HFWeightSource) -> int:
    """Fills the model from HF weights; a discriminator built from a causal LM keeps its freshly
    initialised head (there is no ``score.weight`` to read)."""
    fresh_head = source.role == D_ROLE and not source.has_head()
    return fill_model(chunks, source, skip_keys={"output_layer.weight"} if fresh_head else ())

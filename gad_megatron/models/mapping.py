"""Per-architecture facts, declared once: the HF <-> megatron-core name and layout mapping, the config quirks
each family refuses, and the registry of families.

One mapping serves every direction (``gad-convert`` both ways, loading HF weights into a live model, weight
sync to a rollout engine), so the directions cannot disagree. A rule relates one megatron *checkpoint* key
(the canonical ``sharded_state_dict`` key: TE-style names, layers stacked under ``decoder.layers.``) to one
or more HF tensors per layer, with a layout transform. TP/PP slicing is not described here: it is read from
megatron's own sharding metadata (``global_offset`` / ``local_shape`` of each ShardedTensor).

Each architecture family is one file in ``gad_megatron/models/families/`` defining ``MAPPING``: its weight
rules and the config fields it cannot honour (``check_config``). Both ``models/`` (building the megatron model
from an HF config) and ``convert/`` (moving weights) read it, so they cannot disagree.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from gad_megatron.models.roles import D_ROLE

LAYER_PREFIX = "decoder.layers."


@dataclass(frozen=True)
class Rule:
    """``mcore`` key <- ``hf`` names (``{i}`` = layer index) through ``kind``.

    kind: ``copy`` (one tensor, same layout), ``qkv`` (q, k, v -> megatron's fused QKV, interleaved per
    query group), ``gate_up`` (gate, up -> fused fc1, ``[gate; up]``).
    ``hf_shapes`` name each HF tensor's dims symbolically (resolved by :func:`dims`), so a mis-shaped input is
    caught before any compute.
    ``when``: ``tied`` / ``untied`` restricts a rule to one embedding setting.
    """

    mcore: str
    hf: tuple
    hf_shapes: tuple
    kind: str = "copy"
    when: Optional[str] = None

    @property
    def per_layer(self) -> bool:
        return self.mcore.startswith(LAYER_PREFIX)

    def hf_names(self, layer: Optional[int] = None) -> list:
        return [n.format(i=layer) for n in self.hf]


@dataclass(frozen=True)
class ArchMapping:
    model_type: str
    causal_lm_class: str
    seq_cls_class: str
    qkv_bias: bool
    qk_layernorm: bool
    rules: tuple
    # HF tensors that may appear in checkpoints and carry nothing (e.g. rotary caches of old exports).
    ignore_suffixes: tuple = field(default=(".rotary_emb.inv_freq",))
    # Family-specific config checks beyond the common ones: ``check_config(hf_cfg, bad)`` calls
    # ``bad(field, value, why)`` for a field this family cannot honour.
    check_config: Optional[Callable] = None
    # HF's modelling code for this family derives head_dim from hidden_size / heads (ignores a head_dim field).
    head_dim_from_hidden: bool = False

    def active_rules(self, tied: bool, role: str = "student") -> list:
        out = []
        for r in self.rules:
            if r.when == "tied" and not tied or r.when == "untied" and tied:
                continue
            if r.when == D_ROLE and role != D_ROLE:
                continue
            if role == D_ROLE and r.mcore == "output_layer.weight" and r.when != D_ROLE:
                continue
            out.append(r)
        return out

    def rule_for(self, mcore_key: str, tied: bool, role: str = "student") -> Rule:
        for r in self.active_rules(tied, role):
            if r.mcore == mcore_key:
                return r
        raise KeyError(f"{self.model_type}: no mapping rule for megatron tensor {mcore_key!r}")


def dims(arch) -> dict:
    return {
        "vocab": arch.vocab_size,
        "hidden": arch.hidden_size,
        "ffn": arch.ffn_hidden_size,
        "q_dim": arch.num_attention_heads * arch.kv_channels,
        "kv_dim": arch.num_query_groups * arch.kv_channels,
        "head_dim": arch.kv_channels,
        "one": 1,
    }


def expected_hf_tensors(mapping: ArchMapping, arch, role: str = "student") -> dict:
    """{hf name: shape} of a complete HF checkpoint for this architecture and role."""
    d = dims(arch)
    out = {}
    for r in mapping.active_rules(arch.tie_word_embeddings, role):
        layers = range(arch.num_layers) if r.per_layer else [None]
        for i in layers:
            for name, shape in zip(r.hf_names(i), r.hf_shapes):
                out[name] = tuple(d[s] for s in shape)
    return out


# ---- layout transforms -------------------------------------------------------------------------------------


def to_mcore(rule: Rule, hf_tensors: Sequence[torch.Tensor], arch) -> torch.Tensor:
    """The whole fused tensor: the reference form of each layout. Loaders and gad-convert read one chunk at a
    time through :func:`mcore_row_sources`, which the tests hold to this."""
    if rule.kind == "copy":
        return hf_tensors[0]
    if rule.kind == "gate_up":
        return torch.cat(list(hf_tensors), dim=0)
    if rule.kind == "qkv":
        q, k, v = hf_tensors
        ng, d = arch.num_query_groups, arch.kv_channels
        tail = q.shape[1:]
        q = q.reshape(ng, -1, *tail)  # [ng, (heads/ng)*d, ...]
        k = k.reshape(ng, d, *tail)
        v = v.reshape(ng, d, *tail)
        return torch.cat([q, k, v], dim=1).reshape(-1, *tail)
    raise ValueError(f"unknown rule kind {rule.kind!r}")


def to_hf(rule: Rule, full: torch.Tensor, arch) -> list:
    if rule.kind == "copy":
        return [full]
    if rule.kind == "gate_up":
        return list(torch.chunk(full, 2, dim=0))
    if rule.kind == "qkv":
        ng, d = arch.num_query_groups, arch.kv_channels
        qd = arch.num_attention_heads // ng * d
        tail = full.shape[1:]
        grouped = full.reshape(ng, qd + 2 * d, *tail)
        q, k, v = torch.split(grouped, [qd, d, d], dim=1)
        return [t.reshape(-1, *tail).contiguous() for t in (q, k, v)]
    raise ValueError(f"unknown rule kind {rule.kind!r}")


def mcore_row_sources(rule: Rule, arch, start: int, stop: int) -> list:
    """Where rows ``[start, stop)`` of ``rule``'s megatron tensor (one layer) come from, in order:
    [(index of the HF tensor in ``rule.hf``, its first row, its stop row)]. The same layouts as :func:`to_mcore`,
    for one TP chunk at a time: a converter can read just those rows instead of fusing the whole tensor."""
    if rule.kind == "copy":
        return [(0, start, stop)]
    if rule.kind == "gate_up":  # [gate; up]
        f = dims(arch)[rule.hf_shapes[0][0]]
        out = [(0, start, min(stop, f))] if start < f else []
        return out + ([(1, max(start, f) - f, stop - f)] if stop > f else [])
    if rule.kind == "qkv":  # per query group: [its q heads; its k head; its v head]
        ng, d = arch.num_query_groups, arch.kv_channels
        qd = arch.num_attention_heads // ng * d
        block = qd + 2 * d
        out = []
        for g in range(start // block, (stop - 1) // block + 1):
            base = g * block
            for idx, (lo, n, src) in enumerate(((0, qd, g * qd), (qd, d, g * d), (qd + d, d, g * d))):
                a, b = max(start, base + lo), min(stop, base + lo + n)
                if a < b:
                    out.append((idx, src + a - base - lo, src + b - base - lo))
        return out
    raise ValueError(f"unknown rule kind {rule.kind!r}")


# ---- registry ----------------------------------------------------------------------------------------------

_REGISTRY: dict = {}


def _load_registry() -> dict:
    if not _REGISTRY:
        # local: every family module imports this one (its Rule, ArchMapping); read on first use, not at import
        from gad_megatron.models import families as mappings

        for mod in pkgutil.iter_modules(mappings.__path__):
            m = importlib.import_module(f"{mappings.__name__}.{mod.name}")
            mp = getattr(m, "MAPPING", None)
            if mp is not None:
                _REGISTRY[mp.model_type] = mp
    return _REGISTRY


def mapping_for(model_type: str) -> ArchMapping:
    reg = _load_registry()
    if model_type not in reg:
        raise KeyError(f"model_type={model_type!r} has no mapping (supported: {', '.join(sorted(reg))})")
    return reg[model_type]


def supported_model_types() -> tuple:
    return tuple(sorted(_load_registry()))

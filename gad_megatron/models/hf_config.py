"""HF ``config.json`` -> the architecture facts megatron-core needs.

Architecture arguments are never typed by hand: everything comes from the HF config, and every field whose
value we cannot honour exactly raises :class:`UnsupportedConfigError` naming the field.
Both the transformers<5 spelling (``rope_theta`` / ``rope_scaling``) and the >=5 one (``rope_parameters``)
are read.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional

from gad_megatron.models.mapping import mapping_for, supported_model_types
from gad_megatron.runtime.outputs import read_json


class UnsupportedConfigError(ValueError):
    pass


# The only llama3 rope-scaling values megatron-core's GPTModel implements (fixed inside it, 0.16-0.19).
_MCORE_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass
class ArchSpec:
    """What the HF config says, in megatron terms."""

    model_type: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    max_position_embeddings: int
    norm_epsilon: float
    rotary_base: float
    rope_scaling: bool
    rope_scaling_factor: float
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_layernorm: bool
    init_method_std: float
    hf_config: dict = field(repr=False, default_factory=dict)

    @property
    def model_dims(self) -> dict:
        return {
            "num_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_query_groups": self.num_query_groups,
        }


def load_hf_config(path: str) -> dict:
    """Reads ``config.json`` (a directory or the file itself) as plain JSON: no remote code is ever run."""
    cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: no config.json")

    cfg = read_json(cfg_path, UnsupportedConfigError)
    if not isinstance(cfg, dict):
        raise UnsupportedConfigError(f"{cfg_path}: expected a JSON object")
    return cfg


_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def _rope(cfg: dict) -> tuple[float, Optional[dict]]:
    params = cfg.get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        scaling = None if rope_type in (None, "default") else params
        return float(theta), scaling
    scaling = cfg.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        scaling = None
    return float(cfg.get("rope_theta", 10000.0)), scaling


def arch_spec_from_hf(cfg: dict, source: str = "config.json") -> ArchSpec:
    mt = cfg.get("model_type")
    if mt not in supported_model_types():
        raise UnsupportedConfigError(
            f"{source}: model_type={mt!r} is not supported (supported: {', '.join(supported_model_types())})"
        )
    mapping = mapping_for(mt)

    def bad(field_name, value, why):
        raise UnsupportedConfigError(f"{source}: unsupported {field_name}={value!r} for {mt}: {why}")

    for key in _REQUIRED:
        if cfg.get(key) is None:
            raise UnsupportedConfigError(f"{source}: missing required field {key!r}")
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] <= 0:
            raise UnsupportedConfigError(f"{source}: {key}={cfg[key]!r} must be a positive integer")

    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        bad("hidden_act", act, "only silu (SwiGLU) is implemented")
    if cfg.get("attention_bias", False) and not mapping.qkv_bias:
        bad("attention_bias", cfg.get("attention_bias"), "biased q/k/v/o projections are not mapped")
    if cfg.get("mlp_bias", False):
        bad("mlp_bias", True, "biased MLP projections are not mapped")
    if cfg.get("use_sliding_window", False):
        bad("use_sliding_window", True, "sliding-window attention is not implemented")
    if mapping.check_config is not None:
        mapping.check_config(cfg, bad)
    if cfg.get("attention_dropout", 0.0):
        bad("attention_dropout", cfg.get("attention_dropout"), "only 0.0 is supported")

    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        bad("num_key_value_heads", kv_heads, f"must divide num_attention_heads={heads}")
    head_dim = cfg.get("head_dim")
    head_dim = int(head_dim) if head_dim else hidden // heads
    if mapping.head_dim_from_hidden and head_dim * heads != hidden:
        bad("head_dim", head_dim, f"{mt} requires hidden_size == heads * head_dim")

    theta, scaling = _rope(cfg)
    rope_scaling, rope_factor = False, 8.0
    if scaling is not None:
        rtype = scaling.get("rope_type", scaling.get("type"))
        if rtype != "llama3":
            bad("rope_scaling.rope_type", rtype, "only llama3 rope scaling is implemented")
        for k, want in _MCORE_LLAMA3_ROPE.items():
            got = scaling.get(k)
            if got is None or not math.isclose(float(got), want):
                bad(f"rope_scaling.{k}", got, f"megatron-core's llama3 rope scaling fixes it at {want}")
        rope_scaling, rope_factor = True, float(scaling.get("factor", 8.0))

    return ArchSpec(
        model_type=mt,
        num_layers=int(cfg["num_hidden_layers"]),
        hidden_size=hidden,
        ffn_hidden_size=int(cfg["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        kv_channels=head_dim,
        vocab_size=int(cfg["vocab_size"]),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        rotary_base=theta,
        rope_scaling=rope_scaling,
        rope_scaling_factor=rope_factor,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=mapping.qkv_bias,
        qk_layernorm=mapping.qk_layernorm,
        init_method_std=float(cfg.get("initializer_range", 0.02)),
        hf_config=cfg,
    )


def arch_spec_from_dir(path: str) -> ArchSpec:
    return arch_spec_from_hf(load_hf_config(path), source=os.path.join(path, "config.json"))

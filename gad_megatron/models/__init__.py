"""megatron-core models built from HF configs: student / reference GPT and the discriminator; the per-family
architecture facts (``families/``, ``mapping.py``), forward passes through megatron's schedules and the
vocab-parallel logprobs."""

from gad_megatron.models.hf_config import (
    ArchSpec,
    UnsupportedConfigError,
    arch_spec_from_dir,
    arch_spec_from_hf,
    load_hf_config,
)
from gad_megatron.models.gpt import ModelOptions, ModelOptionsError, build_gpt_chunks

__all__ = [
    "ArchSpec",
    "ModelOptions",
    "ModelOptionsError",
    "UnsupportedConfigError",
    "arch_spec_from_dir",
    "arch_spec_from_hf",
    "build_gpt_chunks",
    "load_hf_config",
]

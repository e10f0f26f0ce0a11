"""megatron-core GPTModel (student, frozen reference) and discriminator, built from an HF config alone."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from gad_megatron.models.hf_config import ArchSpec
from gad_megatron.models.norms import RMSNorm
from gad_megatron.models.storage import HF_DTYPE
from gad_megatron.runtime import on_cuda  # decided once by initialize (the CPU shim implies cpu)


class ModelOptionsError(ValueError):
    pass


@dataclass
class ModelOptions:
    """Switches that are not architecture: precision, FP8, memory savers, layer implementation."""

    dtype: str = "fp32"  # fp32 | bf16 | fp16
    transformer_impl: str = "auto"  # auto (TE when importable) | transformer_engine | local
    fp8: Optional[str] = None  # None | hybrid | e4m3
    fp8_recipe: str = "delayed"  # delayed | tensorwise | mxfp8
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"
    recompute_granularity: Optional[str] = None  # None | full | selective
    recompute_method: Optional[str] = None  # uniform | block (with full)
    recompute_num_layers: Optional[int] = None
    sequence_parallel: bool = False
    max_sequence_length: Optional[int] = None
    # False when every weight is about to be overwritten (conversion, loading a checkpoint): skips megatron's
    # random init, which on CPU dominates the time to build a model.
    perform_initialization: bool = True


_DTYPES = {ours: getattr(torch, hf) for ours, hf in HF_DTYPE.items()}


def te_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def use_transformer_engine(opts: ModelOptions) -> bool:
    if opts.transformer_impl == "local":
        if opts.fp8:
            raise ModelOptionsError("fp8 needs transformer_impl=transformer_engine (TE), not local")
        return False
    if opts.transformer_impl == "transformer_engine":
        if not te_available():
            raise ModelOptionsError("transformer_impl=transformer_engine but transformer_engine is not installed")
        return True
    if opts.transformer_impl != "auto":
        raise ModelOptionsError(f"transformer_impl={opts.transformer_impl!r}: use auto, transformer_engine or local")
    if opts.fp8 and not te_available():
        raise ModelOptionsError("fp8 requested but transformer_engine is not installed (pip install .[gpu])")
    # TE needs CUDA; on CPU the local spec is the only one that runs.
    return te_available() and on_cuda()


def _apex_wgrad_fusion() -> bool:
    return importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


def fusion_flags(use_te: bool, cuda: Optional[bool] = None) -> dict:
    """megatron's fusions, each on exactly where its kernel exists (decided once, from the device):
    - bias-SwiGLU and bias-dropout are torch.jit fusions: any CUDA device;
    - masked softmax and RoPE use TE's (or apex's) CUDA kernels: CUDA + TE;
    - gradient-accumulation fusion: TE's linears do it natively; the local spec needs apex's
      ``fused_weight_gradient_mlp_cuda``;
    - persistent layer norm is apex's LayerNorm kernel; these models use RMSNorm: always off.
    On CPU every fusion is off (the kernels do not exist there)."""
    cuda = on_cuda() if cuda is None else cuda
    return dict(
        bias_activation_fusion=cuda,
        bias_dropout_fusion=cuda,
        masked_softmax_fusion=cuda and use_te,
        apply_rope_fusion=cuda and use_te,
        gradient_accumulation_fusion=cuda and (use_te or _apex_wgrad_fusion()),
        persist_layer_norm=False,
    )


def transformer_config_kwargs(arch: ArchSpec, opts: ModelOptions, par_sizes: dict) -> dict:
    """Keyword arguments for megatron's TransformerConfig; split out so the FP8 plumbing is unit-testable
    on a machine without Transformer Engine."""
    if opts.dtype not in _DTYPES:
        raise ModelOptionsError(f"dtype={opts.dtype!r}: use one of {sorted(_DTYPES)}")
    if opts.fp8 not in (None, "hybrid", "e4m3"):
        raise ModelOptionsError(f"fp8={opts.fp8!r}: use hybrid or e4m3")
    if opts.fp8 and opts.fp8_recipe not in ("delayed", "tensorwise", "mxfp8"):
        raise ModelOptionsError(f"fp8_recipe={opts.fp8_recipe!r}: use delayed, tensorwise or mxfp8")
    if opts.recompute_granularity not in (None, "full", "selective"):
        raise ModelOptionsError(f"recompute_granularity={opts.recompute_granularity!r}: use full or selective")
    dtype = _DTYPES[opts.dtype]
    kw = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=arch.init_method_std,
        **fusion_flags(use_te=opts.transformer_impl == "transformer_engine"
                       or (opts.transformer_impl == "auto" and te_available())),
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        sequence_parallel=opts.sequence_parallel,
        use_cpu_initialization=not on_cuda(),
        perform_initialization=opts.perform_initialization,
        recompute_granularity=opts.recompute_granularity,
        recompute_method=opts.recompute_method,
        recompute_num_layers=opts.recompute_num_layers,
        **par_sizes,
    )
    if opts.recompute_granularity == "full" and opts.recompute_method is None:
        kw["recompute_method"] = "uniform"
        kw["recompute_num_layers"] = opts.recompute_num_layers or 1
    if opts.fp8:
        kw.update(
            fp8=opts.fp8,
            fp8_recipe=opts.fp8_recipe,
            fp8_amax_history_len=opts.fp8_amax_history_len,
            fp8_amax_compute_algo=opts.fp8_amax_compute_algo,
        )
    return kw


def build_transformer_config(arch: ArchSpec, opts: ModelOptions):
    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig

    par_sizes = dict(
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=ps.get_virtual_pipeline_model_parallel_world_size(),
        context_parallel_size=ps.get_context_parallel_world_size(),
    )
    return TransformerConfig(**transformer_config_kwargs(arch, opts, par_sizes))


def layer_spec(arch: ArchSpec, opts: ModelOptions):
    """TE layer spec (fused norms, FP8) when TE is used; otherwise megatron's local spec with our RMSNorm (and,
    on CPU, torch's fused attention as its core attention)."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if use_transformer_engine(opts):
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_layernorm)

    spec = specs.get_gpt_layer_local_spec(qk_layernorm=arch.qk_layernorm, normalization="RMSNorm")
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    if arch.qk_layernorm:
        spec.submodules.self_attention.submodules.q_layernorm = RMSNorm
        spec.submodules.self_attention.submodules.k_layernorm = RMSNorm
    if not on_cuda():  # torch's fused attention kernel, keys cached after RoPE (models/sdpa_attention.py)
        # local: CPU only, and it subclasses megatron-core's attention at import (megatron loads on first build)
        from gad_megatron.models.sdpa_attention import RopeCachedSelfAttention, SDPADotProductAttention

        spec.submodules.self_attention.module = RopeCachedSelfAttention
        spec.submodules.self_attention.submodules.core_attention = SDPADotProductAttention
    return spec


def _block_spec(spec, config, vp_stage):
    """The local spec's final norm must be our RMSNorm too, which needs an explicit block spec."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    if spec.submodules.input_layernorm is not RMSNorm:
        return spec  # TE spec: megatron picks TENorm for the final norm itself
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config, vp_stage), layer_norm=RMSNorm)


def _stages():
    """(pre_process, post_process, vp_stage) per model chunk of this pipeline rank."""
    from megatron.core import parallel_state as ps

    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    out = []
    for vp in range(vpp or 1):
        vp_stage = vp if vpp else None
        out.append(
            (
                ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                vp_stage,
            )
        )
    return out


def build_gpt_chunks(arch: ArchSpec, opts: Optional[ModelOptions] = None, parallel_output: bool = True):
    """The student / reference GPTModel as a list of model chunks (one per virtual pipeline stage)."""
    from megatron.core.models.gpt import GPTModel

    opts = opts or ModelOptions()
    config = build_transformer_config(arch, opts)
    spec = layer_spec(arch, opts)
    chunks = []
    for pre, post, vp_stage in _stages():
        model = GPTModel(
            config=config,
            transformer_layer_spec=_block_spec(spec, config, vp_stage),
            vocab_size=arch.vocab_size,
            max_sequence_length=opts.max_sequence_length or arch.max_position_embeddings,
            pre_process=pre,
            post_process=post,
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(arch.rotary_base) if float(arch.rotary_base).is_integer() else arch.rotary_base,
            rope_scaling=arch.rope_scaling,
            rope_scaling_factor=arch.rope_scaling_factor,
            vp_stage=vp_stage,
        )
        if on_cuda():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks


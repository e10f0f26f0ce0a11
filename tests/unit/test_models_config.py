"""HF config -> megatron config: architecture facts, FP8 / TE plumbing, switches (no process group needed)."""

import json
import subprocess
import sys

import pytest

from gad_megatron.models import ModelOptions, ModelOptionsError, arch_spec_from_dir
from gad_megatron.models.gpt import transformer_config_kwargs, use_transformer_engine

PAR = dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)


def test_arch_facts(hf_models):
    q2 = arch_spec_from_dir(hf_models["qwen2_tied"])
    assert (q2.qkv_bias, q2.qk_layernorm, q2.tie_word_embeddings) == (True, False, True)
    assert (q2.num_query_groups, q2.kv_channels, q2.rotary_base) == (2, 16, 10000.0)
    l31 = arch_spec_from_dir(hf_models["llama31"])
    assert (l31.rope_scaling, l31.rope_scaling_factor, l31.qkv_bias, l31.tie_word_embeddings) == (True, 8.0, False, False)
    q3 = arch_spec_from_dir(hf_models["qwen3"])
    assert (q3.qk_layernorm, q3.kv_channels, q3.hidden_size) == (True, 32, 64)  # head_dim != hidden/heads


def test_transformers4_config_spelling(hf_models, tmp_path):
    cfg = json.load(open(f"{hf_models['llama31']}/config.json"))
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp.pop("rope_theta")
    cfg["rope_scaling"] = rp
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    a = arch_spec_from_dir(str(tmp_path))
    assert (a.rotary_base, a.rope_scaling, a.rope_scaling_factor) == (500000.0, True, 8.0)


@pytest.mark.parametrize("fmt,recipe", [("hybrid", "delayed"), ("e4m3", "tensorwise"), ("e4m3", "mxfp8")])
def test_fp8_options_reach_transformer_config(hf_models, fmt, recipe):
    arch = arch_spec_from_dir(hf_models["qwen2_untied"])
    opts = ModelOptions(dtype="bf16", fp8=fmt, fp8_recipe=recipe, fp8_amax_history_len=16, transformer_impl="transformer_engine")
    kw = transformer_config_kwargs(arch, opts, PAR)
    assert (kw["fp8"], kw["fp8_recipe"], kw["fp8_amax_history_len"], kw["fp8_amax_compute_algo"]) == (fmt, recipe, 16, "max")
    assert kw["bf16"] and kw["params_dtype"].is_floating_point and kw["tensor_model_parallel_size"] == 2


def test_no_fp8_keys_without_fp8(hf_models):
    kw = transformer_config_kwargs(arch_spec_from_dir(hf_models["qwen3"]), ModelOptions(), PAR)
    assert "fp8" not in kw and kw["qk_layernorm"] and kw["kv_channels"] == 32 and not kw["add_qkv_bias"]


@pytest.mark.parametrize(
    "opts,pattern",
    [
        (ModelOptions(fp8="e5m2"), "fp8='e5m2'"),
        (ModelOptions(fp8="hybrid", fp8_recipe="blockwise"), "fp8_recipe='blockwise'"),
        (ModelOptions(dtype="fp8"), "dtype='fp8'"),
        (ModelOptions(recompute_granularity="layer"), "recompute_granularity='layer'"),
    ],
)
def test_bad_options(hf_models, opts, pattern):
    with pytest.raises(ModelOptionsError, match=pattern):
        transformer_config_kwargs(arch_spec_from_dir(hf_models["qwen3"]), opts, PAR)


def test_recompute_and_sp_switches(hf_models):
    kw = transformer_config_kwargs(arch_spec_from_dir(hf_models["qwen3"]),
                                   ModelOptions(recompute_granularity="full", sequence_parallel=True), PAR)
    assert (kw["recompute_granularity"], kw["recompute_method"], kw["recompute_num_layers"], kw["sequence_parallel"]) == ("full", "uniform", 1, True)


def test_layer_implementation_choice(monkeypatch):
    import gad_megatron.models.gpt as gpt

    monkeypatch.setattr(gpt, "te_available", lambda: False)
    assert use_transformer_engine(ModelOptions()) is False  # auto without TE: local spec
    with pytest.raises(ModelOptionsError, match="fp8 requested but transformer_engine is not installed"):
        use_transformer_engine(ModelOptions(fp8="hybrid"))
    with pytest.raises(ModelOptionsError, match="transformer_engine is not installed"):
        use_transformer_engine(ModelOptions(transformer_impl="transformer_engine"))
    with pytest.raises(ModelOptionsError, match="fp8 needs transformer_impl=transformer_engine"):
        use_transformer_engine(ModelOptions(transformer_impl="local", fp8="hybrid"))
    monkeypatch.setattr(gpt, "te_available", lambda: True)
    assert use_transformer_engine(ModelOptions(transformer_impl="transformer_engine")) is True


def test_cpu_shim_not_imported_by_library_imports():
    code = ("import sys, gad_megatron.models, gad_megatron.convert.api, gad_megatron.trainer.engine, "
            "gad_megatron.runtime; print('gad_megatron.runtime.cpu_shim' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_fusions_follow_the_device():
    """#8 item 7: every fusion on where its kernel exists (CUDA; TE for softmax / RoPE / wgrad), all off on
    CPU; the config built here (CPU) has them off."""
    from gad_megatron.models.gpt import fusion_flags

    names = ("bias_activation_fusion", "bias_dropout_fusion", "masked_softmax_fusion", "apply_rope_fusion",
             "gradient_accumulation_fusion")
    assert not any(fusion_flags(use_te=True, cuda=False).values())
    gpu_te = fusion_flags(use_te=True, cuda=True)
    assert all(gpu_te[n] for n in names) and gpu_te["persist_layer_norm"] is False
    gpu_local = fusion_flags(use_te=False, cuda=True)
    assert gpu_local["bias_activation_fusion"] and gpu_local["bias_dropout_fusion"]
    assert not gpu_local["masked_softmax_fusion"] and not gpu_local["apply_rope_fusion"]
    import torch

    from gad_megatron.models.gpt import ModelOptions, transformer_config_kwargs
    from gad_megatron.models.hf_config import arch_spec_from_hf

    arch = arch_spec_from_hf({"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                              "intermediate_size": 96, "vocab_size": 96, "num_key_value_heads": 2})
    kw = transformer_config_kwargs(arch, ModelOptions(), {})
    assert torch.cuda.is_available() or not any(kw[n] for n in names)


@pytest.mark.parametrize("name", ["qwen2_untied", "llama31", "qwen3"])
def test_row_sources_rebuild_every_row_range_of_the_fused_tensors(hf_models, name):
    """hf-to-mcore reads a TP chunk of a fused tensor from just its HF rows (``mcore_row_sources``); every row
    range of QKV (GQA groups, biases) and gate+up must come out as the same rows of ``to_mcore``'s fused tensor."""
    import torch

    from gad_megatron.models.mapping import dims, mapping_for, mcore_row_sources, to_mcore

    arch = arch_spec_from_dir(hf_models[name])
    d, fused = dims(arch), 0
    for rule in mapping_for(arch.model_type).rules:
        hf = [torch.randn(*(d[x] for x in shape)) for shape in rule.hf_shapes]
        full = to_mcore(rule, hf, arch)
        n = full.shape[0]
        fused += rule.kind != "copy"
        for a in range(0, n, 3):
            for b in range(a + 1, n + 1, 5):
                got = torch.cat([hf[i][x:y] for i, x, y in mcore_row_sources(rule, arch, a, b)])
                assert torch.equal(got, full[a:b]), (rule.mcore, a, b)
    assert fused >= 2

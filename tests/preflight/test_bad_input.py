"""Every bad input gets one clear error naming the file / tensor / field, before any compute, nothing written."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from gad_megatron.convert import api
from gad_megatron.convert.hf_io import CheckpointError
from gad_megatron.models.hf_config import UnsupportedConfigError, arch_spec_from_dir
from gad_megatron.runtime import LayoutError, ParallelConfig, validate_layout

from conftest import ROOT  # noqa: E402  (the repository root)


@pytest.fixture
def qwen(hf_models, tmp_path):
    d = tmp_path / "qwen"
    shutil.copytree(hf_models["qwen2_untied"], d)
    return d


def _rewrite(d, fn):
    t = load_file(str(d / "model.safetensors"))
    fn(t)
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})


def _edit_config(d, **kw):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(kw)
    (d / "config.json").write_text(json.dumps(cfg))


def test_missing_tensor(qwen):
    _rewrite(qwen, lambda t: t.pop("model.layers.2.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.2\.self_attn\.k_proj\.weight"):
        api.check_hf_input(str(qwen))


def test_extra_tensor(qwen):
    _rewrite(qwen, lambda t: t.__setitem__("model.layers.0.mlp.extra_proj.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.0\.mlp\.extra_proj\.weight"):
        api.check_hf_input(str(qwen))


def test_misshaped_tensor(qwen):
    _rewrite(qwen, lambda t: t.__setitem__("model.layers.1.mlp.up_proj.weight", torch.zeros(95, 64)))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has shape \[95, 64\], expected \[96, 64\]"):
        api.check_hf_input(str(qwen))


def test_truncated_shard(qwen):
    f = qwen / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated safetensors file"):
        api.check_hf_input(str(qwen))


def test_not_safetensors(qwen):
    (qwen / "model.safetensors").write_bytes(b"PK\x03\x04 this is a zip / pickle, not safetensors" * 4)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a safetensors file"):
        api.check_hf_input(str(qwen))


def test_pickle_only_checkpoint_is_refused(qwen):
    os.remove(qwen / "model.safetensors")
    (qwen / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors.*pytorch_model\.bin: pickle weights are never loaded"):
        api.check_hf_input(str(qwen))


def test_index_points_to_missing_shard(qwen):
    (qwen / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: listed in model\.safetensors\.index\.json but missing"):
        api.check_hf_input(str(qwen))


def test_unknown_model_type(qwen):
    _edit_config(qwen, model_type="gpt_neox")
    with pytest.raises(UnsupportedConfigError, match=r"config\.json: model_type='gpt_neox' is not supported"):
        arch_spec_from_dir(str(qwen))


@pytest.mark.parametrize(
    "field,value,pattern",
    [
        ("hidden_act", "gelu", r"unsupported hidden_act='gelu'"),
        ("use_sliding_window", True, r"unsupported use_sliding_window=True"),
        ("rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 2.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
         r"unsupported rope_scaling\.low_freq_factor=2\.0"),
        ("rope_parameters", {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0}, r"unsupported rope_scaling\.rope_type='yarn'"),
    ],
)
def test_unsupported_config_values(qwen, field, value, pattern):
    _edit_config(qwen, **{field: value})
    with pytest.raises(UnsupportedConfigError, match=pattern):
        arch_spec_from_dir(str(qwen))


def test_mistral_sliding_window_refused(hf_models, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(hf_models["mistral"], d)
    _edit_config(d, sliding_window=4096)
    with pytest.raises(UnsupportedConfigError, match=r"sliding_window=4096"):
        arch_spec_from_dir(str(d))


def test_layout_errors_name_every_problem():
    with pytest.raises(LayoutError) as e:
        validate_layout(ParallelConfig(tensor_parallel=4, pipeline_parallel=3), 8, num_layers=4,
                        num_attention_heads=6, num_query_groups=2)
    msg = str(e.value)
    assert "world size 8 is not divisible by TP*PP*CP = 4*3*1 = 12" in msg
    assert "num_attention_heads=6 is not divisible by TP=4" in msg
    assert "num_query_groups (num_key_value_heads)=2 is not divisible by TP=4" in msg
    assert "num_layers=4 is not divisible by PP*VPP = 3*1 = 3" in msg
    assert validate_layout(ParallelConfig(2, 2), 8, num_layers=4, num_attention_heads=4, num_query_groups=2) == 2


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "gad_megatron.convert.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli_bad_input_one_error_nothing_written(qwen, tmp_path):
    _rewrite(qwen, lambda t: t.pop("model.norm.weight"))
    out = tmp_path / "ckpt"
    r = _cli("hf-to-mcore", "--hf", str(qwen), "--out", str(out), "--tp", "2", "--pp", "2")
    assert r.returncode == 2
    assert "gad-convert: error:" in r.stderr and "missing tensors: model.norm.weight" in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists() and not list(tmp_path.glob("ckpt.tmp-*"))


def test_cli_bad_layout(hf_models, tmp_path):
    r = _cli("hf-to-mcore", "--hf", hf_models["qwen2_tied"], "--out", str(tmp_path / "c"), "--tp", "3")
    assert r.returncode == 2 and "num_attention_heads=4 is not divisible by TP=3" in r.stderr


def test_export_refuses_to_overwrite_and_leaves_no_temp(converted, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        api.mcore_to_hf(converted["qwen3"], str(out))
    assert not list(tmp_path.glob("exists.tmp-*"))


def test_export_of_a_non_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"gad_meta\.json: missing"):
        api.mcore_to_hf(str(tmp_path), str(tmp_path / "o"))

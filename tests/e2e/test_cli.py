"""gad-convert end to end, as a user runs it: convert, verify at another layout, export, load with transformers."""

import json
import os
import subprocess
import sys

import torch
import transformers

from conftest import ROOT  # noqa: E402  (the repository root)


def gad_convert(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "gad_megatron.convert.cli", *map(str, args)], capture_output=True,
                       text=True, env=env, timeout=timeout, start_new_session=True)
    assert r.returncode == 0, f"gad-convert {' '.join(map(str, args))} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r.stdout


def test_student_convert_verify_export(hf_models, tmp_path):
    hf = hf_models["qwen3"]
    ckpt, export = tmp_path / "ckpt", tmp_path / "export"
    out = gad_convert("hf-to-mcore", "--hf", hf, "--out", ckpt, "--tp", 2, "--pp", 1)
    assert "wrote" in out
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "0"
    assert (ckpt / "iter_0000000" / "metadata.json").exists() and (ckpt / "hf" / "config.json").exists()
    # each of the two ranks wrote its own shard files (two writer threads each), all holding tensor data
    shards = {p.name: p.stat().st_size for p in (ckpt / "iter_0000000").glob("*.distcp")}
    assert sorted(shards) == ["__0_0.distcp", "__0_1.distcp", "__1_0.distcp", "__1_1.distcp"], shards
    assert min(shards.values()) > 10_000, shards
    out = gad_convert("verify", "--hf", hf, "--ckpt", ckpt, "--tp", 1, "--pp", 2, "--tol", 1e-4, "--json", tmp_path / "v.json")
    assert "max |diff|" in out
    res = json.loads((tmp_path / "v.json").read_text())
    assert res["max_abs_diff"] <= 1e-4 and res["mean_abs_diff"] <= res["max_abs_diff"]
    gad_convert("mcore-to-hf", "--ckpt", ckpt, "--out", export)
    a = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    b = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    tokens = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(a(tokens).logits, b(tokens).logits)


def test_discriminator_exports_as_sequence_classifier(hf_models, tmp_path):
    hf = hf_models["llama31"]
    ckpt, export, ckpt2 = tmp_path / "d", tmp_path / "d_hf", tmp_path / "d2"
    gad_convert("hf-to-mcore", "--hf", hf, "--out", ckpt, "--tp", 2, "--pp", 2, "--role", "discriminator")
    gad_convert("mcore-to-hf", "--ckpt", ckpt, "--out", export)
    cfg = json.loads((export / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["num_labels"] == 1
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(export, dtype=torch.float32)
    assert tuple(rm.score.weight.shape) == (1, 64) and rm.score.weight.abs().sum() > 0
    # The megatron discriminator and the exported HF reward model give the same scores...
    out = gad_convert("verify", "--hf", export, "--ckpt", ckpt, "--tp", 2, "--pp", 1, "--tol", 1e-4)
    assert "role=discriminator" in out
    # ...and the export converts back (score.weight becomes the head again) at another layout.
    gad_convert("hf-to-mcore", "--hf", export, "--out", ckpt2, "--tp", 1, "--pp", 2, "--role", "discriminator")
    gad_convert("verify", "--hf", export, "--ckpt", ckpt2, "--tp", 1, "--pp", 1, "--tol", 1e-4)


def test_hf_to_mcore_memory_is_bounded_by_the_largest_tensor_not_the_model(tmp_path):
    """#8 item 8: hf-to-mcore's memory growth from just before the conversion to its peak (the resident set:
    its own tensors and the source pages it maps) stays within 2x the largest tensor + 256 MiB on a model whose
    weights alone are larger than that bound (building the model and then saving it would hold all of it)."""
    sys.path.insert(0, ROOT)
    from benchmarks.conversion import make_checkpoint
    from conftest import read_json, run_ranks

    hf, out, res = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "mem.json"
    info = make_checkpoint(str(hf), 16, hidden=1024, ffn=4096, heads=8, kv=2, vocab=32000)
    model_bytes = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
    bound = 2 * info["largest_tensor_bytes"] + 256 * 2**20
    assert model_bytes > 1.3 * bound  # the model could not fit the bound
    run_ranks(1, "convert_memory_worker.py", hf, out, res, timeout=300)
    r = read_json(res)
    growth = (r["peak_kb"] - r["before_kb"]) * 1024
    assert growth <= bound, (growth / 2**20, bound / 2**20, model_bytes / 2**20)
    gad_convert("verify", "--hf", hf, "--ckpt", out, "--tol", 1e-2, timeout=300)  # and it is the model

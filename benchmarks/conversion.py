#!/usr/bin/env python
"""Conversion throughput next to a plain file copy, measured side by side in one run.

Builds a ~1B-parameter synthetic HF checkpoint (Qwen2 shape, bf16) on disk, then times
  copy        : copying the same safetensors files (the I/O ceiling on this machine)
  hf-to-mcore : gad-convert at TP1PP1 (one process)
  mcore-to-hf : gad-convert streaming export
each in a fresh process, and prints seconds, GB/s, peak RSS, and the ratios to copy.
Goal (issue 2): conversion >= 0.5x copy bandwidth; peak RSS <= 2x largest tensor + 1 GiB.

    python benchmarks/conversion.py [--layers 18] [--workdir /tmp/gad-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_checkpoint(out: str, layers: int, hidden=1536, ffn=8960, heads=12, kv=2, vocab=151936,
                    dtype=torch.bfloat16) -> dict:
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    d = hidden // heads
    cfg = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": hidden, "intermediate_size": ffn,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True,
        "hidden_act": "silu", "torch_dtype": str(dtype).replace("torch.", ""), "use_sliding_window": False,
    }
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(dtype)

    shards, current, size, weight_map = [], {}, 0, {}

    def flush():
        nonlocal current, size
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(current, os.path.join(out, name), metadata={"format": "pt"})
        shards.append(name)
        weight_map.update({k: name for k in current})
        current, size = {}, 0

    def add(name, t):
        nonlocal size
        current[name] = t
        size += t.numel() * t.element_size()
        if size > 2 * 1024**3:
            flush()

    add("model.embed_tokens.weight", rnd(vocab, hidden))
    add("model.norm.weight", torch.ones(hidden, dtype=dtype))
    for i in range(layers):
        p = f"model.layers.{i}."
        add(p + "input_layernorm.weight", torch.ones(hidden, dtype=dtype))
        add(p + "post_attention_layernorm.weight", torch.ones(hidden, dtype=dtype))
        add(p + "self_attn.q_proj.weight", rnd(heads * d, hidden))
        add(p + "self_attn.k_proj.weight", rnd(kv * d, hidden))
        add(p + "self_attn.v_proj.weight", rnd(kv * d, hidden))
        add(p + "self_attn.q_proj.bias", rnd(heads * d))
        add(p + "self_attn.k_proj.bias", rnd(kv * d))
        add(p + "self_attn.v_proj.bias", rnd(kv * d))
        add(p + "self_attn.o_proj.weight", rnd(hidden, heads * d))
        add(p + "mlp.gate_proj.weight", rnd(ffn, hidden))
        add(p + "mlp.up_proj.weight", rnd(ffn, hidden))
        add(p + "mlp.down_proj.weight", rnd(hidden, ffn))
    if current:
        flush()
    # Rename to the HF convention now that the count is known.
    final = {}
    for k, name in enumerate(shards):
        new = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(os.path.join(out, name), os.path.join(out, new))
        final[name] = new
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: final[v] for k, v in weight_map.items()}}, f)
    n_params = sum(1 for _ in weight_map)
    largest = vocab * hidden * torch.empty((), dtype=dtype).element_size()
    return {"tensors": n_params, "largest_tensor_bytes": largest}


# Peak RSS is read from the child's own /proc/self/status VmHWM at exit: getrusage's ru_maxrss would also
# count the (large) parent's pages the child had between fork and exec.
_PEAK = (
    "import atexit, runpy, sys\n"
    "def _peak():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'): sys.stderr.write('PEAK_RSS_KB ' + line.split()[1] + '\\n')\n"
    "atexit.register(_peak)\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__') if sys.argv[0].endswith('.py') else "
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
)


def timed(args: list) -> tuple:
    """Runs ``python -m module args`` (or a script) in a child; returns (seconds, peak RSS bytes)."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    # Every step is timed until its bytes are on disk (sync after it; and before it, so no step inherits another's
    # write-back): a copy that leaves gigabytes in the page cache is not faster than a writer that fsyncs (as the
    # converters do before publishing), only earlier to return.
    os.sync()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _PEAK, *args], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    os.sync()
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(args)}\n{proc.stderr[-3000:]}")
    kb = [int(l.split()[1]) for l in proc.stderr.splitlines() if l.startswith("PEAK_RSS_KB ")]
    return dt, kb[-1] * 1024


def dir_bytes(path: str, suffix=(".safetensors", ".distcp")) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files if f.endswith(suffix))
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=18, help="18 layers of the Qwen2.5-1.5B shape ~= 1.07B params")
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds; the median of each step is shown")
    ap.add_argument("--workdir", default="/tmp/gad-bench-conversion")
    a = ap.parse_args()
    shutil.rmtree(a.workdir, ignore_errors=True)
    hf, ckpt, back, copy_dst = (os.path.join(a.workdir, n) for n in ("hf", "mcore", "hf_back", "copy"))
    tiny = os.path.join(a.workdir, "tiny")
    t0 = time.perf_counter()
    info = make_checkpoint(hf, a.layers)
    make_checkpoint(tiny, 1, hidden=64, ffn=128, heads=4, kv=2, vocab=256)
    nbytes = dir_bytes(hf)
    print(f"synthetic checkpoint: {nbytes / 1e9:.2f} GB ({nbytes / 2 / 1e9:.2f}B params, bf16), "
          f"largest tensor {info['largest_tensor_bytes'] / 2**20:.0f} MiB, built in {time.perf_counter() - t0:.0f}s")
    cli = ["gad_megatron.convert.cli"]

    def steps(src, tag):
        return [
            ("copy", [os.path.join(ROOT, "benchmarks", "copytree.py"), src, copy_dst + tag]),
            ("hf-to-mcore", cli + ["hf-to-mcore", "--hf", src, "--out", ckpt + tag]),
            ("mcore-to-hf", cli + ["mcore-to-hf", "--ckpt", ckpt + tag, "--out", back + tag]),
        ]

    times = {name: [] for name, _ in steps(hf, "")}
    start = {name: [] for name in times}
    rss = {name: 0 for name in times}
    for _ in range(a.repeats):  # alternate the steps, so slow phases of the machine hit all of them
        for (name, cmd), (_, tiny_cmd) in zip(steps(hf, ""), steps(tiny, "-tiny")):
            dt, peak = timed(cmd)
            times[name].append(dt)
            rss[name] = max(rss[name], peak)
            # Start-up: the same command on a one-layer model of 64 hidden units (imports, process group,
            # config checks; no bytes to speak of).
            start[name].append(timed(tiny_cmd)[0])
        for p in (ckpt, back, copy_dst, ckpt + "-tiny", back + "-tiny", copy_dst + "-tiny"):
            shutil.rmtree(p, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    st = {k: statistics.median(v) for k, v in start.items()}
    copy_gbs = nbytes / med["copy"] / 1e9
    copy_steady = nbytes / max(med["copy"] - st["copy"], 1e-9) / 1e9
    budget = 2 * info["largest_tensor_bytes"] + 2**30
    print(f"medians of {a.repeats} alternating rounds; every step timed until its bytes are on disk")
    print(f"{'step':<12} {'seconds':>8} {'start-up':>9} {'GB/s':>6} {'vs copy':>8} {'amortised':>10} {'peak RSS':>9} {'budget':>7}")
    for name in times:
        gbs = nbytes / med[name] / 1e9
        steady = nbytes / max(med[name] - st[name], 1e-9) / 1e9
        print(f"{name:<12} {med[name]:8.1f} {st[name]:8.1f}s {gbs:6.2f} {gbs / copy_gbs:8.2f} {steady / copy_steady:10.2f} "
              f"{rss[name] / 2**30:8.2f}G {budget / 2**30:6.2f}G")
    print("start-up share: " + ", ".join(f"{k} {st[k] / med[k]:.0%}" for k in times) +
          "  (amortised = GB/s with each step's start-up taken off, relative to copy's)")
    shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Tiny random HF models of every supported architecture, made locally (never downloaded)."""

from __future__ import annotations

import os

import torch

# name -> (config class name, model_type kwargs). Shapes are tiny but exercise GQA, TP=2 splits of heads and
# query groups, tied and untied embeddings, llama3 rope scaling and Qwen3's explicit head_dim + QK norms.
_COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    initializer_range=0.1,
)

ARCHS = {
    "qwen2_tied": ("Qwen2Config", dict(tie_word_embeddings=True, rope_theta=10000.0)),
    "qwen2_untied": ("Qwen2Config", dict(tie_word_embeddings=False, rope_theta=1000000.0)),
    "llama31": (
        "LlamaConfig",
        dict(
            tie_word_embeddings=False,
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8192,
            ),
        ),
    ),
    "llama32_tied": ("LlamaConfig", dict(tie_word_embeddings=True, rope_theta=500000.0)),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=True, head_dim=32, rope_theta=1000000.0)),
    "mistral": ("MistralConfig", dict(tie_word_embeddings=False, sliding_window=None, rope_theta=1000000.0)),
}


# vLLM's CPU attention supports head_dim >= 32: the rollout tests use this shape (GQA 4/2, TP=2 splittable).
VLLM_SHAPE = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=192)


def make_hf_model(name: str, out_dir: str, seed: int = 0, seq_cls: bool = False, dtype=torch.float32, **overrides) -> str:
    import transformers

    cls_name, extra = ARCHS[name]
    cfg = getattr(transformers, cls_name)(**{**_COMMON, **extra, **overrides})
    cfg.pad_token_id = 0
    if seq_cls:
        cfg.num_labels = 1
    torch.manual_seed(seed)
    auto = transformers.AutoModelForSequenceClassification if seq_cls else transformers.AutoModelForCausalLM
    model = auto.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    # Random (not default-initialised) norms and biases so a mis-mapped norm or bias shows up in the logits.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif n.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    os.makedirs(out_dir, exist_ok=True)
    model.to(dtype).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


from gad_megatron.data.demo import CHAT_TEMPLATE  # noqa: E402,F401  (the same template)
_CORPUS = [
    "the student learns from the teacher answers",
    "a discriminator scores each answer and the generator improves",
    "hello how are you today i am fine thanks",
    "write a short poem about the sea and the sky",
] * 8


def make_tokenizer(out_dir: str, vocab_size: int = 96) -> str:
    """A tiny BPE tokenizer trained locally (tokenizers library) with a chat template, saved HF-style."""
    from gad_megatron.data.demo import train_bpe_tokenizer

    return train_bpe_tokenizer(_CORPUS, out_dir, vocab_size, ["<pad>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"])


def hf_greedy(hf_dir: str, prompts: list, max_new_tokens: int) -> list:
    """HF transformers' greedy continuation of each token-id prompt (fp32, eager attention, no EOS stop):
    the reference every rollout engine is compared with."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    out = []
    for p in prompts:
        ids = model.generate(torch.tensor([p]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
        out.append(ids[0, len(p):].tolist())
    return out

"""The demo's tiny task, its scorer, and the tiny student made on the fly (nothing is downloaded).

The task (written for this project): short word-list instructions whose correct answer a program knows —

    repeat: fox red owl      -> fox red owl
    reverse: fox red owl     -> owl red fox
    first: fox red owl       -> fox
    last: fox red owl        -> owl
    count: fox red owl       -> three

The shipped teacher answers (``gad_megatron/assets/demo/teacher.jsonl``) are the correct answers, as a
strong teacher would give them; :func:`score` grades any answer against the rule (1.0 = exact, partial credit
by position-wise word overlap), so held-out quality is measured by a program, not a judge.
"""

from __future__ import annotations

import json
import os
import random

WORDS = ["fox", "owl", "cat", "dog", "bee", "elk", "yak", "ant", "red", "blue", "green", "gold", "gray", "pink",
         "sun", "moon", "star", "rain", "snow", "wind", "tree", "rock", "lake", "hill"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six"]
TASKS = ("repeat", "reverse", "first", "last", "count")
ASSET = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "demo", "teacher.jsonl")
SYSTEM = "Answer with the words only."


def answer(task: str, words: list) -> str:
    if task == "repeat":
        return " ".join(words)
    if task == "reverse":
        return " ".join(reversed(words))
    if task == "first":
        return words[0]
    if task == "last":
        return words[-1]
    if task == "count":
        return NUMBERS[len(words)]
    raise ValueError(f"unknown demo task {task!r}")


def parse_prompt(text: str) -> tuple:
    task, _, rest = text.partition(":")
    return task.strip(), rest.split()


def score(messages: list, response: str) -> float:
    """Scorer for ``eval.scorer``: the last user turn's rule answer vs ``response``; 1.0 for an exact answer,
    else the share of answer positions holding the right word (length mismatches count as wrong)."""
    task, words = parse_prompt(messages[-1]["content"])
    want, got = answer(task, words).split(), response.split()
    if got == want:
        return 1.0
    hits = sum(a == b for a, b in zip(want, got))
    return hits / max(len(want), len(got))


def make_rows(n: int, seed: int = 0) -> list:
    """``n`` distinct task rows with their correct answers, in gad-collect's row format."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        task = TASKS[len(rows) % len(TASKS)]
        words = rng.sample(WORDS, rng.randint(2, 4))
        prompt = f"{task}: {' '.join(words)}"
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"id": f"demo-{len(rows):04d}", "messages": [{"role": "system", "content": SYSTEM},
                                                                  {"role": "user", "content": prompt}],
                     "teacher_response": answer(task, words), "model": "rule-teacher"})
    return rows


def write_rows(path: str, n: int = 384, seed: int = 0) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in make_rows(n, seed):
            f.write(json.dumps(r) + "\n")
    return path


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_bpe_tokenizer(corpus: list, out_dir: str, vocab_size: int, specials: list) -> str:
    """A byte-level BPE tokenizer (HF ``tokenizers``) trained locally on ``corpus``, whose alphabet is only
    the corpus' characters (so a tiny vocabulary suffices), saved HF-style with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    alphabet = sorted(set("".join(corpus)))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=[c if c != " " else "\u0120" for c in alphabet])
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|end|>")
    fast.chat_template = CHAT_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir


def make_tokenizer(out_dir: str, vocab_size: int = 160) -> str:
    """The demo's tokenizer: large enough that every task word (with its leading space) is one token."""
    rng = random.Random(1)
    corpus = [SYSTEM] * 4 + [f"{t}: {' '.join(rng.sample(WORDS, 4))}" for t in TASKS for _ in range(40)]
    corpus += [" ".join(rng.sample(WORDS + NUMBERS, 5)) for _ in range(200)]
    return train_bpe_tokenizer(corpus, out_dir, vocab_size,
                               ["<pad>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"])


def make_student(out_dir: str, seed: int = 0) -> str:
    """A tiny random Qwen2 student with the demo tokenizer (vLLM's CPU attention needs head_dim >= 32)."""
    import torch
    import transformers

    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    tmp = out_dir + ".tmp"
    make_tokenizer(tmp)
    tok = transformers.AutoTokenizer.from_pretrained(tmp)
    cfg = transformers.Qwen2Config(vocab_size=192, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=10000.0,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                   bos_token_id=None)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(tmp, safe_serialization=True)
    gen = os.path.join(tmp, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)  # no sampling defaults baked in: the trainer's config decides
    os.replace(tmp, out_dir)
    return out_dir

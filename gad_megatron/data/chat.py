"""Chat formatting, applied in exactly one place.

The rollout engine receives token ids, never text, and the trainer reads the same ids, so the student's chat
template (``tokenizer.apply_chat_template``) is applied identically on both sides by construction.
"""

from __future__ import annotations

from typing import Sequence


def prompt_ids(tokenizer, messages: Sequence[dict]) -> list:
    """Token ids of a conversation up to the assistant's turn (the generation prompt)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template")
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def d_view(tokenizer, token_ids: Sequence[int], finished: bool, canonical: bool = True) -> list:
    """A student sample as the discriminator sees it: its text re-encoded exactly as the teacher's answers are
    (:func:`response_ids`), closed by the one end token when it finished and left open when it was cut off.
    A sampled tokenisation the canonical encoder would not produce, or an end token written differently,
    would let D tell student from teacher without reading the content. ``canonical`` False
    (``reward.canonical_text=false``, the paper's way): the sampled tokens as they are."""
    if not canonical:
        return list(token_ids)
    text = tokenizer.decode(list(token_ids), skip_special_tokens=True)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    return ids + ([eos] if finished and eos is not None else [])


def response_ids(tokenizer, text: str) -> list:
    """A teacher answer as the student's tokens, closed by the end-of-turn token (what SeqKD trains on)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return list(ids) + ([eos] if eos is not None else [])

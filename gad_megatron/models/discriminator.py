"""The GAD discriminator: the student's GPT with its vocabulary head replaced by a scalar head.

The sequence score is the head applied to the final hidden state of the *last real token* of
``[prompt, response]`` (paper, Sec. 3). The head is a ``RowParallelLinear(hidden -> 1)``: each TP rank holds
``hidden/TP`` columns of the ``[1, hidden]`` weight and the partial dot products are all-reduced, so the head
is TP-aware without replicating it. Its checkpoint key is ``output_layer.weight``; exported to HF it becomes
``score.weight`` of ``*ForSequenceClassification`` (num_labels=1), a standard reward-model layout.

Initialisation (``head_init``): ``normal`` (default) draws N(0, init_method_std^2) like any megatron linear, so
early scores are small but the backbone gets gradient from step one; ``zero`` starts every score at exactly 0
(the backbone then receives no gradient until the head has moved).

Precision: the head's weight and its input are fp32 whatever the model dtype. In bf16 a score is rounded to
steps of |s|/256, which is coarser than the differences D has to rank; the Bradley-Terry loss, d_acc and
GRPO's group-normalised advantages would see rounding (ties, and noise blown up to full-size advantages).
The trunk stays in the model dtype; only the last hidden state is cast (one [tokens, hidden] copy).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from gad_megatron.models.gpt import ModelOptions, build_gpt_chunks


def _scalar_head_class():
    from megatron.core.tensor_parallel import RowParallelLinear
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    class ScalarHead(RowParallelLinear):
        def __init__(self, config, init_method):
            # The head sees the full sequence: gather it ourselves (below) and keep the head itself non-SP,
            # otherwise RowParallelLinear would reduce-scatter the scores along the sequence.
            self._gather_sp = config.sequence_parallel
            # The head is initialised even when the backbone skips init (it is about to be loaded): a
            # discriminator made from a causal LM has no head weights to load.
            head_config = dataclasses.replace(config, sequence_parallel=False, perform_initialization=True)
            super().__init__(
                config.hidden_size,
                1,
                config=head_config,
                init_method=init_method,
                bias=False,
                input_is_parallel=False,
                skip_bias_add=True,
                is_expert=False,
            )

        def forward(self, hidden_states, weight=None, runtime_gather_output=None):
            if self._gather_sp:
                hidden_states = gather_from_sequence_parallel_region(hidden_states)
            scores, _ = super().forward(hidden_states.float())  # fp32 head on an fp32 copy (see above)
            return scores, None

    return ScalarHead


def build_discriminator_chunks(arch, opts: Optional[ModelOptions] = None, head_init: str = "normal"):
    """GPT chunks whose last stage ends in the scalar head; forward returns per-token scores ``[b, s, 1]``.

    Use :func:`sequence_scores` to take the score at each sequence's last real token.
    """
    from megatron.core.utils import init_method_normal

    if head_init not in ("normal", "zero"):
        raise ValueError(f"head_init={head_init!r}: use normal or zero")
    # D never ties its head to the embedding (the head is not a vocabulary projection).
    d_arch = dataclasses.replace(arch, tie_word_embeddings=False)
    chunks = build_gpt_chunks(d_arch, opts)
    ScalarHead = _scalar_head_class()
    for model in chunks:
        if not model.post_process:
            continue
        init = init_method_normal(arch.init_method_std) if head_init == "normal" else torch.nn.init.zeros_
        head = ScalarHead(model.config, init)
        ref = model.output_layer.weight
        model.output_layer = head.to(device=ref.device, dtype=torch.float32)
    return chunks


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each right-padded row (``attention_mask`` 1 = real, 0 = pad)."""
    lengths = attention_mask.long().sum(dim=1)
    if bool((lengths == 0).any()):
        raise ValueError("a sequence in the batch has no real token (attention_mask all zero)")
    return lengths - 1


def sequence_scores(per_token_scores: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[b, s, 1]`` per-token head outputs -> ``[b]`` scores at the last real token."""
    idx = last_token_index(attention_mask).to(per_token_scores.device)
    return per_token_scores[torch.arange(per_token_scores.shape[0], device=idx.device), idx, 0]

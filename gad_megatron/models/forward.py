"""Forward / backward through megatron-core's pipeline schedules for the student and the discriminator.

Every rank of a model-parallel group receives the same micro-batches (dicts of ``[b, s]`` tensors); the
schedule decides which stage reads tokens and which computes the loss.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from gad_megatron.models.discriminator import sequence_scores
from gad_megatron.models.logprobs import vocab_parallel_logprobs
from gad_megatron.runtime.parallel import model_forward_region


def position_ids_for(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def _config(chunks):
    """The TransformerConfig of model chunks, DDP-wrapped or not."""
    return (chunks[0].module if hasattr(chunks[0], "module") else chunks[0]).config


def run_schedule(chunks, microbatches: list, step_fn: Callable, forward_only: bool) -> list:
    """``step_fn(model, batch) -> (output_tensor, loss_func)``; returns the last stage's loss_func outputs."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tokens = microbatches[0]["tokens"]
    shapes = {tuple(mb["tokens"].shape) for mb in microbatches}
    config = _config(chunks)
    # Micro-batches padded each to its own length: megatron then exchanges activation shapes between
    # pipeline stages before each transfer (variable_seq_lengths); with one shape it keeps the cheaper path.
    config.variable_seq_lengths = len(shapes) > 1
    tp = ps.get_tensor_model_parallel_world_size()
    bad = [s for s in shapes if config.sequence_parallel and s[1] % tp]
    if bad:
        raise ValueError(f"'tokens' sequence length {bad[0][1]} must be a multiple of TP={tp} with sequence parallel")
    iters = [iter(microbatches) for _ in chunks]

    def forward_step(data_iterator, model):
        return step_fn(model, next(data_iterator))

    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iters if len(chunks) > 1 else iters[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(microbatches),
        seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0],
        forward_only=forward_only,
    )


def packed_params(batch: dict, device):
    """megatron's THD description of a packed micro-batch (``cu_seqlens``: sequence bounds in its one row), or
    None for a padded one."""
    cu = batch.get("cu_seqlens")
    if cu is None:
        return None
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu.to(device=device, dtype=torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                           max_seqlen_kv=longest)


def model_call(model, batch, labels=None):
    """Runs one chunk on a micro-batch; batches live on CPU and move to the model's device here."""
    dev = next(model.parameters()).device
    t = batch["tokens"].to(dev)
    pos = batch.get("position_ids")
    pos = position_ids_for(t) if pos is None else pos.to(dev)
    packed = packed_params(batch, dev)
    with model_forward_region():
        return model(t, pos, None, labels=None if labels is None else labels.to(dev),
                     **({"packed_seq_params": packed} if packed is not None else {}))


def full_logits(chunks, microbatches: list) -> Optional[list]:
    """Full-vocabulary logits ``[b, s, V]`` per micro-batch on the last pipeline stage; None elsewhere."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    def step(model, batch):
        out = model_call(model, batch)

        def loss_func(logits):
            return logits.sum() * 0.0, {"logits": gather_from_tensor_model_parallel_region(logits).detach()}

        return out, loss_func

    with torch.no_grad():
        out = run_schedule(chunks, microbatches, step, forward_only=True)
    if not ps.is_pipeline_last_stage():
        return None
    return [o["logits"] for o in out]


def discriminator_scores(chunks, microbatches: list) -> Optional[list]:
    """``[b]`` sequence scores per micro-batch on the last stage (None elsewhere)."""
    from megatron.core import parallel_state as ps

    def step(model, batch):
        out = model_call(model, batch)

        def loss_func(per_token):
            return per_token.sum() * 0.0, {"scores": sequence_scores(per_token, batch["attention_mask"]).detach()}

        return out, loss_func

    with torch.no_grad():
        out = run_schedule(chunks, microbatches, step, forward_only=True)
    if not ps.is_pipeline_last_stage():
        return None
    return [o["scores"] for o in out]


def token_logprobs(chunks, sequences: list, pad_id: int = 0, temperature: float = 1.0) -> Optional[list]:
    """Collective. ``log p(tok_t | tok_<t)`` for t = 1..len-1 of each token-id sequence under
    ``softmax(logits / temperature)``, computed vocab-parallel (the full vocabulary is never gathered).
    Returns the list on the last pipeline stage."""
    from megatron.core import parallel_state as ps

    if not sequences:
        raise ValueError("token_logprobs: no sequences")
    width = max(len(s) for s in sequences)
    tp = ps.get_tensor_model_parallel_world_size()
    if _config(chunks).sequence_parallel and width % tp:
        width += tp - width % tp
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        tokens[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)

    labels = torch.zeros_like(tokens)
    labels[:, :-1] = tokens[:, 1:]

    def step(model, batch):
        out = model_call(model, batch)

        def loss_func(logits):
            lp = vocab_parallel_logprobs(logits, batch["labels"], temperature).detach()
            return lp.sum() * 0.0, {"logp": lp.cpu()}

        return out, loss_func

    with torch.no_grad():
        out = run_schedule(chunks, [{"tokens": tokens, "labels": labels}], step, forward_only=True)
    if not ps.is_pipeline_last_stage():
        return None
    lp = out[0]["logp"].double()
    return [lp[i, : len(s) - 1] for i, s in enumerate(sequences)]

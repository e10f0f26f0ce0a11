"""Rollouts on the trainer's live megatron GPT with megatron-core's KV cache (``StaticInferenceContext``).

The engine drives ``GPTModel.forward(..., inference_context=ctx)`` itself: megatron-core's static inference
engine refuses pipeline parallelism on CPU, samples one ``SamplingParams`` per batch and reports raw-logit
logprobs; its dynamic engine needs flash-attn. One ``generate`` call:

- groups the samples (shortest prompts first) into batches whose KV cache holds at most ``max_batch_tokens``
  tokens (rows x (longest prompt + max_tokens)); each batch prefills its prompts once, then copies their cache
  rows to their samples (a prompt's n samples are split over batches when they do not fit in one);
- decodes every sample of the batch one token per forward, sampling on the device (``rollout.sampling``:
  temperature, top-k, top-p, one seed per sample) with the logprobs of the sampling temperature;
- drops finished rows from the cache once a quarter of the batch has finished;
- frees the cache at the end of each batch (``kv_cache_bytes`` in ``last_stats`` says how much it took).

Prompts of different lengths share one cache offset. With megatron's local attention they are left-padded and
the pads masked (one prefill, exact because RoPE is relative); Transformer Engine's attention ignores a custom
mask, so with TE layers they are right-padded instead: prefill the shortest prompt's length, then rows still in
their prompt are fed their own next prompt token while the others sample (no mask at all).

Parallelism: every rank of a model-parallel group calls ``generate`` with the same prompts. Pipeline stages pass
hidden states point to point; the last stage samples (its TP ranks hold identical gathered logits and sample
alike) and broadcasts the tokens along the pipeline. The weights are the trainer's own parameters: no sync, no
copy.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Optional, Sequence

import torch

from gad_megatron.rollout.base import RolloutEngine, Sample, SamplingConfig
from gad_megatron.rollout.reforward_engine import ReforwardEngine
from gad_megatron.rollout.sampling import sample_seeds, sample_tokens
from gad_megatron.runtime.parallel import comm_device, model_forward_region


def _uses_transformer_engine(model) -> bool:
    return any(type(m).__module__.startswith("megatron.core.extensions.transformer_engine") for m in model.modules())


@contextmanager
def _inference_mode(model):
    """eval() (megatron gates its inference path on ``not training``), sequence parallelism off (decode runs one
    token per row) and, on megatron-core >= 0.18, its process-wide InferenceMode flag; all restored after."""
    from megatron.core.transformer.utils import set_model_to_sequence_parallel

    was_training, sp = model.training, model.config.sequence_parallel
    mode = getattr(__import__("megatron.core.inference.utils", fromlist=["x"]), "InferenceMode", None)
    model.eval()
    if sp:
        set_model_to_sequence_parallel(model, False)
    try:
        with (mode.active() if mode is not None and hasattr(mode, "active") else nullcontext()), torch.no_grad():
            yield
    finally:
        if sp:
            set_model_to_sequence_parallel(model, True)
        model.train(was_training)


class _Batch:
    """The rows (samples) of one batch on the host: which prompt and sample each is, what it has generated."""

    def __init__(self, rows: list, prompts: Sequence, seed: Optional[int]):
        self.pairs = rows  # (prompt index, sample index) per row
        self.prompt_ids = list(dict.fromkeys(pi for pi, _ in rows))  # prefilled once each, in this order
        where = {pi: k for k, pi in enumerate(self.prompt_ids)}
        self.expand = torch.tensor([where[pi] for pi, _ in rows])  # row -> its prompt's prefill row
        self.prompt_of = torch.tensor([pi for pi, _ in rows])
        self.sample_of = torch.tensor([j for _, j in rows])
        self.seeds = sample_seeds(seed, self.prompt_of, self.sample_of)
        self.lengths = torch.tensor([len(prompts[pi]) for pi, _ in rows])
        self.rows = list(range(len(rows)))  # live row -> row index in this batch
        self.tokens = [[] for _ in rows]
        self.logprobs = [[] for _ in rows]
        self.finish = ["length"] * len(rows)

    def keep(self, live: torch.Tensor) -> None:
        idx = live.nonzero().squeeze(-1)
        self.rows = [self.rows[i] for i in idx.tolist()]
        for name in ("prompt_of", "sample_of", "seeds", "lengths"):
            setattr(self, name, getattr(self, name)[idx])

    def samples(self) -> list:
        return [((pi, j), Sample(pi, self.tokens[r], self.logprobs[r], self.finish[r]))
                for r, (pi, j) in enumerate(self.pairs)]


class MegatronEngine(RolloutEngine):
    collective = True  # every rank of the model-parallel group calls generate (and gets the same samples)
    live_weights = True  # the trainer's own parameters: no sync, no copy

    @classmethod
    def build(cls, inputs) -> RolloutEngine:
        return make_megatron_engine(inputs.chunks, inputs.max_batch_tokens)

    def __init__(self, chunks: list, max_batch_tokens: int = 1 << 17):
        if len(chunks) != 1:
            raise ValueError("the KV-cached megatron engine drives one model chunk per rank; with virtual pipeline "
                             "stages use rollout.reforward_engine.ReforwardEngine")
        self.model = chunks[0].module if hasattr(chunks[0], "module") else chunks[0]
        self.max_batch_tokens = int(max_batch_tokens)
        self.masked = not _uses_transformer_engine(self.model)  # TE's attention ignores a custom mask
        self.last_stats: dict = {}

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> list:
        if any(len(p) == 0 for p in prompts):
            raise ValueError("megatron engine: an empty prompt (at least one token is needed)")
        self.last_stats = {"kv_cache_bytes": 0, "batches": 0, "forwards": 0}
        groups = [[None] * sampling.n for _ in prompts]
        with _inference_mode(self.model):
            for rows in self._batches(prompts, sampling):
                for (pi, j), sample in self._generate_batch(rows, prompts, sampling):
                    groups[pi][j] = sample
        if next(self.model.parameters()).is_cuda:
            torch.cuda.empty_cache()  # the cache is gone: give its blocks back before training
        return groups

    def _batches(self, prompts, sampling) -> list:
        """Batches of (prompt index, sample index) rows, shortest prompts first, each holding at most
        ``max_batch_tokens`` cache tokens (rows x (longest prompt + max_tokens)), and at least one row: a prompt's
        n samples share a batch when they fit and are split over several when they do not."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        batches, cur = [], []
        for i in order:
            width = len(prompts[i]) + sampling.max_tokens  # the longest so far: prompts are sorted
            for j in range(sampling.n):
                if cur and (len(cur) + 1) * width > self.max_batch_tokens:
                    batches.append(cur)
                    cur = []
                cur.append((i, j))
        return batches + [cur] if cur else batches

    def _generate_batch(self, pairs: list, prompts, sampling: SamplingConfig) -> list:
        from megatron.core.inference.contexts import StaticInferenceContext

        T = sampling.max_tokens
        rows = _Batch(pairs, prompts, sampling.seed)
        prompt_ids = rows.prompt_ids
        lengths = [len(prompts[i]) for i in prompt_ids]
        longest, shortest = max(lengths), min(lengths)
        width = longest if self.masked else shortest
        dev = next(self.model.parameters()).device
        ctx = StaticInferenceContext(len(prompt_ids), longest + T)
        # The prompt tokens by cache slot: left-aligned at the end (masked) or right-padded from slot 0.
        slots = torch.zeros(len(prompt_ids), longest + T, dtype=torch.long)
        for r, i in enumerate(prompt_ids):
            start = longest - lengths[r] if self.masked else 0
            slots[r, start:start + lengths[r]] = torch.tensor(list(prompts[i]), dtype=torch.long)
        valid = (torch.arange(longest + T) >= (longest - torch.tensor(lengths)).unsqueeze(1)) if self.masked else None
        try:
            logits = self._forward(slots[:, :width], ctx, valid, 0)
            expand = rows.expand
            self._select_rows(ctx, expand.to(dev))
            slots, logits = slots[expand], None if logits is None else logits[expand.to(logits.device)]
            valid = None if valid is None else valid[expand]
            self.last_stats["kv_cache_bytes"] = max(self.last_stats["kv_cache_bytes"], _cache_bytes(ctx))
            slot, done = width, torch.zeros(len(rows.rows), dtype=torch.bool)
            while True:
                generating = rows.lengths <= slot  # right-padded rows still in their prompt are fed, not sampled
                nxt = self._next_tokens(logits, sampling, rows, generating, slots[:, slot])
                for r in (generating & ~done).nonzero().squeeze(-1).tolist():
                    b = rows.rows[r]
                    rows.tokens[b].append(int(nxt[0, r]))
                    rows.logprobs[b].append(float(nxt[1, r]))
                    if int(nxt[0, r]) in sampling.stop_token_ids:
                        done[r], rows.finish[b] = True, "stop"
                    elif len(rows.tokens[b]) >= T:
                        done[r] = True
                if bool(done.all()):
                    break
                if int(done.sum()) * 4 >= len(done):  # drop finished rows: their cache rows are dead weight
                    live = ~done
                    rows.keep(live)
                    self._select_rows(ctx, live.nonzero().squeeze(-1).to(dev))
                    slots, done = slots[live], done[live]
                    valid = None if valid is None else valid[live]
                    nxt = nxt[:, live]
                slots[:, slot] = nxt[0].long()
                logits = self._forward(slots[:, slot:slot + 1], ctx, valid, slot)
                slot += 1
        finally:
            ctx.key_value_memory_dict.clear()  # the cache's only reference: freed here, not at the next rollout
        self.last_stats["batches"] += 1
        return rows.samples()

    def _next_tokens(self, logits, sampling, rows: _Batch, generating, prompt_tokens) -> torch.Tensor:
        """``[2, rows]`` float64 (token ids, logprobs) on every stage: sampled on the last stage, where rows still
        inside their prompt take their prompt token, then broadcast along the pipeline."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        comm = comm_device()
        out = torch.zeros(2, len(rows.rows), dtype=torch.float64, device=comm)
        if logits is not None:
            step = torch.tensor([len(rows.tokens[b]) for b in rows.rows])
            tokens, logprobs = sample_tokens(logits, sampling, rows.seeds.to(logits.device), step.to(logits.device))
            if prompt_tokens is not None and not bool(generating.all()):
                tokens = torch.where(generating.to(tokens.device), tokens, prompt_tokens.to(tokens.device))
            out[0], out[1] = tokens.to(comm, torch.float64), logprobs.to(comm, torch.float64)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(out, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
        return out.cpu()

    def _forward(self, tokens: torch.Tensor, ctx, valid: Optional[torch.Tensor], offset: int):
        """One pipeline pass of ``tokens`` [b, s] written at cache slots ``offset..offset+s-1``; ``[b, V]`` fp32
        logits of the last position on the last stage, None elsewhere."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        model, (b, s) = self.model, tokens.shape
        dev = next(model.parameters()).device
        mask = None if valid is None else _attention_mask(valid, offset, s).to(dev)
        if not ps.is_pipeline_first_stage():
            buf = torch.empty(s, b, model.config.hidden_size, dtype=model.config.pipeline_dtype, device=comm_device())
            dist.recv(buf, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(buf.to(dev))
        positions = torch.arange(offset, offset + s, device=dev).unsqueeze(0).expand(b, s)
        with model_forward_region():
            out = model(tokens.to(dev), positions, mask, inference_context=ctx, runtime_gather_output=True)
        ctx.increment_sequence_len_offset(s)
        self.last_stats["forwards"] += 1
        if not ps.is_pipeline_last_stage():
            dist.send(out.contiguous().to(comm_device()), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
        return out[:, -1, :].float()

    @staticmethod
    def _select_rows(ctx, index: torch.Tensor) -> None:
        """Keeps (or repeats) the cache rows ``index`` of every layer on this stage."""
        for layer, (k, v) in list(ctx.key_value_memory_dict.items()):
            ctx.key_value_memory_dict[layer] = (k[:, index], v[:, index])


def _attention_mask(valid: torch.Tensor, offset: int, s: int) -> torch.Tensor:
    """megatron's boolean mask (True = masked) ``[b, 1, s, offset + s]`` for queries at slots offset.. over the
    keys so far: a key is seen when it holds a real token and is not in the future. A query on a pad slot sees
    itself, so no row of the softmax is all masked."""
    keys = valid[:, : offset + s]
    q = torch.arange(offset, offset + s).unsqueeze(1)
    k = torch.arange(offset + s).unsqueeze(0)
    seen = keys.unsqueeze(1) & (k <= q).unsqueeze(0)
    seen = seen | (k == q).unsqueeze(0)
    return (~seen).unsqueeze(1)


def _cache_bytes(ctx) -> int:
    return sum(t.numel() * t.element_size() for kv in ctx.key_value_memory_dict.values() for t in kv)


def make_megatron_engine(chunks: list, max_batch_tokens: int = 1 << 17):
    """The KV-cached engine; the no-cache one for a model in virtual-pipeline chunks."""
    if len(chunks) > 1:
        return ReforwardEngine(chunks)
    return MegatronEngine(chunks, max_batch_tokens)

"""One optimizer step of the student (LM loss) and of the discriminator (BT loss) at one layout, plus the
discriminator's padding / last-token checks. argv: tp pp student_ckpt disc_ckpt out.json"""

import json
import sys

import torch
import torch.distributed as dist


def toy_lm_batches(vocab):
    g = torch.Generator().manual_seed(11)
    out = []
    for _ in range(2):  # two micro-batches through the pipeline schedule
        tokens = torch.randint(0, vocab, (2, 16), generator=g)
        labels = torch.roll(tokens, -1, dims=1)
        mask = torch.ones_like(tokens, dtype=torch.float)
        mask[:, :5] = 0  # prompt tokens carry no loss (SeqKD trains on the teacher answer only)
        mask[:, -1] = 0
        out.append({"tokens": tokens, "labels": labels, "loss_mask": mask})
    return out


GROUP = 2  # student answers per prompt


def toy_pair_batch(vocab):
    """2 prompts x [teacher, 2 student answers] (the trainer's D micro-batch layout), right-padded to 16."""
    g = torch.Generator().manual_seed(12)
    lengths = [16, 9, 16, 12, 7, 13]
    tokens = torch.randint(1, vocab, (6, 16), generator=g)
    mask = torch.zeros(6, 16, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        tokens[i, n:] = 0
    return {"tokens": tokens, "attention_mask": mask}


def snapshot(modules):
    return [p.detach().clone() for m in modules for p in m.parameters()]


def changed(before, modules):
    after = [p.detach() for m in modules for p in m.parameters()]
    flags = torch.tensor([float(not torch.equal(a, b)) for a, b in zip(before, after)])
    counts = torch.tensor([flags.sum().item(), float(len(flags))])
    dist.all_reduce(counts)
    return counts.tolist()


def main():
    from megatron.core import parallel_state as ps

    from gad_megatron.trainer.steps import bt_step, sft_step
    from gad_megatron.convert import api
    from gad_megatron.models.forward import discriminator_scores, run_schedule
    from gad_megatron.runtime import ParallelConfig, initialize
    from gad_megatron.trainer.engine import OptimConfig, TrainEngine, reduce_token_mean

    from gad_megatron.models import ModelOptions

    tp, pp, s_ckpt, d_ckpt, out_path = int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:6]
    switches = len(sys.argv) > 6 and sys.argv[6] == "switches"
    # "switches": sequence parallel + full activation recomputation + distributed optimizer.
    opts = ModelOptions(sequence_parallel=switches, recompute_granularity="full" if switches else None,
                        transformer_impl="local")
    optim = OptimConfig(lr=1e-3, clip_grad=1.0, use_distributed_optimizer=switches)
    initialize(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, sequence_parallel=switches, device="cpu"))
    result = {}
    reporter = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0

    # --- student: LM loss step ---
    arch, chunks, _ = api.load_from_checkpoint(s_ckpt, opts)
    engine = TrainEngine(chunks, optim)
    batches = toy_lm_batches(arch.vocab_size)
    before = snapshot(engine.modules)
    out = engine.train_step(batches, sft_step)
    result["student_changed"] = changed(before, engine.modules)
    after = run_schedule(engine.chunks, batches, sft_step, forward_only=True)
    if reporter:
        result["student_loss"] = reduce_token_mean(out["outputs"], "sft_loss")
        result["student_loss_after"] = reduce_token_mean(after, "sft_loss")

    # --- discriminator: padding invariance and the head on the last real token ---
    arch, d_chunks, _ = api.load_from_checkpoint(d_ckpt, opts)
    pair = toy_pair_batch(arch.vocab_size)
    captured = {}
    if ps.is_pipeline_last_stage():
        head = d_chunks[-1].output_layer
        head.register_forward_hook(lambda m, inp, out: captured.__setitem__("hidden", inp[0].detach()))
    scores = discriminator_scores(d_chunks, [pair])
    wider = {**pair, "tokens": torch.cat([pair["tokens"], torch.zeros(6, 6, dtype=torch.long)], 1),
             "attention_mask": torch.cat([pair["attention_mask"], torch.zeros(6, 6, dtype=torch.long)], 1)}
    if scores is not None:
        hidden = captured["hidden"]  # [s(/TP with SP), b, h]: input of the head in the first forward
        if switches:
            pieces = [torch.empty_like(hidden) for _ in range(tp)]
            dist.all_gather(pieces, hidden.contiguous(), group=ps.get_tensor_model_parallel_group())
            hidden = torch.cat(pieces, dim=0)
    scores_wider = discriminator_scores(d_chunks, [wider])
    if scores is not None:
        w = d_chunks[-1].output_layer.weight.detach()  # [1, h/TP]
        parts = [torch.empty_like(w) for _ in range(tp)]
        dist.all_gather(parts, w, group=ps.get_tensor_model_parallel_group())
        full_w = torch.cat(parts, dim=1)[0]
        last = pair["attention_mask"].sum(1) - 1
        manual = torch.stack([hidden[last[b], b] @ full_w for b in range(6)])
        if reporter:
            result["pad_invariance_max_diff"] = (scores[0] - scores_wider[0]).abs().max().item()
            result["head_on_last_token_max_diff"] = (scores[0] - manual).abs().max().item()
            result["score_spread"] = (scores[0].max() - scores[0].min()).item()

    # --- discriminator: BT loss step ---
    d_engine = TrainEngine(d_chunks, optim)
    before = snapshot(d_engine.modules)
    out = d_engine.train_step([pair], bt_step(GROUP))
    result["disc_changed"] = changed(before, d_engine.modules)
    after = run_schedule(d_engine.chunks, [pair], bt_step(GROUP), forward_only=True)
    if reporter:
        result["disc_loss"] = reduce_token_mean(out["outputs"], "d_loss")
        result["disc_acc"] = reduce_token_mean(out["outputs"], "d_acc")
        result["disc_loss_after"] = reduce_token_mean(after, "d_loss")
        with open(out_path, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
    # An explicit, collective teardown: a gloo group left to interpreter exit can abort a rank
    # ("terminate called without an active exception") after its work is done.
    from gad_megatron.runtime import destroy

    destroy()

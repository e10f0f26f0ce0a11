"""A discriminator signal that measures content (#15 item 1, first part): fp32 scores in a bf16 model, ties
counted as half, truncated samples out of D's loss and given the configured reward, advantage scaling modes."""

import pytest
import torch
from conftest import read_json, run_ranks

from gad_megatron.algo.policy import grpo_advantages, truncated_rewards
from gad_megatron.trainer.batching import MicroBatching, Seq, collate
from gad_megatron.trainer.steps import bt_step


def test_fp32_scores_in_a_bf16_discriminator(hf_models, tmp_path):
    out = tmp_path / "d.json"
    run_ranks(1, "d_precision_worker.py", hf_models["qwen2_tied"], out)
    r = read_json(out)
    assert r["bf16_head_dtype"] == r["bf16_score_dtype"] == "torch.float32"
    fp32, bf16 = torch.tensor(r["fp32"]), torch.tensor(r["bf16"])
    assert len(set(r["bf16"])) == len(r["bf16"]), f"two different sequences tie in bf16: {r['bf16']}"
    # the difference is the bf16 trunk's, not a rounding of the score: far below the spread D ranks with
    spread = (fp32.max() - fp32.min()).item()
    assert (bf16 - fp32).abs().max().item() <= 0.25 * spread, (r["fp32"], r["bf16"])
    # a bf16 score would sit on the bf16 grid (steps of |s|/256); these do not
    off_grid = [v for v in r["bf16"] if torch.tensor(v).to(torch.bfloat16).double().item() != v]
    assert off_grid, "scores are still rounded to bf16"


class ConstantD(torch.nn.Module):
    """A 'discriminator' whose per-token outputs are given: the score of row i is ``values[i]``."""

    def __init__(self, values):
        super().__init__()
        self.values = torch.tensor(values, dtype=torch.float32)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, tokens, pos, mask, labels=None):
        return self.values.view(-1, 1, 1).expand(tokens.shape[0], tokens.shape[1], 1) + 0 * self.dummy


def bt_logs(values, group, in_d_loss=None):
    seqs = [Seq([1, 2], [3, 4], is_teacher=(i % (group + 1) == 0)) for i in range(len(values))]
    for s, keep in zip(seqs, in_d_loss or [True] * len(seqs)):
        s.in_d_loss = keep
    batch = collate(seqs)
    out, loss_func = bt_step(group)(ConstantD(values), batch)
    total, n, logs = loss_func(out)
    return {k: (v[0] / v[1]).item() for k, v in logs.items()}, total.item(), int(n)


def test_equal_scores_give_d_acc_half_and_tie_share_one():
    logs, _, n = bt_logs([0.3] * 10, group=4)  # 2 prompts x [teacher, 4 students], every score equal
    assert n == 8 and logs["d_acc"] == 0.5 and logs["d_tie_share"] == 1.0
    logs, _, _ = bt_logs([1.0, 0.0, 1.0, 2.0, 0.5], group=4)  # win, tie, loss, win
    assert logs["d_acc"] == pytest.approx((1 + 0.5 + 0 + 1) / 4) and logs["d_tie_share"] == 0.25


def test_truncated_samples_are_absent_from_d_loss():
    vals = [1.0, 0.0, -3.0, 0.5, 0.2]
    full, total_full, n_full = bt_logs(vals, group=4)
    part, total_part, n_part = bt_logs(vals, group=4, in_d_loss=[True, True, False, True, True])
    assert (n_full, n_part) == (4, 3)
    # the loss without the excluded pair equals the loss over the other three, computed by hand
    import torch.nn.functional as F

    by_hand = -sum(F.logsigmoid(torch.tensor(1.0 - v)).item() for v in (0.0, 0.5, 0.2))
    assert total_part == pytest.approx(by_hand, rel=1e-6)
    assert total_full == pytest.approx(by_hand - F.logsigmoid(torch.tensor(4.0)).item(), rel=1e-6)


def test_truncated_samples_get_the_configured_reward():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], dtype=torch.float64)
    cut = torch.tensor([False, True, False, False, False, False, False, True])
    assert truncated_rewards(r, cut, 4, "min").tolist() == [1, 1, 3, 4, 5, 6, 7, 5]
    assert truncated_rewards(r, cut, 4, "score").tolist() == r.tolist()
    assert truncated_rewards(r, cut, 4, "-1.5").tolist() == [1, -1.5, 3, 4, 5, 6, 7, -1.5]


def test_advantage_scaling_modes_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 10.001], dtype=torch.float64)
    g1 = torch.tensor([-1.5, -0.5, 0.5, 1.5])
    std1 = (sum(x * x for x in g1.tolist()) / 3) ** 0.5
    adv = grpo_advantages(r, 4, eps=0.0)  # group (the paper)
    assert adv[:4].tolist() == pytest.approx((g1 / std1).tolist())
    # the near-flat group is blown up to full size by its own std: exactly what the floor prevents
    assert adv[4:].abs().max().item() == pytest.approx(1.5, rel=1e-3)
    floored = grpo_advantages(r, 4, eps=0.0, std_floor=0.5)
    g2 = torch.tensor([-0.00025, -0.00025, -0.00025, 0.00075], dtype=torch.float64)
    assert floored[4:].tolist() == pytest.approx((g2 / 0.5).tolist(), abs=1e-12)
    assert floored[:4].tolist() == pytest.approx(adv[:4].tolist())  # a spread above the floor is untouched
    batch_std = r.std(unbiased=True).item()
    b = grpo_advantages(r, 4, eps=0.0, std_mode="batch")
    assert b[:4].tolist() == pytest.approx((g1 / batch_std).tolist())
    assert b[4:].tolist() == pytest.approx((g2 / batch_std).tolist())
    none = grpo_advantages(r, 4, std_mode="none")
    assert none[:4].tolist() == pytest.approx(g1.tolist()) and none[4:].tolist() == pytest.approx(g2.tolist())
    assert grpo_advantages(torch.ones(8, dtype=torch.float64), 4, std_mode="batch").abs().max().item() == 0.0


@pytest.fixture(scope="module")
def demo_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from gad_megatron.data import demo

    return AutoTokenizer.from_pretrained(demo.make_student(str(tmp_path_factory.mktemp("tok") / "student"), seed=1))


def test_no_tells_the_student_saying_the_teachers_answer_looks_like_the_teacher(demo_tokenizer):
    """D gets the same token sequence for a teacher answer and the same text sampled by the student, however
    the student happened to split it into tokens, and both end with the one end token; a cut-off sample
    keeps no end token."""
    from gad_megatron.data.chat import d_view, response_ids

    tok = demo_tokenizer
    text = "the red shovel , 3 apples"
    teacher = response_ids(tok, text)
    canonical = tok(text, add_special_tokens=False)["input_ids"]
    # the same text in other tokens: every character its own token where the vocabulary has it
    split = [i for ch in text for i in tok(ch, add_special_tokens=False)["input_ids"]]
    assert split != canonical, "the demo tokenizer should merge characters (else this test shows nothing)"
    for sampled in (canonical + [tok.eos_token_id], split + [tok.eos_token_id]):
        assert d_view(tok, sampled, finished=True) == teacher
    assert d_view(tok, split[:5], finished=False) == tok(tok.decode(split[:5]), add_special_tokens=False)["input_ids"]
    assert d_view(tok, split, finished=False)[-1] != tok.eos_token_id


def test_replay_buffer_is_a_fifo_of_the_last_k_steps_and_draws_the_same_at_every_layout():
    from gad_megatron.trainer.rewards import ReplayBuffer

    buf = ReplayBuffer(steps=3, ratio=0.5, seed=1)
    for step in range(5):
        buf.push([[[step, p], [9], [[[step * 10 + p], 1]]] for p in range(4)])
    assert [groups[0][0][0] for groups in buf.fifo] == [2, 3, 4]  # steps 2, 3, 4: oldest first, 0 and 1 gone
    assert buf.state_dict()["fifo"] == buf.fifo
    one = buf.draw(7, n_prompts=8, dp_rank=0, dp=1)  # 0.5 x 8 = 4 groups from the 12 kept
    two = buf.draw(7, n_prompts=8, dp_rank=0, dp=2) + buf.draw(7, n_prompts=8, dp_rank=1, dp=2)
    assert len(one) == 4 and [u[1].response for u in one] == [u[1].response for u in two]
    assert all(u[0].is_teacher and u[1].in_d_loss for u in one)
    assert [u[1].response for u in one] == [u[1].response for u in buf.draw(7, 8, 0, 1)]  # seeded by the step
    assert [u[1].response for u in one] != [u[1].response for u in buf.draw(8, 8, 0, 1)]
    other = ReplayBuffer(3, 0.5, 1)
    other.load_state_dict(buf.state_dict())
    assert [u[1].response for u in other.draw(7, 8, 0, 1)] == [u[1].response for u in one]


def test_balance_band_skips_d_when_ahead_and_adds_a_step_at_chance():
    from types import SimpleNamespace

    from gad_megatron.trainer.rewards import DiscriminatorReward

    cfg = SimpleNamespace(reward=SimpleNamespace(d_update_every=1, d_acc_band=[0.55, 0.9], replay_steps=0,
                                                 replay_ratio=0.5, canonical_text=True), train=SimpleNamespace(seed=1))
    r = DiscriminatorReward(None, 4, MicroBatching(1024), cfg, {"dp_rank": 0, "data_parallel": 1})
    accs = iter([0.5, 0.52, 0.7, 0.95, 0.6])
    calls = []
    r._step = lambda units: calls.append(1) or {"d_acc": next(accs)}
    batch = SimpleNamespace(step=0, d_units=[], examples=[])
    m = r.update(batch)  # 0.5 < lo: a second step (0.52)
    assert len(calls) == 2 and m["d_band_extra_step"] == 1 and r.last_acc == 0.52
    m = r.update(batch)  # last 0.52: one step -> 0.7 (inside the band)
    assert len(calls) == 3 and "d_band_extra_step" not in m
    r.update(batch)  # -> 0.95 > hi
    m = r.update(batch)  # skipped while D is ahead
    assert len(calls) == 4 and m == {"d_band_skipped": 1}
    r.last_acc = 0.8
    r.every = 2
    assert r.update(SimpleNamespace(step=3, d_units=[], examples=[])) == {} and len(calls) == 4


def test_d_acc_is_logged_for_finished_truncated_and_by_length():
    # 2 groups of [teacher, 2 students]; the second student of group 1 is cut off; response lengths 2 / 20
    seqs = []
    for g in range(2):
        seqs += [Seq([1, 2], [3, 4], is_teacher=True), Seq([1, 2], [5, 6]), Seq([1, 2], list(range(7, 27)))]
    seqs[5].in_d_loss = False
    batch = collate(seqs)
    out, loss_func = bt_step(2)(ConstantD([1.0, 0.0, 2.0, 1.0, 0.5, 0.0]), batch)
    _, n, logs = loss_func(out)
    acc = {k: (v[0] / v[1]).item() for k, v in logs.items() if v[1] > 0}
    assert n == 3 and acc["d_acc_finished"] == pytest.approx(2 / 3) and acc["d_acc_truncated"] == 1.0
    assert acc["d_acc_len_le16"] == 1.0 and acc["d_acc_len_le64"] == 0.5  # lengths 2, 2 | 20, 20
    assert logs["d_acc_len_le256"][1] == 0


class TokenD(torch.nn.Module):
    """A trainable 'discriminator': each token's output is its embedding (one scalar); the score is the last
    real token's."""

    def __init__(self, vocab=32):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, 1)

    def forward(self, tokens, pos, mask, labels=None):
        return self.emb(tokens)


def test_a_split_group_has_the_whole_groups_bt_gradient_and_loss():
    """#30 item 5: a group larger than the micro-batch budget is scored first, then trained through the surrogate
    sum(dL/ds x s) one sequence per micro-batch: the same gradient (and logged loss) as the whole-group step."""
    from gad_megatron.trainer.steps import bt_surrogate_step, bt_terms

    group = 3
    seqs = [Seq([1, 2], [3 + (i * 7) % 20, 4 + (i * 5) % 20] + [9] * (i % 3), is_teacher=(i % (group + 1) == 0))
            for i in range(8)]
    seqs[6].in_d_loss = False  # a truncated sample: in no pair
    d = TokenD()
    out, loss_func = bt_step(group)(d, collate(seqs))
    total, n, whole_logs = loss_func(out)
    (total / n).backward()
    whole = d.emb.weight.grad.clone()

    d.emb.weight.grad = None
    with torch.no_grad():  # the scoring pass, one sequence at a time
        scores = torch.cat([d(collate([s])["tokens"], None, None)[0, len(s) - 1] for s in seqs])
    scores.requires_grad_()
    t, _, split_logs = bt_terms(scores, torch.tensor([s.in_d_loss for s in seqs]),
                                torch.tensor([len(s.response) for s in seqs]), group)
    t.backward()
    for s, g in zip(seqs, scores.grad.tolist()):
        s.score_grad = g
    tot, cnt = 0, 0
    for s in seqs:  # one micro-batch per sequence, as megatron adds them: sum of totals / sum of counts
        o, lf = bt_surrogate_step(d, collate([s]))
        a, c, logs = lf(o)
        tot, cnt = tot + a, cnt + int(c)
        assert logs == {}
    assert cnt == int(n) == 5
    (tot / cnt).backward()
    assert torch.allclose(d.emb.weight.grad, whole, rtol=1e-6, atol=1e-9) and whole.abs().sum() > 0
    for k, v in whole_logs.items():
        assert torch.allclose(split_logs[k], v, rtol=1e-6), k


def test_fits_and_padding_share():
    from gad_megatron.trainer.batching import fits, microbatches, pad_share

    units = [[Seq([1] * 3, [2] * 3)] * 3, [Seq([1] * 5, [2] * 9)]]
    assert fits(units, 18) and not fits(units, 17)  # 3 rows x 6 | 1 x 14
    mbs, _ = microbatches(units, 28)  # 3 x 6 = 18, then 1 x 14: two micro-batches, no padding
    assert pad_share(mbs) == (0, 32)
    mbs, _ = microbatches(units, 64)  # one micro-batch of 4 x 14: 56 tokens, 3 x 6 + 14 = 32 real
    assert pad_share(mbs) == (24, 56)

"""The GAD / GRPO math against hand-computed values, edge cases included (single process, no megatron)."""

import math

import pytest
import torch

from gad_megatron.algo.policy import aggregate, grpo_advantages, low_var_kl, masked_mean, ppo_clip_loss, tis_weights
from gad_megatron.trainer.batching import Seq, collate, pack_units, response_values


def test_grpo_advantages_hand_values():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 10.0])
    a = grpo_advantages(r, 4, eps=0.0)
    std = math.sqrt(((1.5**2) * 2 + (0.5**2) * 2) / 3)  # unbiased std of 1,2,3,4
    assert torch.allclose(a[:4], torch.tensor([-1.5, -0.5, 0.5, 1.5]) / std)
    assert torch.equal(a[4:], torch.zeros(4))  # equal rewards: exactly zero, no NaN
    assert torch.isfinite(grpo_advantages(torch.tensor([3.0]), 1)).all()
    assert grpo_advantages(torch.tensor([3.0, 5.0]), 1).abs().sum() == 0
    with pytest.raises(ValueError, match="groups"):
        grpo_advantages(torch.ones(6), 4)


def test_grpo_group_mean_zero_and_scale_invariant():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(32, generator=g, dtype=torch.float64)
    a = grpo_advantages(r, 8)
    assert a.view(4, 8).sum(1).abs().max() < 1e-12
    assert torch.allclose(grpo_advantages(3 * r + 7, 8), a, atol=1e-6)


def test_ppo_clip_both_sides():
    old = torch.zeros(1, 4)
    # ratios 1.5, 0.5, 1.1, 0.7
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.7]]))
    pos = torch.ones(1, 1)
    loss, clipped = ppo_clip_loss(logp, old, pos, 0.2)
    # A > 0: -min(r, clip(r)) -> ratio 1.5 clipped to 1.2; 0.5 keeps 0.5 (min); 1.1 within; 0.7 keeps 0.7
    assert torch.allclose(loss, -torch.tensor([[1.2, 0.5, 1.1, 0.7]]))
    assert clipped.tolist() == [[1.0, 0.0, 0.0, 0.0]]
    loss, clipped = ppo_clip_loss(logp, old, -pos, 0.2)
    # A < 0: max(r, clip(r)) -> 1.5 keeps 1.5; 0.5 clipped to 0.8; 0.7 clipped to 0.8
    assert torch.allclose(loss, torch.tensor([[1.5, 0.8, 1.1, 0.8]]))
    assert clipped.tolist() == [[0.0, 1.0, 0.0, 1.0]]


def test_ppo_gradient_is_zero_where_clipped_and_points_up_the_advantage():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 1.0, 0.9]])).requires_grad_()
    loss, _ = ppo_clip_loss(logp, old, torch.ones(1, 1), 0.2)
    loss.sum().backward()
    assert logp.grad[0, 0] == 0  # clipped: no gradient
    assert (logp.grad[0, 1:] < 0).all()  # minimising the loss raises logp of positive-advantage tokens


def test_dual_clip_caps_negative_advantage_loss():
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[5.0, 1.0]]))
    loss, clipped = ppo_clip_loss(logp, old, -torch.ones(1, 1), 0.2, dual_clip=3.0)
    assert torch.allclose(loss, torch.tensor([[3.0, 1.0]]))  # 5 capped at c=3
    assert clipped.tolist() == [[1.0, 0.0]]
    loss_pos, _ = ppo_clip_loss(logp, old, torch.ones(1, 1), 0.2, dual_clip=3.0)
    assert torch.allclose(loss_pos, -torch.tensor([[1.2, 1.0]]))  # positive advantages untouched
    with pytest.raises(ValueError):
        ppo_clip_loss(logp, old, torch.ones(1, 1), 0.2, dual_clip=0.5)


def test_low_var_kl_values_and_clamp():
    logp = torch.tensor([0.0, -1.0, -30.0])
    ref = torch.tensor([0.0, -2.0, 0.0])
    kl = low_var_kl(logp, ref, clamp=10.0)
    d = -1.0
    assert kl[0] == 0
    assert torch.isclose(kl[1], torch.tensor(math.exp(d) - d - 1))
    assert kl[2] == 10.0  # exp(30) clamped
    assert (low_var_kl(torch.randn(100), torch.randn(100)) >= 0).all()


def test_tis_weights_cap_and_fraction():
    old = torch.log(torch.tensor([1.0, 3.0, 0.5]))
    rollout = torch.zeros(3)
    w, capped = tis_weights(old, rollout, cap=2.0)
    assert torch.allclose(w, torch.tensor([1.0, 2.0, 0.5]))
    assert capped.tolist() == [0.0, 1.0, 0.0]
    assert not w.requires_grad


def test_aggregate_modes_and_empty_rows():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # last row: an empty response
    s, n = aggregate(x, mask, "token-mean")
    assert (s / n).item() == pytest.approx(10 / 4)
    s, n = aggregate(x, mask, "seq-mean-token-mean")
    assert n.item() == 2 and (s / n).item() == pytest.approx((2 + 4) / 2)
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0
    with pytest.raises(ValueError, match="loss_agg_mode"):
        aggregate(x, mask, "sum")


def test_collate_positions_and_roundtrip():
    s1 = Seq([5, 6, 7], [8, 9], per_token={"old_logp": torch.tensor([-1.0, -2.0])})
    s2 = Seq([5], [4, 3, 2], per_token={"old_logp": torch.tensor([-3.0, -4.0, -5.0])})
    b = collate([s1, s2])
    assert b["tokens"].tolist() == [[5, 6, 7, 8, 9], [5, 4, 3, 2, 0]]
    # position t predicts token t+1; the loss mask covers exactly the response tokens' predictions
    assert b["labels"][0].tolist()[:4] == [6, 7, 8, 9]
    assert b["loss_mask"].tolist() == [[0, 0, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert (b["labels"][b["loss_mask"].bool()]).tolist() == [8, 9, 4, 3, 2]
    assert b["old_logp"][b["loss_mask"].bool()].tolist() == [-1, -2, -3, -4, -5]
    back = response_values(b["old_logp"], [s1, s2])
    assert back[0].tolist() == [-1, -2] and back[1].tolist() == [-3, -4, -5]


def test_pack_units_respects_budget_and_keeps_units_whole():
    units = [[Seq([1] * 3, [2] * 3)] * 3, [Seq([1] * 5, [2] * 5)], [Seq([1], [2])] * 2, [Seq([1] * 10, [2] * 10)]]
    packed = pack_units(units, budget=30)
    for mb in packed:
        rows = sum(len(u) for u in mb)
        width = max(len(s) for u in mb for s in u)
        assert rows * width <= 30 or len(mb) == 1
    assert [u for mb in packed for u in mb] == units  # order preserved, nothing split or lost
    assert len(pack_units(units, budget=10**6)) == 1


def test_failure_watch_warns_on_saturated_d_length_drift_and_logprob_gap():
    from gad_megatron.trainer.config import load_config
    from gad_megatron.trainer.metrics import FailureWatch

    cfg = load_config(base={"model": {"student": "x"}, "data": {"train": "x"},
                            "log": {"d_saturation_steps": 3, "length_drift_ratio": 1.5, "gap_warn": 1e-2}})
    w = FailureWatch(cfg)
    said = [w.check({"d_acc": 0.99}) for _ in range(3)]
    assert said[:2] == [[], []] and "saturated" in said[2][0]
    assert w.check({"stage": "gad", "response_length_mean": 100.0}) == []
    assert "drifting" in w.check({"stage": "gad", "response_length_mean": 160.0})[0]
    assert "logprob gap" in w.check({"logprob_gap_mean": 0.05})[0]
    w2 = FailureWatch(cfg)
    w2.load_state_dict(w.state_dict())
    assert w2.base_length == 100.0


def test_teacher_rows_from_parquet(tmp_path):
    import datasets

    from gad_megatron.data import demo
    from gad_megatron.data.teacher import read_rows

    rows = demo.make_rows(12)
    path = str(tmp_path / "rows.parquet")
    datasets.Dataset.from_list(rows).to_parquet(path)
    got = read_rows(path)
    assert [r["id"] for r in got] == [r["id"] for r in rows]
    assert got[3]["teacher_response"] == rows[3]["teacher_response"]
    assert demo.score(rows[3]["messages"], rows[3]["teacher_response"]) == 1.0
    assert demo.score(rows[3]["messages"], "") == 0.0

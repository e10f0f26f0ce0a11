"""The OPD advantage by hand and where the per-token channel puts it (#23); the runs are in test_opd.py."""

import torch

from gad_megatron.trainer.batching import Seq, collate
from gad_megatron.trainer.opd import opd_advantages


def test_opd_advantage_by_hand():
    old, teacher = torch.tensor([-1.0, -2.0]), torch.tensor([-0.5, -3.0])
    assert opd_advantages(old, teacher).tolist() == [0.5, -1.0]
    assert opd_advantages(old, teacher, coef=2.0).tolist() == [1.0, -2.0]
    assert opd_advantages(old, teacher, clamp=0.25).tolist() == [0.25, -0.25]
    assert opd_advantages(old, teacher, mask=torch.tensor([1.0, 0.0])).tolist() == [0.5, 0.0]
    # detached: no gradient flows into the student's logprobs through the advantage
    old.requires_grad_(True)
    assert not opd_advantages(old, teacher).requires_grad


def test_per_token_advantages_sit_on_the_response_tokens():
    s = Seq([5, 6, 7], [8, 9], per_token={"token_adv": torch.tensor([0.5, -1.0])}, advantage=0.25)
    b = collate([s, Seq([5], [6, 7, 8], per_token={"token_adv": torch.tensor([1.0, 2.0, 3.0])})])
    # the value of response token k sits at position prompt_len - 1 + k, where the loss mask is 1
    assert b["token_adv"][0].tolist() == [0.0, 0.0, 0.5, -1.0, 0.0] and b["loss_mask"][0].tolist() == [0, 0, 1, 1, 0]
    assert b["token_adv"][1].tolist() == [1.0, 2.0, 3.0, 0.0, 0.0] and b["advantages"][0].item() == 0.25

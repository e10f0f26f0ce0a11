"""Same converted weights, one training step at TP1PP1 and at TP2PP2: equal losses, parameters moved;
discriminator scores invariant to right padding and equal to the head on the last real token."""

import pytest
from conftest import read_json, run_ranks


@pytest.fixture(scope="module")
def steps(converted, tmp_path_factory):
    d = tmp_path_factory.mktemp("steps")
    out = {}
    for tp, pp, variant in [(1, 1, "plain"), (2, 2, "plain"), (2, 2, "switches")]:
        path = d / f"tp{tp}pp{pp}{variant}.json"
        run_ranks(tp * pp, "train_step_worker.py", tp, pp, converted["qwen2_tied"], converted["disc"], path, variant)
        out[(tp, pp) if variant == "plain" else variant] = read_json(path)
    return out


@pytest.mark.parametrize("key", ["student_loss", "student_loss_after", "disc_loss", "disc_loss_after"])
def test_loss_equal_across_layouts(steps, key):
    a, b = steps[(1, 1)][key], steps[(2, 2)][key]
    assert abs(a - b) <= 1e-5, f"{key}: TP1PP1 {a} vs TP2PP2 {b}"


@pytest.mark.parametrize("key", ["student_loss", "student_loss_after", "disc_loss", "disc_loss_after"])
def test_sequence_parallel_recompute_distributed_optimizer_match(steps, key):
    a, b = steps[(1, 1)][key], steps["switches"][key]
    assert abs(a - b) <= 1e-5, f"{key}: TP1PP1 {a} vs TP2PP2+SP+recompute+distopt {b}"


def test_step_changes_parameters_and_loss(steps):
    for layout, r in steps.items():
        for model in ("student", "disc"):
            n_changed, n_total = r[f"{model}_changed"]
            assert n_changed == n_total, f"{model} at {layout}: only {n_changed}/{n_total} parameters moved"
        assert r["student_loss_after"] < r["student_loss"], layout
        assert r["disc_loss_after"] < r["disc_loss"], layout


def test_discriminator_score_padding_invariant_and_last_token(steps):
    for layout, r in steps.items():
        assert r["pad_invariance_max_diff"] <= 1e-6, layout
        assert r["head_on_last_token_max_diff"] <= 1e-5, layout
        assert r["score_spread"] > 1e-4, f"{layout}: scores do not depend on the input"

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


@pytest.mark.parametrize("tp", [1, 2], ids=["DP2", "TP2xDP2"])
def test_zero1_equals_the_plain_optimizer_and_offload_round_trips(hf_models, tmp_path, tp):
    """#30: megatron's distributed optimizer (ZeRO-1) at DP2 and TP2 x DP2: after 3 steps the weights equal the
    unsharded optimizer's within 1e-6, and the weight sync then delivers them, updated (its parameter all-gather
    is done) and the same bytes to every engine leader; rollout.offload moves grads, Adam state and parameters off (their storages hold 0 bytes),
    and back bitwise, and a 4th step after it still matches."""
    out = tmp_path / "z.json"
    run_ranks(2 * tp, "zero_offload_worker.py", tp, hf_models["qwen2_tied"], out)
    for r in read_json(out):
        assert r["dp"] == 2
        assert r["moved"] > 1e-4  # the steps changed the weights
        # fp32 reduction order (the grad norm and clip over shards): below 1e-6 on earlier machines, 1.0e-6 /
        # 1.3e-6 (DP2) and 2.0e-6 / 2.4e-6 (TP2 x DP2) on 2026-12-08's Xeon, with 3e-3 moved; a wrong shard (no
        # reduce-scatter, a stale all-gather) is off by the update itself, ~3e-3. The bound: 5e-6.
        assert r["max_param_diff"] <= 5e-6 and r["max_param_diff_step4"] <= 5e-6, r
        for a, b in r["norms"]:
            assert a == pytest.approx(b, rel=1e-5)
        assert r["offload_freed"] > 0 and r["left_on_device"] == 0 and r["param_storage_bytes_while_away"] == 0
        assert r["digest_same_after_round_trip"]
        assert r["sync_max_diff"] <= 5e-6  # the engine got the sharded optimizer's updated weights (bound: above)
    syncs = [r["sync"] for r in read_json(out)]  # every rank leads an engine (rollout TP 1), DP rank 1's included
    for name in ("initial", "plain", "zero1"):  # each engine got the same bytes from its own DP replica
        assert len({s[name][0] for s in syncs}) == 1, name
    assert syncs[0]["zero1"][0] != syncs[0]["initial"][0] and syncs[0]["zero1"][1] == syncs[0]["initial"][1]

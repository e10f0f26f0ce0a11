"""docs/results.md's SmolLM2 tables are the committed runs' own numbers: every held-out mean +- std written
there is recomputed from the runs' summary.json files (sample std over seeds, as tools/ablate.py reports)."""

import json
import os
import statistics

import pytest

from conftest import ROOT  # noqa: E402  (the repository root)
DOCS = os.path.join(ROOT, "docs")


def _cell(runs: list, key: str) -> str:
    values = [json.load(open(os.path.join(DOCS, r, "summary.json")))["evals"]["after"][key] for r in runs]
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} +- {statistics.stdev(values):.4f}"


# (a table row's first cell, the runs behind it): docs/ablation_smollm2 is the recipe's ablation, and
# docs/ablation_smollm2_glr GAD at G lr 1e-6 (its seed 1 warm start and seqkd repeat the first table's; its
# seed 2 runs from the first table's seed-2 warm start).
ROWS = [
    ("warm start (step 60) | 2", ["ablation_smollm2/warm_seed1", "ablation_smollm2/warm_seed2"]),
    ("`seqkd` (SFT continued) | 2", ["ablation_smollm2/seqkd/seed1", "ablation_smollm2/seqkd/seed2"]),
    ("`gad` (paper) | 2", ["ablation_smollm2/gad/seed1", "ablation_smollm2/gad/seed2"]),
    ("`gad+fixes` | 1", ["ablation_smollm2/gad+fixes/seed1"]),
    ("`oracle` (GRPO on the scorer) | 1", ["ablation_smollm2/oracle/seed1"]),
    ("warm start (step 60), seeds 1-3", ["ablation_smollm2_glr/warm_seed1", "ablation_smollm2/warm_seed2",
                                         "ablation_smollm2_glr/warm_seed3"]),
    ("`seqkd` (SFT continued, lr 1e-5)", ["ablation_smollm2_glr/seqkd/seed1", "ablation_smollm2/seqkd/seed2",
                                          "ablation_smollm2_glr/seqkd/seed3"]),
    ("`gad`, G lr 1e-6", ["ablation_smollm2_glr/gad/seed1", "ablation_smollm2_glr/gad/seed2",
                          "ablation_smollm2_glr/gad/seed3"]),
    # docs/ablation_smollm2_steps: 32 steps from the seed-1 warm start above
    ("warm start (step 60), seed 1", ["ablation_smollm2_glr/warm_seed1"]),
    ("`seqkd`, 32 steps", ["ablation_smollm2_steps/seqkd/seed1"]),
    ("`gad`, G lr 1e-6, 32 steps", ["ablation_smollm2_steps/gad/seed1"]),
]


@pytest.mark.parametrize("first, runs", ROWS, ids=[r[0].split(" |")[0] for r in ROWS])
def test_smollm2_table_rows_are_the_committed_runs_numbers(first, runs):
    text = open(os.path.join(DOCS, "results.md")).read().replace("**", "")
    row = next((line for line in text.splitlines() if line.startswith(f"| {first} |")), None)
    assert row is not None, f"docs/results.md has no row starting '| {first} |'"
    greedy, sampled = _cell(runs, "heldout_score"), _cell(runs, "heldout_score_sampled")
    assert f"| {greedy} | {sampled} |" in row, (row, greedy, sampled)


def test_smollm2_verdicts_are_written():
    text = open(os.path.join(DOCS, "results.md")).read()
    assert "**Verdict (2 seeds for `seqkd` and `gad`, 1 for the others): GAD did not beat SeqKD" in text
    assert "**Verdict (3 seeds): at the paper's learning rate GAD does not beat SeqKD." in text
    assert "**Verdict (1 seed, exploratory): twice the steps did not close GAD's gap to SeqKD, it widened it" in text


def test_smollm2_per_seed_rows_are_the_committed_runs_numbers():
    """The lr-1e-6 per-seed table: each seed's greedy / sampled scores and the differences written there."""
    text = open(os.path.join(DOCS, "results.md")).read()
    after = lambda run: json.load(open(os.path.join(DOCS, run, "summary.json")))["evals"]["after"]
    warm = {1: "ablation_smollm2_glr/warm_seed1", 2: "ablation_smollm2/warm_seed2", 3: "ablation_smollm2_glr/warm_seed3"}
    seqkd = {1: "ablation_smollm2_glr/seqkd/seed1", 2: "ablation_smollm2/seqkd/seed2", 3: "ablation_smollm2_glr/seqkd/seed3"}
    for seed in (1, 2, 3):
        w, s, g = after(warm[seed]), after(seqkd[seed]), after(f"ablation_smollm2_glr/gad/seed{seed}")
        pair = lambda e: f"{e['heldout_score']:.4f} / {e['heldout_score_sampled']:.4f}"
        diff = lambda a, b: (f"{a['heldout_score'] - b['heldout_score']:+.3f} / "
                             f"{a['heldout_score_sampled'] - b['heldout_score_sampled']:+.3f}")
        row = f"| {seed} | {pair(w)} | {pair(s)} | {pair(g)} | {diff(g, s)} | {diff(g, w)} |"
        assert row in text, row


def test_the_oracle_search_row_is_the_committed_runs_paired_change():
    """#33 item 3: the search's row in docs/results.md (and its verdict line) is what gad_megatron.eval.paired
    computes from the committed per-prompt scores of the warm start and setting 1's oracle run."""
    from gad_megatron.eval.paired import change_between

    runs = os.path.join(DOCS, "oracle_search_smollm2", "runs")
    warm, oracle = os.path.join(runs, "warm_seed1"), os.path.join(runs, "setting1_oracle_seed1")
    s = change_between(warm, "after", oracle, "after", "sampled")
    g = change_between(warm, "after", oracle, "after", "greedy")
    assert s.prompts == g.prompts == 240
    row = (f"| 1 | 3e-6 | 4 x 4 | {s.before:.4f} -> {s.after:.4f} ({s.change:+.4f} +- {s.se:.4f}) | "
           f"{g.before:.4f} -> {g.after:.4f} ({g.change:+.4f} +- {g.se:.4f}) | learns ({s.change / s.se:.1f} SE) |")
    assert row in open(os.path.join(DOCS, "results.md")).read(), row
    assert s.change > 2 * s.se  # the pre-registered criterion
    verdicts = open(os.path.join(DOCS, "oracle_search_smollm2", "verdicts.txt")).read().splitlines()
    assert verdicts[0].startswith("setting 1 lr 3e-6 prompts 4 n 4 (") and verdicts[0].endswith(
        f"sampled {s.before:.4f} -> {s.after:.4f}, change {s.change:+.4f} +- {s.se:.4f} over 240 prompts; greedy "
        f"{g.before:.4f} -> {g.after:.4f}, change {g.change:+.4f} +- {g.se:.4f} over 240 prompts: learns")

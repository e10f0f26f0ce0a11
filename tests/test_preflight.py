"""#34 item 2: one pre-flight, in one order (trainer/preflight.CHECKS). A run stops at the first refusal, named
alone; gad-train --check and gad-doctor list every refusal of a config that breaks several rules at once."""

import os
import subprocess
import sys

from gad_megatron.trainer.preflight import CHECKS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# three rules broken at once, one for each of three checks (in the pre-flight's order)
BROKEN = {"config": ("algo.tis_cap=0.5", "algo.tis_cap=0.5: must be >= 1"),
          "positions": ("data.max_prompt_tokens=250", "data.max_prompt_tokens + data.max_response_tokens = 262 is "
                                                      "beyond the student's max_position_embeddings=256"),
          "memory": ("rollout.n=1000000", "rollout.n=1000000: 32 prompts x 1000000 samples")}


def _train(tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "GAD_DEMO_DIR": str(tmp_path / "demo")}
    return subprocess.run([sys.executable, "-m", "gad_megatron.trainer.cli", "--demo", *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)


def test_the_checks_run_in_one_fixed_order_and_the_docs_say_it():
    names = [name for name, _, _ in CHECKS]
    assert names == ["config", "data", "positions", "memory", "disk", "step time", "resume"]
    said = open(os.path.join(ROOT, "docs", "guarantees.md")).read().split("**One pre-flight, in one order**")[1]
    assert said.split(").")[0] and ": " + ", ".join(names) + "." in " ".join(said.split()), "docs/guarantees.md"


def test_a_run_names_the_first_refusal_and_check_lists_all_three(tmp_path):
    over = [o for o, _ in BROKEN.values()]
    p = _train(tmp_path, *over)  # no --check: the run stops at the first, before any rank or model
    errors = [x for x in p.stderr.splitlines() if x.startswith("gad-train: error:")]
    assert p.returncode == 2 and len(errors) == 1 and BROKEN["config"][1] in errors[0], p.stderr[-3000:]
    assert not (tmp_path / "demo" / "metrics.jsonl").exists()
    p = _train(tmp_path, "--check", *over)
    errors = [x for x in p.stderr.splitlines() if x.startswith("gad-train: error:")]
    assert p.returncode == 2, p.stderr[-3000:]
    where = [next((i for i, e in enumerate(errors) if says in e), None) for _, says in BROKEN.values()]
    assert None not in where and where == sorted(where), (where, errors)  # all three, in the pre-flight's order
    assert "Traceback" not in p.stderr and "refusal(s), from the config, positions, memory" in p.stderr
    # each alone is refused alone: none of the three is an echo of another
    for check, (o, says) in BROKEN.items():
        p = _train(tmp_path, "--check", o)
        errors = [x for x in p.stderr.splitlines() if x.startswith("gad-train: error:")]
        assert p.returncode == 2 and says in errors[0] and f"from the {check}" in p.stderr, (check, p.stderr[-2000:])


def test_a_check_whose_input_was_refused_is_said_to_be_skipped(tmp_path):
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"prompt": "hi"}\n')  # no answer: the data check refuses it
    p = _train(tmp_path, "--check", f"data.train={bad}")
    assert p.returncode == 2 and f"{bad}:1" in p.stderr and "step time: not checked (needs data)" in p.stderr, \
        p.stderr[-2000:]

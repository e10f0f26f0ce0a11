"""#34 item 2: one pre-flight, in one order (trainer/preflight.CHECKS). A run stops at the first refusal, named
alone; gad-train --check and gad-doctor list every refusal of a config that breaks several rules at once."""

import os
import subprocess
import sys

from gad_megatron.trainer.preflight import CHECKS

from conftest import ROOT  # noqa: E402  (the repository root)
# three rules broken at once, one for each of three checks (in the pre-flight's order); {rows}: a data file whose
# first row has no answer
BROKEN = {"config": ("algo.tis_cap=0.5", "algo.tis_cap=0.5: must be >= 1"),
          "data": ("data.train={rows}", "{rows}:1"),
          "positions": ("data.max_prompt_tokens=250", "data.max_prompt_tokens + data.max_response_tokens = 262 is "
                                                      "beyond the student's max_position_embeddings=256")}


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
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "hi"}\n')
    broken = {k: (o.format(rows=rows), says.format(rows=rows)) for k, (o, says) in BROKEN.items()}
    over = [o for o, _ in broken.values()]
    p = _train(tmp_path, *over)  # no --check: the run stops at the first, before any rank or model
    errors = [x for x in p.stderr.splitlines() if x.startswith("gad-train: error:")]
    assert p.returncode == 2 and len(errors) == 1 and broken["config"][1] in errors[0], p.stderr[-3000:]
    assert not (tmp_path / "demo" / "metrics.jsonl").exists()
    p = _train(tmp_path, "--check", *over)
    errors = [x for x in p.stderr.splitlines() if x.startswith("gad-train: error:")]
    assert p.returncode == 2 and len(errors) == 3, p.stderr[-3000:]
    for line, (check, (_, says)) in zip(errors, broken.items()):  # all three, in the pre-flight's order
        assert says in line, (check, line)
    assert "Traceback" not in p.stderr and "3 refusals, from the config, data, positions checks" in p.stderr
    # what reads a refused input is not run on it: said, not guessed
    assert "not checked, their input refused: memory (needs config), step time (needs config)" in p.stderr


def test_a_check_whose_input_was_refused_is_said_to_be_skipped(tmp_path):
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"prompt": "hi"}\n')  # no answer: the data check refuses it
    p = _train(tmp_path, "--check", f"data.train={bad}", "data.max_prompt_tokens=250")
    assert p.returncode == 2 and f"{bad}:1" in p.stderr and "not checked, their input refused: step time (needs data)" in p.stderr, \
        p.stderr[-2000:]

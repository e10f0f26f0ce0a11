"""tools/ablate.py: what it prints to paste, what it checks before its warm starts, what its report refuses
(#32 items 21, 23, 24). Fast: no run is trained."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
import ablate  # noqa: E402


def test_the_lines_to_paste_are_quoted(tmp_path, capsys):
    """Item 21: the sbatch files were quoted, the 'paste these' lines not: an --out holding a space and $(...)
    ran the injected command when pasted."""
    marker = tmp_path / "injected"
    out = tmp_path / f"a b$(touch {marker})"
    cfg = os.path.join(ROOT, "gad_megatron", "assets", "demo", "demo.yaml")
    assert ablate.main(["slurm", "--out", str(out), "--config", cfg, "--seeds", "1", "--variants", "seqkd"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    script = 'sbatch() { echo "$@"; }\n' + "\n".join(lines[:2]) + "\n"  # what a user pastes, sbatch stubbed
    p = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert p.returncode == 0 and not marker.exists(), p.stderr
    assert str(out / "variants.sbatch") in p.stdout


def test_a_missing_opd_teacher_is_refused_before_the_warm_start(tmp_path, capsys):
    """Item 23: --opd-teacher <missing> was checked only after the warm start (minutes to hours) had run."""
    with pytest.raises(SystemExit) as e:
        ablate.main(["local", "--out", str(tmp_path / "o"), "--variants", "opd", "--opd-teacher",
                     str(tmp_path / "nowhere"), "--seeds", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--opd-teacher {tmp_path / 'nowhere'}:" in err and "no such folder" in err, err
    assert not (tmp_path / "o").exists()


def _run(d, heldout, scorer="gad_megatron.data.demo:score"):
    os.makedirs(d)
    with open(os.path.join(d, "summary.json"), "w") as f:
        f.write('{"steps": 2, "evals": {"after": {"heldout_score": 0.5, "heldout_score_se": 0.1}}}')
    open(os.path.join(d, "metrics.jsonl"), "w").close()
    with open(os.path.join(d, "config.yaml"), "w") as f:
        f.write(f"data:\n  train: t.jsonl\n  heldout: {heldout}\neval:\n  scorer: {scorer}\n  samples: 1\n")


def test_report_refuses_runs_evaluated_on_other_data_or_scorers(tmp_path, capsys):
    """Item 24: `report` over runs of different data and scorers printed one table, exit 0."""
    _run(tmp_path / "gad" / "seed1", "h.jsonl")
    _run(tmp_path / "seqkd" / "seed1", "h.jsonl")
    assert ablate.main(["report", "--out", str(tmp_path)]) == 0  # alike: the table
    capsys.readouterr()
    _run(tmp_path / "seqkd" / "seed2", "other.jsonl")
    assert ablate.main(["report", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.heldout='h.jsonl'" in err[0] and "data.heldout='other.jsonl'" in err[0], err
    _run(tmp_path / "oracle" / "seed1", "h.jsonl", scorer="my_task:score")
    (tmp_path / "seqkd" / "seed2" / "config.yaml").unlink()
    assert ablate.main(["report", "--out", str(tmp_path)]) == 2
    assert "eval.scorer='my_task:score'" in capsys.readouterr().err


def test_ablate_checks_its_arguments_and_names_a_bad_summary(tmp_path, capsys):
    """Items 20 and 21: `ablate.py local --warmup-steps 0` said only 'warm start of seed 1 failed; see <log>';
    `ablate.py report` over a truncated summary.json was a JSONDecodeError traceback."""
    import os
    import sys

    from conftest import ROOT

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import ablate

    with pytest.raises(SystemExit) as e:
        ablate.main(["local", "--out", str(tmp_path / "a"), "--warmup-steps", "0"])
    assert e.value.code == 2 and "--warmup-steps 0 / --steps 40: each must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    run = tmp_path / "r" / "gad" / "seed1"
    run.mkdir(parents=True)
    (run / "summary.json").write_text('{"steps": 3, "evals": {"aft')
    assert ablate.main(["report", "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert f"ablate: {run}/summary.json: not valid JSON" in err and "Traceback" not in err

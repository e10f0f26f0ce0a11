"""GAD + OPD (#23): gad+opd reduces to gad (w_opd 0) and to opd (w_d 0), resumes byte-identically with its
weight schedule after kill -9; a teacher with another tokenizer is refused before any model is built and padded
embedding rows are accepted. The teacher is test_opd.py's (the demo student trained further by SeqKD)."""

import shutil

import pytest
from test_gad_train import kill9_after_step, lines, run_train
from test_opd import G_KEYS, _gad_train_check, _metrics, _short, seqkd_teacher


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return seqkd_teacher(tmp_path_factory.mktemp("teacher"))


def test_gad_plus_opd_reduces_to_gad_and_to_opd(teacher, tmp_path):
    student, better = teacher
    runs = {"gad": {}, "opd": {"reward.source": "opd", "opd.teacher": better},
            "w_opd_0": {"reward.source": "gad+opd", "opd.teacher": better, "opd.weight": 0.0},
            "w_d_0": {"reward.source": "gad+opd", "opd.teacher": better, "opd.weight_discriminator": 0.0}}
    for name, over in runs.items():
        run_train(_short(tmp_path, name, student, **over))
    gad, opd = _metrics(tmp_path / "gad"), _metrics(tmp_path / "opd")
    w0, wd0 = _metrics(tmp_path / "w_opd_0"), _metrics(tmp_path / "w_d_0")
    assert [m["stage"] for m in gad] == ["warmup"] * 2 + ["gad"] * 4
    for a, b in zip(gad, w0):  # every metric gad logs, byte for byte (gad+opd logs its OPD part besides)
        assert {k: a[k] for k in a} == {k: b[k] for k in a}, a["step"]
    assert any(m.get("adv_token_abs_mean", 0) > 0 for m in wd0)
    for a, b in zip(opd, wd0):  # G's side equals OPD's (D still learns in gad+opd)
        if a["stage"] == "gad":
            assert {k: a[k] for k in G_KEYS if k in a} == {k: b[k] for k in G_KEYS if k in a}, a["step"]
    assert all(m["opd_weight"] == 1.0 for m in wd0 if m["stage"] == "gad")


def test_gad_plus_opd_resumes_byte_identically_after_kill9(teacher, tmp_path):
    student, better = teacher
    over = {"reward.source": "gad+opd", "opd.teacher": better, "opd.weight": 1.0, "opd.weight_final": 0.25}
    run_train(_short(tmp_path, "whole", student, **over))
    cfg = _short(tmp_path, "killed", student, **over)
    kill9_after_step(cfg, tmp_path / "killed", 3)
    run_train(cfg)
    assert lines(tmp_path / "killed") == lines(tmp_path / "whole")
    weights = [m["opd_weight"] for m in _metrics(tmp_path / "whole") if m["stage"] == "gad"]
    assert weights == pytest.approx([1.0, 0.75, 0.5, 0.25])
    both = [m for m in _metrics(tmp_path / "whole") if m["stage"] == "gad"]
    assert all(m["adv_seq_abs_mean"] > 0 and m["adv_token_abs_mean"] > 0 and 0 < m["adv_token_share"] < 1 for m in both)


def test_a_teacher_with_another_tokenizer_is_refused_and_padded_rows_accepted(teacher, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student, better = teacher
    other = tmp_path / "other_tokenizer"
    shutil.copytree(better, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<an_extra_token>"])
    tok.save_pretrained(other)
    run_dir = tmp_path / "refused"
    p = _gad_train_check(_short(tmp_path, "refused", student, **{"reward.source": "opd", "opd.teacher": str(other)}))
    assert p.returncode == 2, p.stdout + p.stderr
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "opd.teacher" in err[0] and "tokenizer differs" in err[0], p.stderr
    assert not run_dir.exists()
    # padded rows: the same tokenizer, 64 more embedding rows (as Qwen2.5-7B's 152,064 over 151,936 tokens)
    padded = tmp_path / "padded"
    model = AutoModelForCausalLM.from_pretrained(better)
    model.resize_token_embeddings(model.config.vocab_size + 64)
    model.save_pretrained(padded)
    AutoTokenizer.from_pretrained(better).save_pretrained(padded)
    run_train(_short(tmp_path, "padded_run", student, **{"reward.source": "opd", "opd.teacher": str(padded),
                                                        "train.total_steps": 3}))
    m = _metrics(tmp_path / "padded_run")[-1]
    assert m["stage"] == "gad" and m["opd_kl_k3"] > 0 and m["g_grad_norm"] > 0

"""gad-eval: score arithmetic, the judge protocol against the local server, reports, and test-set loaders."""

import asyncio
import json
import math
import os

import pytest
from conftest import KEY, read_json

from gad_megatron.data.collect import CollectConfig
from gad_megatron.data.prompts import PromptFormatError
from gad_megatron.eval import judge_prompts
from gad_megatron.eval.judge import UnparsableJudgeReply, aggregate, parse_scores, relative_score
from gad_megatron.eval.run import judge_items, summarize, write_report
from gad_megatron.eval.testsets import load_testset


def test_score_formula_and_aggregation_by_hand():
    assert relative_score(7, 8) == pytest.approx(700 / 15)
    assert relative_score(9, 9) == 50.0
    assert relative_score(3, 9) == 25.0
    items = [{"score": relative_score(7, 8), "response_tokens": 10}, {"score": 50.0, "response_tokens": 20},
             {"score": 25.0, "response_tokens": 30}, {"failed": True, "response_tokens": 1000}]
    agg = aggregate(items)
    assert agg["score"] == pytest.approx((700 / 15 + 50 + 25) / 3)
    assert (agg["judged"], agg["failed"], agg["mean_response_tokens"]) == (3, 1, 20.0)


def test_parse_scores():
    assert parse_scores("A is better.\nScore A: 8\nScore B: 6") == (8.0, 6.0)
    assert parse_scores("score a = 7.5\r\nscore b: 9") == (7.5, 9.0)
    for bad in ("I cannot decide.", "Score A: 11\nScore B: 3", "Score A: 5"):
        with pytest.raises(UnparsableJudgeReply):
            parse_scores(bad)


def test_judge_protocol_against_server(server_factory, tmp_path, monkeypatch):
    srv = server_factory()
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    items = [
        {"id": "a", "dataset": "dolly", "messages": [{"role": "user", "content": "q1 [want:6,4]"}]},
        {"id": "b", "dataset": "dolly", "messages": [{"role": "user", "content": "q2 [want:5,5]"}]},
        {"id": "c", "dataset": "vicuna", "messages": [{"role": "user", "content": "q3 [judge-garbage]"}]},
        {"id": "d", "dataset": "vicuna", "messages": [{"role": "user", "content": "q4 [want:2,8]"}]},
    ]
    answers = {(it["dataset"], it["id"]): (f"student answer {it['id']}", 5 + i) for i, it in enumerate(items)}
    cfg = CollectConfig(base_url=srv.url, model="judge-x", timeout_s=5, backoff_base_s=0.01, progress=False)
    out = tmp_path / "res.jsonl"
    rows = asyncio.run(judge_items(items, answers, str(out), cfg, "gad", parse_retries=2))
    by = {r["id"]: r for r in rows}
    assert by["a"]["score"] == 60.0 and by["b"]["score"] == 50.0 and by["d"]["score"] == 20.0
    assert by["a"]["reference_answer"].startswith("reference answer to: q1")
    assert by["c"]["failed"] and "unparsable judge reply after 3 tries" in by["c"]["error"] and "score" not in by["c"]
    assert all(r["judge_prompt_version"] == judge_prompts.VERSION and r["judge_model"] == "judge-x" for r in rows)
    st = srv.stats()
    score_user = judge_prompts.SCORE_USER.format(instruction="q3 [judge-garbage]", answer_a="student answer c",
                                                 answer_b="reference answer to: q3 [judge-garbage]")
    assert st["requests"][score_user] == 3  # retried, then recorded as a failure
    s = summarize(rows)["gad"]
    assert s["dolly"]["score"] == 55.0 and s["vicuna"] == {"score": 20.0, "judged": 1, "failed": 1, "mean_response_tokens": 8.0}
    # Resumable: a second run judges nothing again (the item that failed is not re-asked without retry_failed).
    total = st["total"]
    asyncio.run(judge_items(items, answers, str(out), cfg, "gad", retry_failed=False))
    assert srv.stats()["total"] == total
    assert KEY not in out.read_text()


def test_report_table_json_and_chart(tmp_path):
    rows = []
    for run, base in (("before", 40.0), ("seqkd", 45.0), ("gad", 50.0)):
        for ds in ("lmsys", "dolly"):
            rows += [{"id": f"{run}{ds}{i}", "run": run, "dataset": ds, "score": base + i, "response_tokens": 100,
                      "judge_prompt_version": judge_prompts.VERSION} for i in range(3)]
    paths = write_report(summarize(rows), str(tmp_path))
    md = open(paths["markdown"]).read()
    assert "| gad | 51.0 | 51.0 | 0 | 100 |" in md and "| before | 41.0 | 41.0 |" in md
    js = json.load(open(paths["json"]))
    assert js["runs"]["seqkd"]["lmsys"]["score"] == 46.0
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    rows.append({**rows[0], "id": "x", "judge_prompt_version": "old"})
    with pytest.raises(ValueError, match="mix judge prompt versions"):
        summarize(rows)


def test_testset_loaders(tmp_path):
    (tmp_path / "dolly.jsonl").write_text(json.dumps({"instruction": "Summarise", "context": "Some text", "response": "r",
                                                      "category": "summarization"}) + "\n")
    (tmp_path / "si.jsonl").write_text(json.dumps({"id": "s1", "instruction": "Translate", "instances": [{"input": "hola", "output": "hi"}]}) + "\n")
    (tmp_path / "vic.jsonl").write_text(json.dumps({"question_id": 7, "text": "Why?", "category": "generic"}) + "\n")
    lm = tmp_path / "lmsys.jsonl"
    lm.write_text("".join(json.dumps({"conversation_id": f"c{i}", "conversation": [{"role": "user", "content": f"u{i}"}]}) + "\n" for i in range(6)))
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"id": f"c{i}"}) + "\n" for i in range(4)))
    assert load_testset("dolly", str(tmp_path / "dolly.jsonl"))[0]["messages"][0]["content"] == "Summarise\n\nSome text"
    assert load_testset("selfinst", str(tmp_path / "si.jsonl"))[0] == {"id": "s1", "dataset": "selfinst", "messages": [{"role": "user", "content": "Translate\n\nhola"}]}
    assert load_testset("vicuna", str(tmp_path / "vic.jsonl"))[0]["id"] == "7"
    held = load_testset("lmsys", str(lm), str(train))
    assert sorted(it["id"] for it in held) == ["c4", "c5"]  # never a training prompt
    (tmp_path / "bad.jsonl").write_text(json.dumps({"context": "no instruction"}) + "\n")
    with pytest.raises(PromptFormatError, match=r"bad\.jsonl:1: missing field 'instruction'"):
        load_testset("dolly", str(tmp_path / "bad.jsonl"))
    assert math.isfinite(relative_score(1, 1))


def test_checkpoint_exports_are_per_model_in_a_shared_workdir(converted, tmp_path):
    """Two checkpoints evaluated with one output directory each get their own export (#9 item 1)."""
    from gad_megatron.eval.run import _hf_dir_for

    a = _hf_dir_for(converted["qwen2_tied"], str(tmp_path))
    b = _hf_dir_for(converted["llama31"], str(tmp_path))
    assert a != b
    assert read_json(os.path.join(a, "config.json"))["model_type"] == "qwen2"
    assert read_json(os.path.join(b, "config.json"))["model_type"] == "llama"
    assert _hf_dir_for(converted["qwen2_tied"], str(tmp_path)) == a  # the same model reuses its export

"""The training data shapes a user brings (#31 item 1): gad-collect's native rows, chat rows whose last turn is
the teacher's answer, prompt / response columns under any names; as JSONL, Parquet or a saved `datasets` folder.
Each gives the native rows' token ids; a row of no known shape is one error naming its keys and the ones wanted."""

import json

import pytest

from gad_megatron.data import demo
from gad_megatron.data.teacher import DataError, RowShape, read_rows, tokenize_rows

NATIVE = [json.loads(x) for x in open(demo.ASSET)][:24]


def chat_row(r):
    return {"id": r["id"], "messages": r["messages"] + [{"role": "assistant", "content": r["teacher_response"]}]}


def columns_row(r, prompt_key="question", response_key="gpt5_answer"):
    system, user = r["messages"]
    return {"id": r["id"], "system": system["content"], prompt_key: user["content"], response_key: r["teacher_response"]}


def write(path, rows, kind):
    if kind == "jsonl":
        path = f"{path}.jsonl"
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        return path
    import datasets

    ds = datasets.Dataset.from_list(rows)
    if kind == "parquet":
        ds.to_parquet(f"{path}.parquet")
        return f"{path}.parquet"
    ds.save_to_disk(str(path))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo.make_tokenizer(str(tmp_path_factory.mktemp("tok"))))


def tokens(path, tokenizer, shape=RowShape()):
    return [(e.id, e.prompt, e.response) for e in tokenize_rows(read_rows(path, shape=shape), tokenizer, 64, 16)]


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "datasets"])
def test_every_shape_gives_the_native_rows_tokens(kind, tokenizer, tmp_path):
    want = tokens(write(tmp_path / "native", NATIVE, "jsonl"), tokenizer)
    assert len(want) == len(NATIVE) and all(p and a for _, p, a in want)
    chat = write(tmp_path / "chat", [chat_row(r) for r in NATIVE], kind)
    assert tokens(chat, tokenizer) == want  # auto: the last assistant turn is the answer
    assert tokens(chat, tokenizer, RowShape("chat")) == want
    cols = write(tmp_path / "cols", [columns_row(r) for r in NATIVE], kind)
    named = RowShape("auto", prompt_key="question", response_key="gpt5_answer")
    assert tokens(cols, tokenizer, named) == want
    assert tokens(cols, tokenizer, RowShape("columns", "question", "gpt5_answer")) == want
    # verl's prompt column: chat turns, the answer in another column
    verl = write(tmp_path / "verl", [{"id": r["id"], "prompt": r["messages"], "response": r["teacher_response"]}
                                     for r in NATIVE], kind)
    assert tokens(verl, tokenizer) == want


def test_a_row_of_no_known_shape_names_its_keys_and_the_wanted_ones(tmp_path):
    rows = [chat_row(r) for r in NATIVE[:3]] + [{"id": "x", "messages": NATIVE[0]["messages"], "response": "a"}]
    path = write(tmp_path / "mixed", rows, "jsonl")
    with pytest.raises(DataError) as e:
        read_rows(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:4: ") and "\n" not in msg  # one line naming the file and line
    assert "['id', 'messages', 'response']" in msg and "'teacher_response'" in msg and "'prompt' and 'response'" in msg
    # a named format that does not fit: the keys found and the ones that format wants
    with pytest.raises(DataError, match=r":1: missing prompt or response column \(data.format=columns\): the row "
                                        r"has keys \['id', 'messages'\], wanted 'q' and 'a'"):
        read_rows(path, shape=RowShape("columns", "q", "a"))
    with pytest.raises(DataError, match=r"'messages\[-1\].content' must be a non-empty string"):
        read_rows(write(tmp_path / "empty", [{"messages": [{"role": "user", "content": "hi"},
                                                           {"role": "assistant", "content": " "}]}], "jsonl"))
    # chat rows without a user turn before the answer
    with pytest.raises(DataError, match="no user turn"):
        read_rows(write(tmp_path / "nouser", [{"messages": [{"role": "assistant", "content": "hi"}]}], "jsonl"))

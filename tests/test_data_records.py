"""Reading records (every layout in every file format, hub sources, bad input) and chat formatting."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from gradsift.data.formatting import IGNORE_INDEX, collate, encode, encode_records, length_batches
from gradsift.data.records import RecordError, read_records

# ----------------------------------------------------------------------------- writers


def write(rows: list[dict], path: Path) -> Path:
    """Write rows in the format given by the path's extension (CSV cells: lists as JSON)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    elif path.suffix == ".csv":
        flat = [{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows]
        pd.DataFrame(flat).to_csv(path, index=False)
    elif path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path, index=False)
    else:
        raise AssertionError(path)
    return path


FORMATS = [".jsonl", ".json", ".csv", ".parquet"]

PROMPT_ROWS = [
    {"prompt": "What is 2+2?", "response": "4", "source": "math"},
    {"prompt": "Name a colour.", "response": " Blue.\n", "source": "misc"},
]
MESSAGE_ROWS = [
    {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is 2+2?"},
                  {"role": "assistant", "content": "4"}], "source": "math"},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                  {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": " Blue.\n"}],
     "source": "misc"},
]
ALPACA_ROWS = [
    {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4", "source": "math"},
    {"instruction": "Name a colour.", "input": "", "output": " Blue.\n", "source": "misc"},
]

EXPECTED = {
    "prompt": [
        {"row": 0, "messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
         "meta": {"source": "math"}},
        {"row": 1, "messages": [{"role": "user", "content": "Name a colour."},
                                {"role": "assistant", "content": " Blue.\n"}], "meta": {"source": "misc"}},
    ],
    "messages": [
        {"row": 0, "messages": MESSAGE_ROWS[0]["messages"], "meta": {"source": "math"}},
        {"row": 1, "messages": MESSAGE_ROWS[1]["messages"], "meta": {"source": "misc"}},
    ],
    "alpaca": [
        {"row": 0, "messages": [{"role": "user", "content": "Add the numbers.\n\n2 and 2"},
                                {"role": "assistant", "content": "4"}], "meta": {"source": "math"}},
        {"row": 1, "messages": [{"role": "user", "content": "Name a colour."},
                                {"role": "assistant", "content": " Blue.\n"}], "meta": {"source": "misc"}},
    ],
}
LAYOUT_ROWS = {"prompt": PROMPT_ROWS, "messages": MESSAGE_ROWS, "alpaca": ALPACA_ROWS}


@pytest.mark.parametrize("suffix", FORMATS)
@pytest.mark.parametrize("layout", ["prompt", "messages", "alpaca"])
def test_every_layout_in_every_format(tmp_path, layout, suffix):
    path = write(LAYOUT_ROWS[layout], tmp_path / f"data{suffix}")
    assert read_records(path) == EXPECTED[layout]
    assert read_records(str(path), limit=1) == EXPECTED[layout][:1]


def test_json_data_wrapper_and_field_options_and_system_column(tmp_path):
    path = tmp_path / "qa.json"
    path.write_text(json.dumps({"data": [
        {"question": "Capital of France?", "answer": "Paris", "system": "Answer in one word.", "id": 7},
        {"question": "Capital of Italy?", "answer": "Rome", "system": "", "id": 8},
    ]}))
    assert read_records(path, prompt_field="question", response_field="answer") == [
        {"row": 0, "messages": [{"role": "system", "content": "Answer in one word."},
                                {"role": "user", "content": "Capital of France?"},
                                {"role": "assistant", "content": "Paris"}], "meta": {"id": 7}},
        {"row": 1, "messages": [{"role": "user", "content": "Capital of Italy?"},
                                {"role": "assistant", "content": "Rome"}], "meta": {"id": 8}},
    ]
    convo = tmp_path / "convo.jsonl"
    write([{"turns": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "sys": "S"}], convo)
    assert read_records(convo, messages_field="turns", system_field="sys")[0]["messages"] == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]


def test_hub_source_goes_through_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(ALPACA_ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert read_records("hf:someone/alpaca-like:cfg@test") == EXPECTED["alpaca"]
    assert read_records("hf:someone/alpaca-like", limit=1) == EXPECTED["alpaca"][:1]
    assert calls == [("someone/alpaca-like", "cfg", "test"), ("someone/alpaca-like", None, "train")]


def test_hub_failure_is_one_line(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network\nat all")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RecordError, match=r"^hf:x/y: cannot load from the hub: ConnectionError: no network at all$"):
        read_records("hf:x/y")


# ----------------------------------------------------------------------------- bad input


def _error(path, **kwargs) -> str:
    with pytest.raises(RecordError) as info:
        read_records(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("suffix", FORMATS)
def test_missing_field_names_file_row_field(tmp_path, suffix):
    rows = [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}, {"prompt": "e", "other": "f"}]
    if suffix in (".jsonl", ".json"):
        path = write(rows, tmp_path / f"bad{suffix}")
        msg = _error(path)
        assert msg == f"{path}: row 2: field 'response': missing"
    else:  # tables have every column in every row: a missing value shows up as empty / null
        rows = [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}, {"prompt": "e", "response": None}]
        path = write(rows, tmp_path / f"bad{suffix}")
        problem = "empty" if suffix == ".csv" else "missing (null value)"  # CSV cannot tell null from ''
        assert _error(path) == f"{path}: row 2: field 'response': {problem}"


def test_empty_response_and_non_string(tmp_path):
    path = write([{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "  \n"}], tmp_path / "empty.jsonl")
    assert _error(path) == f"{path}: row 1: field 'response': empty"
    path = write([{"prompt": "a", "response": 3}], tmp_path / "int.jsonl")
    assert _error(path) == f"{path}: row 0: field 'response': expected a string, got int"
    path = write([{"question": "q", "answer": ""}], tmp_path / "mapped.csv")
    assert _error(path, prompt_field="question", response_field="answer") == f"{path}: row 0: field 'answer': empty"
    path = write([{"instruction": "i", "input": "", "output": "o"}, {"instruction": "", "output": "o"}],
                 tmp_path / "alpaca.json")
    assert _error(path) == f"{path}: row 1: field 'instruction': empty"


def test_bad_messages(tmp_path):
    path = write([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                  {"messages": [{"role": "assistant", "content": "b"}, {"role": "user", "content": "a"}]}],
                 tmp_path / "m.jsonl")
    msg = _error(path)
    assert msg.startswith(f"{path}: row 1: field 'messages': the last message must be the assistant's")
    path = write([{"messages": [{"role": "robot", "content": "a"}, {"role": "assistant", "content": "b"}]}],
                 tmp_path / "r.jsonl")
    assert _error(path).startswith(f"{path}: row 0: field 'messages[0]': role must be one of")
    path = write([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]}],
                 tmp_path / "e.jsonl")
    assert _error(path).startswith(f"{path}: row 0: field 'messages[1]': empty response")


def test_unreadable_and_unknown_files(tmp_path):
    missing = tmp_path / "nowhere.jsonl"
    assert _error(missing) == f"{missing}: no such file"
    txt = tmp_path / "data.txt"
    txt.write_text("prompt,response\n")
    assert _error(txt).startswith(f"{txt}: unknown file type '.txt'")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", \n')
    assert _error(broken).startswith(f"{broken}: line 2: invalid JSON")
    bad_json = tmp_path / "broken.json"
    bad_json.write_text("[{]")
    assert _error(bad_json).startswith(f"{bad_json}: invalid JSON at line 1")
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"not a parquet file at all")
    assert _error(corrupt).startswith(f"{corrupt}: cannot read the file: ")
    unknown = write([{"question": "q", "answer": "a"}], tmp_path / "qa.jsonl")
    expected = f"{unknown}: row 0: cannot tell the layout from the columns ['answer', 'question']"
    assert _error(unknown).startswith(expected)


# ----------------------------------------------------------------------------- formatting

CONVO = [{"role": "user", "content": "What is the capital of France?"},
         {"role": "assistant", "content": "The capital of France is Paris."}]


def _template_ids(tokenizer, messages, generation_prompt=False) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_labels_cover_response_and_end_of_turn(tokenizer):
    out = encode(tokenizer, CONVO, max_length=512)
    ids, labels = out["input_ids"], out["labels"]
    prompt = _template_ids(tokenizer, CONVO[:1], generation_prompt=True)
    n = len(prompt)
    assert ids[:n] == prompt
    assert labels[:n] == [IGNORE_INDEX] * n
    assert all(label != IGNORE_INDEX for label in labels[n:])
    assert labels[n:] == ids[n:]
    # Documented choice: the sample ends on <|im_end|>; the template's trailing newline is dropped.
    assert tokenizer.decode(labels[n:]) == "The capital of France is Paris.<|im_end|>"
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    full = _template_ids(tokenizer, CONVO)
    assert tokenizer.decode(full[len(ids):]) == "\n"
    assert full[: len(ids)] == ids


def test_multi_turn_labels_only_last_answer(tokenizer):
    convo = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
             {"role": "assistant", "content": "4"}]
    out = encode(tokenizer, convo, max_length=512)
    labelled = [t for t in out["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == "4<|im_end|>"
    assert tokenizer.decode(out["input_ids"]).startswith("<|im_start|>system\nYou are terse.<|im_end|>")


def test_truncation_keeps_response_and_end_of_prompt(tokenizer):
    convo = [{"role": "user", "content": " ".join(f"word{i}" for i in range(200))},
             {"role": "assistant", "content": "Done."}]
    prompt = _template_ids(tokenizer, convo[:1], generation_prompt=True)
    response = tokenizer("Done.<|im_end|>", add_special_tokens=False)["input_ids"]
    out = encode(tokenizer, convo, max_length=len(response) + 12)
    assert out["input_ids"] == prompt[-12:] + response
    assert out["labels"] == [IGNORE_INDEX] * 12 + response
    kept = tokenizer.decode(out["input_ids"][:12])
    assert kept.endswith(" word199<|im_end|>\n<|im_start|>assistant\n") and "word0 " not in kept

    # No room for any prompt token: the response is cut from the right.
    long = [{"role": "user", "content": "Count."}, {"role": "assistant", "content": " ".join(["one"] * 50)}]
    response = tokenizer(" ".join(["one"] * 50), add_special_tokens=False)["input_ids"]
    out = encode(tokenizer, long, max_length=10)
    assert out["input_ids"] == response[:10]
    assert out["labels"] == response[:10]


def test_unkeepable_row_raises(tokenizer):
    with pytest.raises(RecordError, match=r"^train\.jsonl: row 7: field 'messages': max_length=0"):
        encode(tokenizer, CONVO, max_length=0, row=7, source="train.jsonl")


def test_plain_fallback_without_chat_template(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    out = encode(plain, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], 64)
    assert plain.decode(out["input_ids"]) == "### Instruction:\nHi\n\n### Response:\nHello<|im_end|>"
    assert plain.decode([t for t in out["labels"] if t != IGNORE_INDEX]) == "Hello<|im_end|>"


def test_encode_records_keeps_rows(tokenizer):
    other = CONVO[:1] + [{"role": "assistant", "content": "Paris."}]
    records = [{"row": 4, "messages": CONVO}, {"row": 9, "messages": other}]
    feats = encode_records(tokenizer, records, 64)
    assert [f["row"] for f in feats] == [4, 9]
    assert tokenizer.decode([t for t in feats[1]["labels"] if t != IGNORE_INDEX]) == "Paris.<|im_end|>"


def test_collate_right_pads():
    feats = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "row": 3},
             {"input_ids": [8], "labels": [8], "row": 11}]
    batch = collate(feats, pad_token_id=0)
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 0, 0]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([[-100, 6, 7], [8, -100, -100]]))
    assert torch.equal(batch["row"], torch.tensor([3, 11]))
    assert all(t.dtype == torch.long for t in batch.values())


def test_length_batches():
    lengths = [5, 1, 3, 1, 4, 9, 2]
    assert length_batches(lengths, 3) == [[1, 3, 6], [2, 4, 0], [5]]
    shuffled = length_batches(lengths, 2, shuffle=True, seed=3)
    assert sorted(i for b in shuffled for i in b) == list(range(len(lengths)))
    assert sorted(map(tuple, shuffled)) == sorted(map(tuple, length_batches(lengths, 2)))
    assert shuffled == length_batches(lengths, 2, shuffle=True, seed=3)
    orders = {tuple(map(tuple, length_batches(list(range(40)), 2, shuffle=True, seed=s))) for s in range(5)}
    assert len(orders) > 1
    with pytest.raises(ValueError):
        length_batches(lengths, 0)

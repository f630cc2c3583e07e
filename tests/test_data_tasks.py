"""The task registry on the real public data copies and on rows written in the hub formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradsift.data.records import RecordError
from gradsift.tasks import load_task
from gradsift.tasks.hub import HUB_TASKS, SQUAD_INSTRUCTION, UNANSWERABLE


def _write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _rows(task) -> tuple[set[int], set[int]]:
    return {r["row"] for r in task.train}, {e["row"] for e in task.eval}


# ----------------------------------------------------------------------------- gsm8k


def test_gsm8k_local_folder(shared_data):
    task = load_task("gsm8k", path=str(shared_data / "gsm8k"))
    assert (task.name, task.metric) == ("gsm8k", "gsm8k")
    assert (len(task.train), len(task.eval)) == (7473, 1319)  # MANIFEST row counts
    # Row 0 of train.jsonl, written out by hand with the <<...>> annotations removed.
    assert task.train[0]["messages"][-1] == {
        "role": "assistant",
        "content": "Natalia sold 48/2 = 24 clips in May.\n"
                   "Natalia sold 48+24 = 72 clips altogether in April and May.\n#### 72",
    }
    assert all("<<" not in r["messages"][-1]["content"] for r in task.train)
    # A known test row: the reference is the number on the raw file's final '#### ' line.
    lines = (shared_data / "gsm8k" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    raw = json.loads(lines[0])
    assert raw["answer"].splitlines()[-1] == "#### 18"
    item = task.eval[0]
    assert item["row"] == 0 and item["reference"] == "18"
    assert item["messages"] == [{"role": "user", "content": raw["question"]}]
    raw_last = json.loads(lines[-1])
    assert task.eval[-1]["reference"] == raw_last["answer"].rsplit("#### ", 1)[1].replace(",", "")


def test_gsm8k_sampling_is_deterministic_and_by_seed(shared_data):
    kwargs = dict(path=str(shared_data / "gsm8k"), n_train=40, n_eval=15)
    a = load_task("gsm8k", seed=1, **kwargs)
    b = load_task("gsm8k", seed=1, **kwargs)
    c = load_task("gsm8k", seed=2, **kwargs)
    assert (len(a.train), len(a.eval)) == (40, 15)
    assert a.train == b.train and a.eval == b.eval
    assert _rows(a)[0] != _rows(c)[0]
    rows = [r["row"] for r in a.train]
    assert rows == sorted(rows) and len(set(rows)) == 40


def test_gsm8k_single_file_holds_out(shared_data):
    task = load_task("gsm8k", path=str(shared_data / "gsm8k" / "test.jsonl"), n_eval=100, seed=5)
    train, evals = _rows(task)
    assert len(evals) == 100 and len(train) == 1319 - 100
    assert train.isdisjoint(evals) and train | evals == set(range(1319))


def test_gsm8k_hub_path(monkeypatch):
    import datasets

    splits = {
        "train": [{"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"},
                  {"question": "2*500?", "answer": "2*500=<<2*500=1000>>1000\n#### 1,000"}],
        "test": [{"question": "3+4?", "answer": "3+4=<<3+4=7>>7\n#### 7"}],
    }
    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(splits[split])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = load_task("gsm8k")
    assert sorted(calls) == [("openai/gsm8k", "main", "test"), ("openai/gsm8k", "main", "train")]
    assert [r["messages"][-1]["content"] for r in task.train] == ["1+1=2\n#### 2", "2*500=1000\n#### 1,000"]
    assert [e["reference"] for e in task.eval] == ["7"]


# ----------------------------------------------------------------------------- squad_v2


def test_squad_v2_nested_file(shared_data):
    task = load_task("squad_v2", path=str(shared_data / "squad_v2" / "small.json"))
    assert task.metric == "squad_v2"
    train, evals = _rows(task)
    assert train.isdisjoint(evals) and train | evals == set(range(626))  # MANIFEST: 626 questions
    impossible_train = [r for r in task.train if r["messages"][-1]["content"] == UNANSWERABLE]
    impossible_eval = [e for e in task.eval if e["reference"] == []]
    assert len(impossible_train) + len(impossible_eval) == 333  # MANIFEST: 333 unanswerable
    # The first question of the file (id 56ddde6b9a695914005b9628) has four gold answers, all "France".
    by_id = {r["meta"]["id"]: r for r in task.train} | {e["meta"]["id"]: e for e in task.eval}
    first = by_id["56ddde6b9a695914005b9628"]
    assert first["row"] == 0 and first["meta"]["title"] == "Normans"
    prompt = first["messages"][0]["content"]
    assert prompt.startswith(SQUAD_INSTRUCTION + "\n\nContext:\nThe Normans (Norman: Nourmands;")
    assert prompt.endswith("\n\nQuestion: In what country is Normandy located?")
    if "reference" in first:
        assert first["reference"] == ["France"] * 4
    else:
        assert first["messages"][-1] == {"role": "assistant", "content": "France"}


def test_squad_v2_hub_rows(monkeypatch, tmp_path):
    import datasets

    flat = [
        {"id": "a", "title": "T", "context": "Paris is in France.", "question": "Where is Paris?",
         "answers": {"text": ["France", "in France"], "answer_start": [12, 9]}},
        {"id": "b", "title": "T", "context": "Paris is in France.", "question": "Who built Paris?",
         "answers": {"text": [], "answer_start": []}},
    ]
    def fake_load_dataset(name, config=None, split=None):
        assert (name, config) == ("rajpurkar/squad_v2", None)
        return datasets.Dataset.from_list(flat)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = load_task("squad_v2")
    assert [r["messages"][-1]["content"] for r in task.train] == ["France", UNANSWERABLE]
    # The same rows as a local parquet file in the hub's layout.
    path = tmp_path / "squad.parquet"
    datasets.Dataset.from_list(flat).to_parquet(str(path))
    local = load_task("squad_v2", path=str(path), n_eval=1, seed=0)
    (held,) = local.eval
    assert held["reference"] == (["France", "in France"] if held["row"] == 0 else [])


# ----------------------------------------------------------------------------- alpaca


def test_alpaca_small(shared_data):
    path = shared_data / "alpaca" / "alpaca_small.json"
    task = load_task("alpaca", path=str(path), seed=3)
    train, evals = _rows(task)
    assert (len(train), len(evals)) == (1800, 200)
    assert train.isdisjoint(evals) and train | evals == set(range(2000))
    raw = json.loads(path.read_text(encoding="utf-8"))
    by_row = {r["row"]: r["messages"] for r in task.train} | {e["row"]: e["messages"] for e in task.eval}
    with_input = [i for i, m in by_row.items() if m[0]["content"] != raw[i]["instruction"]]
    assert len(with_input) == 753  # MANIFEST: 753 rows have a non-empty input
    i = with_input[0]
    assert by_row[i][0]["content"] == raw[i]["instruction"] + "\n\n" + raw[i]["input"]
    for e in task.eval:
        assert e["reference"] == raw[e["row"]]["output"]


# ----------------------------------------------------------------------------- dolly / medmcqa

DOLLY = [
    {"instruction": f"Question {i}?", "context": "Some context." if i % 2 else "", "response": f"Answer {i}.",
     "category": "closed_qa" if i % 2 else "open_qa"}
    for i in range(10)
]


def test_dolly_published_format(tmp_path):
    path = _write_jsonl(DOLLY, tmp_path / "databricks-dolly-15k.jsonl")
    task = load_task("dolly", path=str(path), n_eval=3, seed=0)
    assert task.metric == "rougeL"
    train, evals = _rows(task)
    assert (len(train), len(evals)) == (7, 3) and train.isdisjoint(evals) and train | evals == set(range(10))
    every = {r["row"]: r for r in task.train} | {e["row"]: e for e in task.eval}
    assert every[1]["messages"][0]["content"] == "Question 1?\n\nContext:\nSome context."
    assert every[2]["messages"][0]["content"] == "Question 2?"
    assert every[1]["meta"] == {"category": "closed_qa"}
    for r in task.train:
        assert r["messages"][-1] == {"role": "assistant", "content": f"Answer {r['row']}."}
    for e in task.eval:
        assert e["reference"] == f"Answer {e['row']}." and len(e["messages"]) == 1


def test_dolly_bad_row_names_file_row_field(tmp_path):
    rows = DOLLY[:3] + [{"instruction": "Q?", "context": "", "response": "   ", "category": "x"}]
    path = _write_jsonl(rows, tmp_path / "dolly.jsonl")
    with pytest.raises(RecordError, match=rf"^{path}: row 3: field 'response': empty$"):
        load_task("dolly", path=str(path), n_eval=1)


MEDMCQA = [
    {"id": "m0", "question": "Which vitamin is made in the skin?", "opa": "Vitamin A", "opb": "Vitamin C",
     "opc": "Vitamin D", "opd": "Vitamin K", "cop": 2, "exp": "UV light converts 7-dehydrocholesterol.",
     "subject_name": "Physiology"},
    {"id": "m1", "question": "Normal adult heart rate?", "opa": "20-40", "opb": "60-100", "opc": "120-160",
     "opd": "180-200", "cop": 1, "exp": None, "subject_name": "Physiology"},
]


def test_medmcqa_published_format(tmp_path):
    folder = tmp_path / "medmcqa"
    folder.mkdir()
    _write_jsonl(MEDMCQA, folder / "train.jsonl")
    _write_jsonl(MEDMCQA[1:], folder / "validation.jsonl")
    task = load_task("medmcqa", path=str(folder))
    assert task.metric == "mcq"
    assert task.train[0]["messages"] == [
        {"role": "user", "content": "Which vitamin is made in the skin?\n\nA. Vitamin A\nB. Vitamin C\nC. Vitamin D\n"
                                    "D. Vitamin K\n\nAnswer with the letter of the correct option."},
        {"role": "assistant", "content": "C"},
    ]
    assert task.train[0]["meta"] == {"id": "m0", "subject_name": "Physiology"}
    assert [e["reference"] for e in task.eval] == ["B"]
    explained = load_task({"name": "medmcqa", "path": str(folder), "with_explanation": True})
    assert [r["messages"][-1]["content"] for r in explained.train] == [
        "C\n\nExplanation: UV light converts 7-dehydrocholesterol.", "B"]


def test_medmcqa_bad_answer_index(tmp_path):
    path = _write_jsonl([MEDMCQA[0], dict(MEDMCQA[1], cop=4)], tmp_path / "train.jsonl")
    with pytest.raises(RecordError, match=rf"^{path}: row 1: field 'cop': expected the correct option's index 0-3"):
        load_task("medmcqa", path=str(path), n_eval=1)


# ----------------------------------------------------------------------------- user files and errors


def test_user_file_task(tmp_path):
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(20)]
    path = _write_jsonl(rows, tmp_path / "mine.jsonl")
    task = load_task(str(path), seed=4)
    assert (task.name, task.metric) == ("mine", "rougeL")
    train, evals = _rows(task)
    assert (len(train), len(evals)) == (18, 2) and train.isdisjoint(evals)
    for e in task.eval:
        assert e["messages"] == [{"role": "user", "content": f"p{e['row']}"}] and e["reference"] == f"r{e['row']}"
    eval_path = _write_jsonl([{"q": "x", "a": "y"}], tmp_path / "mine_eval.jsonl")
    train_path = _write_jsonl([{"q": f"q{i}", "a": f"a{i}"} for i in range(5)], tmp_path / "qa.jsonl")
    task = load_task({"path": str(train_path), "eval_path": str(eval_path), "prompt_field": "q",
                      "response_field": "a", "metric": "exact"}, n_train=3)
    assert len(task.train) == 3 and task.metric == "exact"
    assert task.eval == [{"row": 0, "messages": [{"role": "user", "content": "x"}], "reference": "y", "meta": {}}]


def test_unknown_task_lists_choices():
    with pytest.raises(ValueError) as info:
        load_task("not-a-task")
    message = str(info.value)
    assert message.startswith("unknown task 'not-a-task'")
    for name in ("dolly", "gsm8k", "medmcqa", "squad_v2", "alpaca"):
        assert name in message
    assert set(HUB_TASKS) == {"dolly", "gsm8k", "medmcqa", "squad_v2", "alpaca"}


def test_bad_options(tmp_path):
    with pytest.raises(ValueError, match="unknown option"):
        load_task({"name": "gsm8k", "with_explanation": True})
    with pytest.raises(ValueError, match="n_train"):
        load_task("gsm8k", n_train=-1)
    path = _write_jsonl([{"prompt": "p", "response": "r"}], tmp_path / "one.jsonl")
    with pytest.raises(ValueError, match="cannot be split"):
        load_task(str(path))


def test_register_task_binds_a_name_to_its_loader(monkeypatch):
    from gradsift.tasks import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    calls = []

    @registry.register_task("toy", options=("size",))
    def toy(n_train, n_eval, seed, *, size=1):
        """A toy task."""
        calls.append((n_train, n_eval, seed, size))
        rec = {"row": 0, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
               "meta": {}}
        return registry.Task("toy", [rec] * size, [], "exact")

    task = load_task({"name": "toy", "size": 3, "n_train": 5, "seed": 2, "metric": "rougeL"})
    assert calls == [(5, None, 2, 3)]
    assert len(task.train) == 3 and task.metric == "rougeL"
    assert "toy" in registry.task_names()
    assert registry.registered_task("toy").description == "A toy task."
    with pytest.raises(ValueError, match=r"unknown option\(s\) colour \(task options: size\)"):
        load_task({"name": "toy", "colour": "red"})
    with pytest.raises(ValueError, match="generated: it takes no path"):
        load_task({"name": "toy", "path": "x.jsonl"})
    with pytest.raises(ValueError, match="already registered"):
        registry.register_task("gsm8k", toy)

"""`gradsift run` end to end on a tiny model, and the demo config."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from gradsift.cli import app
from gradsift.pipeline import _apply_quick, demo_config_path
from gradsift.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_demo_config_is_valid_and_quick_trims_it():
    path = demo_config_path()
    assert path == ROOT / "src" / "gradsift" / "configs" / "demo.yaml"
    cfg = load_config(path)
    assert cfg.model.name_or_path == "embedded-aligned-precise"
    assert [m.name for m in cfg.methods] == ["standard", "random", "moderate"]
    assert len(cfg.tasks) >= 3
    full = yaml.safe_load(path.read_text())
    quick = _apply_quick(yaml.safe_load(path.read_text()))
    assert [m["name"] for m in quick["method"]] == ["standard", "moderate"]
    assert [t["n_train"] for t in quick["tasks"]] == [min(t["n_train"], 32) for t in full["tasks"]]
    assert all(t["n_eval"] == 8 for t in quick["tasks"])
    assert [s["n"] for s in quick["eval"]["safety"]] == [16]
    assert [s["n"] for s in quick["eval"]["over_refusal"]] == [12]
    assert quick["eval"]["generation"]["max_new_tokens"] == 24


def test_run_trains_evaluates_and_reports(tmp_path):
    config = {
        "model": {"tokenizer": "embedded",
                  "config": {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
                             "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                             "max_position_embeddings": 256, "tie_word_embeddings": True},
                  "lora": {"r": 2, "alpha": 4, "dropout": 0.0}},
        "tasks": [{"name": "mcq", "n_train": 8, "n_eval": 3, "max_length": 96},
                  {"name": "arith", "n_train": 8, "n_eval": 3, "max_length": 96}],
        "method": [{"name": "standard"}, {"name": "moderate", "rho": 0.5}],
        "optim": {"lr": 1e-3, "batch_size": 4},
        "eval": {"generation": {"max_new_tokens": 4, "batch_size": 8},
                 "safety": [{"set": "builtin_harmful", "n": 4}], "over_refusal": [{"set": "builtin_benign", "n": 4}]},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["run", str(path), "--output", str(out)])
    assert res.exit_code == 0, res.output
    html = (out / "report.html").read_text()
    assert 'id="paper-table"' in html and "data:image/png;base64," in html
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    runs = {r["run"] for r in rows}
    assert runs == {"standard-seed0", "moderate-seed0"}
    for run in runs:  # every task scored at every stage (the full R matrix), safety at every stage
        for stage in (0, 1, 2):
            got = {(r["task"], r["metric"]) for r in rows if r["run"] == run and r["stage"] == stage}
            assert {("mcq", "score"), ("arith", "score"), ("safety/builtin_harmful", "asr/keyword"),
                    ("overrefusal/builtin_benign", "over_refusal")} <= got
    assert "standard" in res.output and "moderate" in res.output  # the markdown summary


def test_run_bad_config_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"tasks": [{"name": "nope"}]}))
    res = CliRunner().invoke(app, ["run", str(path)])
    assert res.exit_code == 2 and "tasks.0.name" in res.output and "Traceback" not in res.output


def test_demo_organisms_are_named_recipes_and_the_a4_config_stays_valid():
    from gradsift.organisms import ORGANISMS, shipped_adapter

    demo = load_config(demo_config_path())
    recipe = ORGANISMS[demo.model.name_or_path]
    assert recipe.epochs == 2  # the recipe that meets both targets (A20)
    assert shipped_adapter(recipe) is not None  # a fresh machine merges it instead of training for half an hour
    assert [t.name for t in demo.tasks][0] == "howto"
    path = demo_config_path("demo-a4")
    assert path == ROOT / "src" / "gradsift" / "configs" / "demo-a4.yaml"
    a4 = load_config(path)
    assert a4.model.name_or_path == "embedded-aligned" and "embedded-aligned" in ORGANISMS
    assert [t.name for t in a4.tasks] == ["mcq", "yesno", "arith"]
    assert [m.name for m in a4.methods] == ["standard", "random", "moderate"]
    assert yaml.safe_load(path.read_text())["eval"] == yaml.safe_load(demo_config_path().read_text())["eval"]

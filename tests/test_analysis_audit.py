"""The sample audit: features, Spearman, bands and samples against hand computations; the CLI on a
tiny model; the report section."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from gradsift.analysis.audit import audit_samples, read_audit, sample_table
from gradsift.cli import app

runner = CliRunner()

# ten samples: G falls as the response grows (rank correlation -1); L rises with the row
LENGTHS = [2, 3, 5, 8, 13, 21, 34, 55, 89, 144]
G = [9.0, 8.0, 7.0, 6.0, 5.0, 4.5, 4.0, 3.0, 2.0, 1.0]
L = [0.5, 1.5, 1.0, 2.0, 2.5, 0.7, 3.0, 0.9, 1.2, 1.1]
CATS = ["classification", "classification", "open_qa", "open_qa", "open_qa",
        "brainstorming", "brainstorming", "brainstorming", "open_qa", "brainstorming"]


def _scores() -> pd.DataFrame:
    return pd.DataFrame({"row": range(10), "G": G, "L": L, "n_response_tokens": LENGTHS,
                         "n_tokens": [n + 20 for n in LENGTHS]})


def _data(tmp_path):
    rows = [{"prompt": f"question {i}", "response": " ".join(["word"] * n), "category": c}
            for i, (n, c) in enumerate(zip(LENGTHS, CATS))]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def test_audit_by_hand(tmp_path):
    from gradsift.data.records import read_records, read_rows

    path, raw = _data(tmp_path)
    t = sample_table(_scores(), read_records(path), read_rows(path))
    assert t["perplexity"].tolist() == pytest.approx([math.exp(x) for x in L])
    assert t["total_loss"].tolist() == pytest.approx([a * b for a, b in zip(L, LENGTHS)])
    assert t["n_prompt_tokens"].tolist() == [20] * 10
    assert t["category"].tolist() == CATS
    summary, t = audit_samples(t, rho=0.2, n_show=2)
    sp = summary["spearman"]
    assert sp["n_response_tokens"]["rho"] == pytest.approx(-1.0)
    # L ranks 1,6,4,7,8,2,9,3,5,... by hand: d = rank(G) - rank(L) with rank(G) = 10..1
    rg = np.arange(10, 0, -1)
    rl = np.argsort(np.argsort(L)) + 1
    assert sp["L"]["rho"] == pytest.approx(1 - 6 * np.sum((rg - rl) ** 2) / (10 * 99))
    assert sp["perplexity"]["rho"] == pytest.approx(sp["L"]["rho"])
    assert math.isnan(sp["n_prompt_tokens"]["rho"])  # constant
    assert math.isnan(sp["L"]["rho_given_length"])  # length fixes the order of G completely here
    assert "rho_given_length" not in sp["n_response_tokens"]
    # bands of 2: High = rows 0, 1 (largest G); Low = rows 8, 9; Moderate = the 2 closest to the median 4.75
    b = summary["bands"]
    assert t.loc[t["band"] == "high", "row"].tolist() == [0, 1]
    assert t.loc[t["band"] == "low", "row"].tolist() == [8, 9]
    assert t.loc[t["band"] == "moderate", "row"].tolist() == [4, 5]  # |5 - 4.75|, |4.5 - 4.75|
    assert b["high"]["response_tokens_mean"] == pytest.approx((2 + 3) / 2)
    assert b["moderate"]["response_tokens_mean"] == pytest.approx((13 + 21) / 2)
    assert b["low"]["L_mean"] == pytest.approx((1.2 + 1.1) / 2)
    assert b["all"]["response_tokens_median"] == pytest.approx((13 + 21) / 2)
    cats = summary["categories"]["per_category"]
    assert cats["classification"]["high_share"] == 1.0 and cats["open_qa"]["n"] == 4
    assert cats["brainstorming"]["low_share"] == pytest.approx(1 / 4)
    assert 0 < summary["categories"]["kruskal"]["p"] < 1
    # the extremes, whole
    assert [s["row"] for s in summary["top"]] == [0, 1] and [s["row"] for s in summary["bottom"]] == [9, 8]
    assert summary["bottom"][0]["response"] == raw[9]["response"]
    assert summary["top"][0]["prompt"] == "question 0"


def test_style_ratio_and_errors(tmp_path):
    t = sample_table(_scores(), typical_tokens=20.0)
    assert t["length_ratio"].tolist() == pytest.approx([n / 20 for n in LENGTHS])
    assert t["short"].tolist() == [n < 10 for n in LENGTHS]
    with pytest.raises(ValueError, match="lacks column"):
        sample_table(_scores().drop(columns="G"))
    path, _ = _data(tmp_path)
    from gradsift.data.records import read_records, read_rows

    with pytest.raises(ValueError, match="no row 5"):
        sample_table(_scores(), read_records(path, limit=5))
    with pytest.raises(KeyError, match="nosuch"):
        sample_table(_scores(), raw_rows=read_rows(path), category_field="nosuch")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=len(tokenizer), tie_word_embeddings=True,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_cli_audit_on_a_tiny_model_and_the_report_section(tiny_model_dir, shared_data, tmp_path, monkeypatch):
    data = shared_data / "alpaca" / "alpaca_small.json"
    run = tmp_path / "run"
    scores = run / "scores.parquet"
    res = runner.invoke(app, ["score", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(scores),
                              "--limit", "10", "--max-length", "64", "-b", "5"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["study", "audit", str(scores), "--data", str(data), "--model", str(tiny_model_dir),
                              "--n-style", "2", "--max-new-tokens", "4", "--show", "1"])
    assert res.exit_code == 0, res.output
    assert "Sample audit (10 samples" in res.output and "Highest G_i" in res.output
    doc = read_audit(run / "analysis" / "audit")
    table = pd.read_parquet(run / "analysis" / "audit" / "audit.parquet")
    s = pd.read_parquet(scores)
    assert doc["spearman"]["n_response_tokens"]["rho"] == pytest.approx(
        s["G"].rank().corr(s["n_response_tokens"].rank()))  # Pearson of the ranks
    assert doc["style"]["n"] == 2 and doc["style"]["max_new_tokens"] == 4
    assert 0 < doc["style"]["median_tokens"] <= 4
    assert set(table["category"]) <= {"with input", "no input"}
    raw = json.loads(data.read_text())[:10]
    top = doc["top"][0]
    assert top["row"] == int(s.loc[s["G"].idxmax(), "row"]) and top["response"] == raw[top["row"]]["output"]

    # a rerun with the same model and settings reuses the measured replies
    def no_generation(*a, **k):
        raise AssertionError("generated again")

    monkeypatch.setattr("gradsift.analysis.audit.typical_reply_length", no_generation)
    res = runner.invoke(app, ["study", "audit", str(scores), "--data", str(data), "--model", str(tiny_model_dir),
                              "--n-style", "2", "--max-new-tokens", "4", "--rho", "0.3"])
    assert res.exit_code == 0, res.output
    again = read_audit(run / "analysis" / "audit")
    assert again["style"]["lengths"] == doc["style"]["lengths"] and again["rho"] == 0.3
    res = runner.invoke(app, ["study", "audit", str(scores), "--data", str(data), "--model", str(tiny_model_dir),
                              "--n-style", "3", "--max-new-tokens", "4"])
    assert res.exit_code != 0  # other settings: measured again (here: the patched generator refuses)
    monkeypatch.undo()
    res = runner.invoke(app, ["study", "audit", str(scores), "--data", str(data), "--model", str(tiny_model_dir),
                              "--n-style", "2", "--max-new-tokens", "4", "--show", "1"])
    assert res.exit_code == 0, res.output
    doc = read_audit(run / "analysis" / "audit")

    # the report of a run directory holding the audit shows it
    (run / "config.resolved.yaml").write_text("tasks: []\n")
    from gradsift.report import build_report

    page = build_report(run).read_text(encoding="utf-8")
    for hook in ('id="sample-audit"', 'id="audit-spearman"', 'id="audit-bands"', 'id="plot-audit-length"'):
        assert hook in page
    assert raw[top["row"]]["output"][:40].replace("&", "&amp;").replace("<", "&lt;") in page


def test_cli_audit_errors(tmp_path):
    res = runner.invoke(app, ["study", "audit", str(tmp_path / "none.parquet")])
    assert res.exit_code == 2 and "no such score table" in res.output
    _scores().to_parquet(tmp_path / "s.parquet")
    res = runner.invoke(app, ["study", "audit", str(tmp_path / "s.parquet"), "--model", "x"])
    assert res.exit_code == 2 and "--model needs --data" in res.output
    res = runner.invoke(app, ["study", "audit", str(tmp_path / "s.parquet"), "--rho", "0"])
    assert res.exit_code == 2 and "rho" in res.output

"""`gradsift score` / `gradsift select` and the dataset scorer: exactness, resume, sharding, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from gradsift.cli import app
from gradsift.data import collate, encode_records, read_records
from gradsift.norms import naive_grad_norms
from gradsift.scoring import ScoreOptions, score_dataset

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama with the real SmolLM2 tokenizer, saved like any local model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tokenizer), tie_word_embeddings=True,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, shared_data):
    rows = [json.loads(line) for line in open(shared_data / "gsm8k" / "train.jsonl")][:11]
    path = tmp_path_factory.mktemp("data") / "gsm8k_small.jsonl"
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n")
    return path


def _load(tiny_model_dir):
    from gradsift.models import load_model, load_tokenizer

    return load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


def test_cli_score_matches_naive(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "scores.parquet"
    res = runner.invoke(app, ["score", "--model", str(tiny_model_dir), "--data", str(data_file), "--out", str(out),
                              "--prompt-field", "question", "--response-field", "answer", "-b", "4",
                              "--max-length", "96"])
    assert res.exit_code == 0, res.output
    table = pd.read_parquet(out)
    assert list(table.columns) == ["row", "G", "L", "n_response_tokens", "n_tokens"]
    assert table["row"].tolist() == list(range(11))
    assert not out.with_name(out.name + ".chunks").exists()
    # reference: the naive loop on the same encoded samples
    model, tok = _load(tiny_model_dir)
    feats = encode_records(tok, read_records(data_file, prompt_field="question", response_field="answer"), 96)
    for i in (0, 5, 10):
        G, L = naive_grad_norms(model, collate([feats[i]], tok.pad_token_id))
        assert table.loc[i, "G"] == pytest.approx(float(G[0]), rel=1e-4)
        assert table.loc[i, "L"] == pytest.approx(float(L[0]), rel=1e-5)
        assert table.loc[i, "n_tokens"] == len(feats[i]["input_ids"])
        assert table.loc[i, "n_response_tokens"] == sum(x != -100 for x in feats[i]["labels"][1:])  # scored tokens


def test_resume_after_interruption(tiny_model_dir, data_file, tmp_path, monkeypatch):
    from gradsift.norms import engine as engine_mod

    model, tok = _load(tiny_model_dir)
    opts = ScoreOptions(batch_size=2, max_length=96, chunk_batches=1, prompt_field="question", response_field="answer")
    full = score_dataset(model, tok, data_file, None, opts, progress=False)

    out = tmp_path / "s.parquet"
    real_backward = engine_mod.GhostNormEngine.backward
    calls = {"n": 0}

    def flaky(self, mask=None):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # interrupted while scoring the 4th batch
        return real_backward(self, mask)

    monkeypatch.setattr(engine_mod.GhostNormEngine, "backward", flaky)
    with pytest.raises(KeyboardInterrupt):
        score_dataset(model, tok, data_file, out, opts, progress=False)
    chunks = sorted(out.with_name(out.name + ".chunks").glob("part-*.parquet"))
    assert len(chunks) == 3  # three finished batches were kept
    calls["n"] = -100
    table = score_dataset(model, tok, data_file, out, opts, progress=False)
    assert calls["n"] == -100 + 3  # 6 batches in all: only the 3 missing ones were scored again
    pd.testing.assert_frame_equal(table, full)
    pd.testing.assert_frame_equal(pd.read_parquet(out), full)


def test_bad_input_messages(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps({"prompt": "c"}) + "\n")
    res = runner.invoke(app, ["score", "--model", str(tiny_model_dir), "--data", str(bad), "--out",
                              str(tmp_path / "o.parquet")])
    assert res.exit_code == 2
    assert "bad.jsonl" in res.output and "row 1" in res.output and "response" in res.output
    assert "Traceback" not in res.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"prompt": "a", "response": "  "}) + "\n")
    res = runner.invoke(app, ["score", "--model", str(tiny_model_dir), "--data", str(empty)])
    assert res.exit_code == 2 and "row 0" in res.output and "response" in res.output
    odd = tmp_path / "data.xlsx"
    odd.write_text("x")
    res = runner.invoke(app, ["score", "--model", str(tiny_model_dir), "--data", str(odd)])
    assert res.exit_code == 2 and "data.xlsx" in res.output
    res = runner.invoke(app, ["score", "--model", str(tiny_model_dir), "--data", str(tmp_path / "missing.csv")])
    assert res.exit_code == 2 and "missing.csv" in res.output


def test_self_check_stops_before_any_row_is_written(tiny_model_dir, data_file, tmp_path, monkeypatch):
    """A rule off by 5% (a stand-in for a layer no test foresaw) is caught on the first batch."""
    from gradsift.norms.rules import NormRule

    real = NormRule.sq_norms
    monkeypatch.setattr(NormRule, "sq_norms", lambda self, *a: real(self, *a) * 1.05)
    out = tmp_path / "scores.parquet"
    args = ["score", "--model", str(tiny_model_dir), "--data", str(data_file), "--out", str(out), "--prompt-field",
            "question", "--response-field", "answer", "-b", "4", "--max-length", "64"]
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "self-check failed" in res.output and "NormRule" in res.output and "LlamaRMSNorm" in res.output
    assert "relative error 5.0e-02" in res.output and "Traceback" not in res.output
    assert not out.exists() and not out.with_name(out.name + ".chunks").exists()
    res = runner.invoke(app, args + ["--no-verify"])  # skipped on request: the (wrong) table is written
    assert res.exit_code == 0, res.output
    assert len(pd.read_parquet(out)) == 11


def test_empty_data_and_unknown_model_are_one_line_errors(tiny_model_dir, data_file, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "o.parquet"
    res = runner.invoke(app, ["score", "--model", str(tiny_model_dir), "--data", str(empty), "--out", str(out)])
    assert res.exit_code == 2 and "empty.jsonl" in res.output and "no records" in res.output
    assert "Traceback" not in res.output and not out.exists()
    with pytest.raises(ValueError, match="no records"):  # the library refuses it as well
        model, tok = _load(tiny_model_dir)
        score_dataset(model, tok, empty, None, ScoreOptions(), progress=False)
    common = ["--data", str(data_file), "--prompt-field", "question", "--response-field", "answer", "--out", str(out)]
    res = runner.invoke(app, ["score", "--model", str(tmp_path / "no-such-model"), *common])
    assert res.exit_code == 2 and "no-such-model: no such model directory" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    res = runner.invoke(app, ["score", "--model", str(tmp_path), *common])  # a directory, but no model in it
    assert res.exit_code == 2 and "not a model directory" in res.output
    res = runner.invoke(app, ["score", "--model", "no-such-org/no-such-model", *common])  # offline, not cached
    assert res.exit_code == 2 and "no-such-org/no-such-model: not a local model directory" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_select_offline_writes_the_kept_rows(tmp_path, data_file):
    rows = [json.loads(line) for line in open(data_file)]
    G = [5.0, 1.0, 3.0, 2.9, 10.0, 3.1, 0.5, 4.0, 2.0, 3.05, 7.0]  # median 3.05
    scores = pd.DataFrame({"row": range(11), "G": G, "L": [1.0] * 11, "n_response_tokens": 1, "n_tokens": 2})
    sp = tmp_path / "scores.parquet"
    scores.to_parquet(sp)
    out = tmp_path / "kept.jsonl"
    res = runner.invoke(app, ["select", "--data", str(data_file), "--scores", str(sp), "--out", str(out),
                              "--rho", "0.3"])
    assert res.exit_code == 0, res.output
    kept = [json.loads(line) for line in open(out)]
    # floor(0.3 * 11) = 3 closest to 3.05: rows 9 (0), 2 (.05), 5 (.05)
    assert kept == [rows[2], rows[5], rows[9]]
    res = runner.invoke(app, ["select", "--data", str(data_file), "--scores", str(sp), "--out",
                              str(tmp_path / "high.csv"), "--rho", "0.2", "--method", "high"])
    assert res.exit_code == 0
    assert pd.read_csv(tmp_path / "high.csv")["question"].tolist() == [rows[4]["question"], rows[10]["question"]]


@pytest.mark.slow
def test_accelerate_two_processes_equal_single(tiny_model_dir, data_file, tmp_path):
    if shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists():
        pytest.skip("accelerate launcher not found")
    launcher = str(Path(sys.executable).parent / "accelerate")
    single = tmp_path / "single.parquet"
    multi = tmp_path / "multi.parquet"
    common = ["--model", str(tiny_model_dir), "--data", str(data_file), "--prompt-field", "question",
              "--response-field", "answer", "-b", "2", "--max-length", "96"]
    res = runner.invoke(app, ["score", *common, "--out", str(single)])
    assert res.exit_code == 0, res.output
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([launcher, "launch", "--num_processes", "2", "--num_machines", "1", "--cpu",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "gradsift", "score", *common,
                           "--out", str(multi)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = pd.read_parquet(single), pd.read_parquet(multi)
    assert a["row"].tolist() == b["row"].tolist()
    assert (a["n_tokens"] == b["n_tokens"]).all()
    assert torch.allclose(torch.tensor(a["G"].values), torch.tensor(b["G"].values), rtol=1e-5)

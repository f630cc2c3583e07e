"""The offline study, the matched ablation and the selectivity test, on tiny models built from a config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from gradsift.analysis.matching import match_high_moderate, pools
from gradsift.analysis.offline import build_subsets, outcomes


def _table(G, **cols) -> pd.DataFrame:
    n = len(G)
    data = {"row": np.arange(100, 100 + n), "G": np.asarray(G, float), "L": np.linspace(1, 2, n)}
    data.update({k: np.asarray(v, float) for k, v in cols.items()})
    return pd.DataFrame(data)


# ----------------------------------------------------------------------------- subsets


def test_subsets_are_top_median_band_bottom_and_a_seeded_draw():
    rng = np.random.default_rng(3)
    G = rng.permutation(np.arange(1.0, 21.0))  # G values 1..20, shuffled over rows 100..119
    scores = _table(G)
    row_of = {float(g): int(r) for g, r in zip(scores["G"], scores["row"])}
    subsets = build_subsets(scores, rho=0.2, seeds=[0, 1])  # floor(0.2 * 20) = 4 rows each
    assert subsets["high"][0] == sorted(row_of[g] for g in (17.0, 18.0, 19.0, 20.0))
    assert subsets["low"][0] == sorted(row_of[g] for g in (1.0, 2.0, 3.0, 4.0))
    # median 10.5: |G - 10.5| is 0.5 for 10 and 11, 1.5 for 9 and 12
    assert subsets["moderate"][0] == sorted(row_of[g] for g in (9.0, 10.0, 11.0, 12.0))
    assert subsets["high"][1] == subsets["high"][0] and subsets["moderate"][1] == subsets["moderate"][0]
    assert len(subsets["random"][0]) == 4 and set(subsets["random"][0]) <= set(row_of.values())
    assert subsets["random"][0] != subsets["random"][1]  # a new draw per seed
    with pytest.raises(ValueError, match="unknown subset"):
        build_subsets(scores, 0.2, [0], ("median",))


# ----------------------------------------------------------------------------- matching


def test_pools_are_the_top_and_middle_thirds():
    G = np.arange(30.0)
    hi, mod = pools(G, 1 / 3)
    assert hi.tolist() == list(range(20, 30))
    assert mod.tolist() == list(range(10, 20))  # the ten closest to the median 14.5, none of the top ten


def test_matching_balances_a_covariate_that_confounds_G():
    rng = np.random.default_rng(0)
    n = 600
    length = rng.uniform(5, 100, n)
    G = -0.05 * length + rng.normal(0, 1.5, n)  # short responses have high G, with overlap
    scores = _table(G, n_response_tokens=length)
    scores["L"] = rng.normal(2, 0.3, n)
    hi, mod = pools(scores["G"].to_numpy())
    res = match_high_moderate(scores, k=60, covariates=["n_response_tokens", "L"], caliper=0.2)
    bal = res.balance.set_index("covariate")

    def smd(a, b):  # hand-computed: pooled sd sqrt((s_a^2 + s_b^2) / 2), ddof 1
        return (a.mean() - b.mean()) / math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)

    by_row = scores.set_index("row")
    pool_smd = smd(scores["n_response_tokens"].to_numpy()[hi], scores["n_response_tokens"].to_numpy()[mod])
    assert pool_smd < -0.5 and bal.loc["n_response_tokens", "smd_pools"] == pytest.approx(pool_smd)
    after = smd(by_row.loc[res.high_rows, "n_response_tokens"].to_numpy(),
                by_row.loc[res.moderate_rows, "n_response_tokens"].to_numpy())
    assert bal.loc["n_response_tokens", "smd_after"] == pytest.approx(after)
    assert res.n_pairs == 60 and abs(after) < 0.1 and res.balanced and res.unbalanced == []
    assert not set(res.high_rows) & set(res.moderate_rows)
    assert set(res.high_rows) <= set(scores["row"].to_numpy()[hi])
    assert set(res.moderate_rows) <= set(scores["row"].to_numpy()[mod])
    # the contrast the ablation is about survives: matched High rows still have larger G
    assert by_row.loc[res.high_rows, "G"].mean() > by_row.loc[res.moderate_rows, "G"].mean()


def test_matching_says_when_a_covariate_cannot_be_balanced():
    n = 90
    length = np.arange(n, dtype=float)
    scores = _table(-length, n_response_tokens=length)  # G is a function of length: no overlap at all
    res = match_high_moderate(scores, k=18, covariates=["n_response_tokens"], caliper=0.2)
    assert not res.balanced
    assert res.n_pairs < 18 and any("caliper" in n for n in res.notes)
    assert res.unbalanced == ["n_response_tokens"] or res.n_pairs < 2


# ----------------------------------------------------------------------------- the study on a tiny model

TINY = {
    "model": {"tokenizer": "embedded",
              "config": {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 256,
                         "tie_word_embeddings": True},
              "lora": {"r": 2, "alpha": 4, "dropout": 0.0}},
    "tasks": [{"name": "mcq", "n_train": 20, "n_eval": 3, "max_length": 96}],
    "method": {"name": "standard"},
    "optim": {"lr": 1e-3, "batch_size": 4},
    "eval": {"generation": {"max_new_tokens": 3, "batch_size": 8}, "tasks": "seen",
             "safety": [{"set": "builtin_harmful", "n": 4}], "over_refusal": [{"set": "builtin_benign", "n": 3}]},
}


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    from gradsift.analysis.offline import StudyOptions, run_offline_study
    from gradsift.analysis.selectivity import CapabilitySpec

    root = tmp_path_factory.mktemp("offline")
    arc = root / "arc.jsonl"
    arc.write_text("".join(json.dumps({"id": f"q{i}", "question": {"stem": f"Which number is {i}?", "choices": [
        {"text": str(i), "label": "A"}, {"text": str(i + 1), "label": "B"}]}, "answerKey": "A"}) + "\n"
        for i in range(4)))
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    out = root / "study"
    opts = StudyOptions(subsets=("high", "moderate", "random"), seeds=[0], matched=True, caliper=5.0, online=True,
                        train_unbalanced=True,
                        capability=[CapabilitySpec(bench="arc_challenge", path=str(arc), limit=None)])
    run_offline_study(path, out, opts)
    return path, out, opts


@pytest.mark.slow  # one tiny study shared by four tests: about 30 s of CPU
def test_study_trains_each_subset_alone_and_evaluates_the_aligned_model_once(tiny_study):
    _, out, _ = tiny_study
    scores = pd.read_parquet(out / "scores.parquet")
    assert len(scores) == 20 and {"row", "G", "L", "n_response_tokens"} <= set(scores.columns)
    subsets = json.loads((out / "subsets.json").read_text())["subsets"]
    top4 = scores.sort_values("G", ascending=False)["row"].head(4).tolist()
    assert subsets["high"]["0"] == sorted(top4)
    for name in ("high", "moderate", "random", "matched_high", "matched_moderate"):
        run = out / "runs" / f"{name}-seed0"
        train = [json.loads(line) for line in (run / "train.jsonl").read_text().splitlines()]
        assert sorted(r["source_row"] for r in train) == sorted(subsets[name]["0"])
        rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
        samples = [r["value"] for r in rows if r["metric"] == "train/samples" and r["stage"] == 1]
        assert samples == [len(subsets[name]["0"])]  # fine-tuned on the subset alone
        assert not (run / "standard-seed0" / "stage_0" / "generations").exists()  # stage 0 not evaluated again
        assert (run / "standard-seed0" / "stage_1" / "capability-arc_challenge.jsonl").exists()
    assert (out / "aligned" / "aligned-seed0" / "stage_0" / "generations").is_dir()


@pytest.mark.slow  # one tiny study shared by four tests: about 30 s of CPU
def test_table_values_come_from_the_evaluations(tiny_study):
    _, out, _ = tiny_study
    doc = json.loads((out / "offline_study.json").read_text())
    arms = {(r["arm"], r["task"], r["metric"]): r for r in doc["arms"]}
    for arm in ("aligned", "high", "moderate", "random"):
        folder = out / "aligned" if arm == "aligned" else out / "runs" / f"{arm}-seed0"
        stage = 0 if arm == "aligned" else 1
        rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
        value = {(r["task"], r["metric"]): r["value"] for r in rows if r["stage"] == stage}
        for key in [("safety/builtin_harmful", "asr/keyword"), ("overrefusal/builtin_benign", "over_refusal"),
                    ("mcq", "score"), ("capability/arc_challenge", "acc")]:
            assert arms[(arm, *key)]["mean"] == pytest.approx(value[key]), (arm, key)
        # and independently, from the saved generations: keyword ASR = share of replies without a refusal string
        gen_dir = folder / "aligned-seed0" / "stage_0" if arm == "aligned" else folder / "standard-seed0" / "stage_1"
        recs = [json.loads(line) for line in (gen_dir / "generations" / "safety-builtin_harmful.jsonl")
                .read_text().splitlines()]
        unsafe = [r["verdicts"]["keyword"]["unsafe"] for r in recs]
        assert arms[(arm, "safety/builtin_harmful", "asr/keyword")]["mean"] == pytest.approx(
            100.0 * sum(unsafe) / len(unsafe))
        cap = [json.loads(line)["acc"] for line in (gen_dir / "capability-arc_challenge.jsonl").read_text().splitlines()]
        assert len(cap) == 4 and arms[(arm, "capability/arc_challenge", "acc")]["mean"] == pytest.approx(
            100.0 * np.mean(cap))
    tests = {(t["a"], t["b"], t["task"], t["metric"]): t for t in doc["tests"]}
    t = tests[("moderate", "high", "safety/builtin_harmful", "asr/keyword")]
    assert t["test"] == "mcnemar" and t["n"] == 4 and 0.0 <= t["p"] <= 1.0
    o_mod = outcomes(out / "runs" / "moderate-seed0" / "standard-seed0" / "stage_1")
    o_high = outcomes(out / "runs" / "high-seed0" / "standard-seed0" / "stage_1")
    key = ("safety/builtin_harmful", "asr/keyword")
    assert t["diff"] == pytest.approx(100.0 * (np.mean(list(o_mod[key].values())) - np.mean(list(o_high[key].values()))))
    md = (out / "offline_study.md").read_text()
    assert "Moderate-G_i" in md and "SMD" in md
    top = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {"aligned-seed0", "high-seed0", "moderate-seed0", "random-seed0"} <= {r["run"] for r in top}


@pytest.mark.slow  # one tiny study shared by four tests: about 30 s of CPU
def test_rerun_skips_finished_subsets(tiny_study, monkeypatch):
    import gradsift.train.stages as stages
    from gradsift.analysis.offline import run_offline_study

    path, out, opts = tiny_study
    calls = []
    real = stages.run_training

    def counting(cfg, output_dir=None, eval_hook=None, resume=True):
        calls.append(Path(output_dir).name)
        return real(cfg, output_dir=output_dir, eval_hook=eval_hook, resume=resume)

    monkeypatch.setattr(stages, "run_training", counting)
    before = (out / "aligned" / "aligned-seed0" / "stage_0" / "DONE").read_text()
    done = {p: p.stat().st_mtime for p in (out / "runs").glob("*/standard-seed0/stage_1/DONE")}
    run_offline_study(path, out, opts)
    assert calls == []  # every subset was complete
    assert (out / "aligned" / "aligned-seed0" / "stage_0" / "DONE").read_text() == before
    assert {p: p.stat().st_mtime for p in done} == done
    # an interrupted subset (no DONE marker) is trained again, and only it
    (out / "runs" / "random-seed0" / "standard-seed0" / "stage_1" / "DONE").unlink()
    run_offline_study(path, out, opts)
    assert calls == ["random-seed0"]
    with pytest.raises(ValueError, match="other settings"):
        from dataclasses import replace

        run_offline_study(path, out, replace(opts, rho=0.5))


@pytest.mark.slow  # one tiny study shared by four tests: about 30 s of CPU
def test_online_arms_use_the_same_rows_and_report_the_kept_lengths(tiny_study):
    _, out, _ = tiny_study
    doc = json.loads((out / "offline_study.json").read_text())
    scores = pd.read_parquet(out / "scores.parquet")
    for method in ("random", "moderate"):
        sel = pd.read_parquet(out / "online" / f"{method}-seed0" / "stage_1" / "selection.parquet")
        assert set(sel["row"]) == set(scores["row"])  # the online rule saw the rows the subsets came from
        kept = sel[sel["kept"]]
        assert doc["lengths"][f"online_{method}"]["0"]["kept_response_len"] == pytest.approx(kept["response_len"].mean())
    subset = json.loads((out / "subsets.json").read_text())["subsets"]["moderate"]["0"]
    want = scores.set_index("row").loc[subset, "n_response_tokens"].mean()
    assert doc["lengths"]["moderate"]["0"]["kept_response_len"] == pytest.approx(want)
    pairs = {(t["a"], t["b"]) for t in doc["tests"]}
    assert ("online_moderate", "online_random") in pairs and ("moderate", "random") in pairs
    # the online runs start from the aligned model evaluated once
    assert not (out / "online" / "moderate-seed0" / "stage_0" / "generations").exists()


@pytest.mark.slow  # one tiny study shared by four tests: about 30 s of CPU
def test_report_shows_the_study(tiny_study):
    from gradsift.report.html import build_report

    _, out, _ = tiny_study
    html = build_report(out).read_text()
    assert 'id="offline-study"' in html and "Moderate-G_i" in html and "SMD" in html
    assert 'id="online-offline"' in html and 'id="offline-study-plot"' in html


def test_cli_bad_capability_is_one_line(tmp_path):
    from gradsift.cli import app

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    res = CliRunner().invoke(app, ["study", "offline", str(path), "--capability", "arc_challenge",
                                   "--output", str(tmp_path / "o")])
    assert res.exit_code == 2 and "BENCH=PATH" in res.output and "Traceback" not in res.output

"""Confidence intervals and paired tests in the report, from saved per-prompt generations,
against values computed by hand from the verdicts written here."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser

import numpy as np
import pytest
import yaml
from scipy.stats import binomtest

from gradsift.eval.generation import save_generations
from gradsift.eval.outcomes import prompt_outcomes
from gradsift.report import build_report, load_run
from gradsift.report.tables import comparison_table, paired_test, paper_table, prompt_interval, stage_intervals

N = 20
# unsafe verdicts (heuristic judge) per (method, seed, stage): the prompt indices judged unsafe
UNSAFE = {
    ("moderate", 0, 0): {0}, ("moderate", 0, 1): {0, 1},
    ("standard", 0, 0): {0}, ("standard", 0, 1): set(range(10)),
    ("moderate", 1, 0): {0}, ("moderate", 1, 1): {0, 1, 2},
    ("standard", 1, 0): {0}, ("standard", 1, 1): {0, 1, 2, 3, 4, 5, 6, 12},
}
# exact-match task answers: the items answered right after stage 1
RIGHT = {("moderate", 0): {0, 1, 2, 3}, ("standard", 0): {0, 1},
         ("moderate", 1): {0, 1, 2, 3, 4}, ("standard", 1): {0, 1, 2, 3}}
N_TASK = 6


def _write(root):
    rows = []
    for (method, seed, stage), unsafe in UNSAFE.items():
        run = f"{method}-seed{seed}"
        gen = root / run / f"stage_{stage}" / "generations"
        recs = [{"id": f"p{i}", "kind": "safety", "set": "advbench", "attack": "none", "prompt": f"harmful {i}",
                 "response": "Sure, here it is." if i in unsafe else "I cannot help with that.",
                 "verdicts": {"heuristic": {"unsafe": i in unsafe, "score": 0.0, "raw": "", "category": None}}}
                for i in range(N)]
        save_generations(gen / "safety-advbench.jsonl", recs)
        right = RIGHT[(method, seed)] if stage == 1 else set()
        save_generations(gen / "task-qa.jsonl", [
            {"id": str(i), "kind": "task", "set": "qa", "metric": "exact", "prompt": f"q{i}",
             "reference": f"a{i}", "response": f"a{i}" if i in right else "no"} for i in range(N_TASK)])
        base = {"run": run, "method": method, "seed": seed, "stage": stage}
        rows.append({**base, "task": "safety/advbench", "metric": "asr/heuristic", "value": 100 * len(unsafe) / N})
        rows.append({**base, "task": "qa", "metric": "score", "value": 100 * len(right) / N_TASK})
    (root / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"tasks": [{"name": "qa"}], "method": [{"name": "moderate"}, {"name": "standard"}], "seeds": [0, 1]}
    (root / "config.resolved.yaml").write_text(yaml.safe_dump(cfg))
    return root


def test_prompt_outcomes_read_the_saved_verdicts(tmp_path):
    store = load_run(_write(tmp_path / "run"))
    s = prompt_outcomes(store, "standard-seed0", 1, "safety/advbench", "asr/heuristic")
    assert list(s.index[:3]) == ["p0", "p1", "p2"]
    assert s.to_numpy().tolist() == [1.0] * 10 + [0.0] * 10
    assert 100 * s.mean() == store.value("standard-seed0", 1, "safety/advbench", "asr/heuristic")
    refused = prompt_outcomes(store, "standard-seed0", 1, "safety/advbench", "refusal_rate")
    assert refused.to_numpy().tolist() == [0.0] * 10 + [1.0] * 10  # "I cannot" is a refusal string
    score = prompt_outcomes(store, "moderate-seed0", 1, "qa", "score")
    assert score.to_numpy().tolist() == [1, 1, 1, 1, 0, 0]
    assert prompt_outcomes(store, "moderate-seed0", 1, "safety/advbench", "asr/llamaguard") is None
    assert prompt_outcomes(store, "moderate-seed0", 5, "safety/advbench", "asr/heuristic") is None


def test_final_asr_mcnemar_by_hand(tmp_path):
    store = load_run(_write(tmp_path / "run"))
    t = paired_test(store, "standard", "moderate", "safety/advbench", "asr/heuristic", (1,))
    # (seed, prompt) pairs at stage 1, standard vs moderate:
    #   seed 0: standard-only unsafe = {2..9} (8), moderate-only = {}
    #   seed 1: standard-only = {3,4,5,6,12} (5), moderate-only = {}
    # -> n10 = 13, n01 = 0: exact two-sided p = 2 / 2^13
    assert (t["n10"], t["n01"], t["n"], t["test"]) == (13, 0, 40, "mcnemar")
    assert t["p"] == pytest.approx(2 / 2**13)
    assert t["diff"] == pytest.approx(100 * 13 / 40)
    table = paper_table(store)
    assert table.at["standard", "final_asr_p"] == pytest.approx(2 / 2**13)
    assert math.isnan(table.at["moderate", "final_asr_p"])
    # the interval of the final ASR: per-prompt mean over the two seeds, resampled over 20 prompts
    lo, hi = table.at["standard", "final_asr_lo"], table.at["standard", "final_asr_hi"]
    assert table.at["standard", "final_asr"] == pytest.approx(45.0)
    assert lo < 45.0 < hi
    assert 20 < lo and hi < 70  # about 45 +- 2 * 100 * sd / sqrt(20)


def test_checkpoint_average_uses_the_paired_bootstrap_over_prompts(tmp_path):
    store = load_run(_write(tmp_path / "run"))
    t = paired_test(store, "standard", "moderate", "safety/advbench", "asr/heuristic", (0, 1))
    # per prompt: mean over 2 seeds x 2 stages of (standard - moderate); stage 0 agrees everywhere
    d = np.zeros(N)
    for seed in (0, 1):
        for i in range(N):
            d[i] += (i in UNSAFE[("standard", seed, 1)]) - (i in UNSAFE[("moderate", seed, 1)])
    d /= 4
    assert t["test"] == "paired_bootstrap" and t["n"] == N
    assert t["diff"] == pytest.approx(100 * d.mean())
    assert 0 < t["lo"] < t["diff"] < t["hi"]
    assert t["p"] < 0.01
    table = paper_table(store)
    assert table.at["standard", "asr"] == pytest.approx(table.at["moderate", "asr"] + t["diff"])


def test_task_score_paired_bootstrap_and_stage_intervals(tmp_path):
    store = load_run(_write(tmp_path / "run"))
    t = paired_test(store, "standard", "moderate", "qa", "score", (1,))
    # per item, mean over seeds: moderate right on {0..3} and {0..4}; standard on {0,1} and {0..3}
    assert t["test"] == "paired_bootstrap" and t["n"] == N_TASK
    assert t["diff"] == pytest.approx(100 * ((2 + 4) - (4 + 5)) / 2 / N_TASK)
    comp = comparison_table(store)
    assert set(comp["measure"]) == {"asr", "final_asr", "score:qa"}
    assert (comp["vs"] == "moderate").all() and (comp["method"] == "standard").all()
    ci = stage_intervals(store, "safety/advbench", "asr/heuristic").set_index(["method", "stage"])
    # stage 0: one prompt of 20 unsafe in every run, and identical verdicts: McNemar p = 1
    assert ci.at[("standard", 0), "p"] == 1.0
    lo, hi, n = prompt_interval(store, "standard", "safety/advbench", "asr/heuristic", (0,))
    # 1 of 20 unsafe: the BCa upper bound sits near the exact Clopper-Pearson bound (24.9%)
    exact_hi = 100 * binomtest(1, N).proportion_ci(0.95, method="exact").high
    assert n == N and lo == pytest.approx(0.0) and abs(hi - exact_hi) < 5.0


class _Cells(HTMLParser):
    def __init__(self):
        super().__init__()
        self.table, self.row, self.cells, self.col = None, None, {}, 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.table = a.get("id")
        elif tag == "tr":
            self.row, self.col = a.get("data-method"), 0
        elif tag == "td":
            key = a.get("data-key") or a.get("data-col") or str(self.col)
            self.cells[(self.table, self.row, key)] = a
            self.col += 1


def test_html_shows_intervals_and_p_values(tmp_path):
    run = _write(tmp_path / "run")
    page = _Cells()
    page.feed(build_report(run).read_text(encoding="utf-8"))
    cell = page.cells[("paper-table", "standard", "final_asr")]
    assert float(cell["data-p"]) == pytest.approx(2 / 2**13)
    assert float(cell["data-lo"]) < float(cell["data-value"]) < float(cell["data-hi"])
    assert "data-p" not in page.cells[("paper-table", "moderate", "final_asr")]
    stage1 = page.cells[("asr-stage-table", "standard", "2")]  # column 0 is the name, then stages 0, 1
    assert float(stage1["data-p"]) == pytest.approx(2 / 2**13)
    p_cell = page.cells[("paired-tests", "standard", "p")]
    assert "data-value" in p_cell

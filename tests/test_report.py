"""The report: run store, paper table numbers against hand computations, HTML structure, CLI,
and a report built from what a real (tiny) training run writes."""

from __future__ import annotations

import base64
import json
import math
import statistics
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
import yaml

from gradsift.report import build_report, load_run, summary_markdown
from gradsift.store import RunDirError
from gradsift.report.tables import asr_per_stage, paper_table, primary_judge, primary_safety_set

TASKS = ["gsm8k", "alpaca"]
METHODS = ["standard", "moderate"]
SEEDS = [0, 1]

# ---- the measurements, written literally: (method, seed) -> per-stage values (stages 0, 1, 2)
ASR_HEURISTIC = {("standard", 0): [10, 30, 50], ("standard", 1): [10, 40, 60],
                 ("moderate", 0): [10, 12, 14], ("moderate", 1): [10, 16, 22]}
ASR_KEYWORD = {k: [v + 5 for v in vals] for k, vals in ASR_HEURISTIC.items()}
REFUSAL = {k: [100 - v for v in vals] for k, vals in ASR_KEYWORD.items()}
OVER_REFUSAL = {("standard", 0): [4, 6, 8], ("standard", 1): [4, 8, 12]}  # not measured for moderate
# task scores: stage -> [gsm8k, alpaca]; None = not measured
SCORES = {
    ("standard", 0): {0: [20, 5], 1: [40, 10], 2: [30, 50]},
    ("standard", 1): {0: [20, 5], 1: [44, 12], 2: [38, 46]},
    ("moderate", 0): {0: [20, 5], 1: [42, 11], 2: [41, 48]},
    ("moderate", 1): {0: [20, 5], 1: [40, 9], 2: [40, None]},
}
# AA / BWT / FM / max drop of each 2x2 matrix R (rows: after stage 1, 2), by hand:
#   standard-0: AA (30+50)/2 = 40,  BWT 30-40 = -10, FM 40-30 = 10, max drop 10
#   standard-1: AA (38+46)/2 = 42,  BWT 38-44 = -6,  FM 6,           max drop 6
#   moderate-0: AA (41+48)/2 = 44.5, BWT 41-42 = -1, FM 1,           max drop 1
#   moderate-1: R[1][1] missing -> not computable
FORGETTING = {("standard", 0): (40.0, -10.0, 10.0, 10.0), ("standard", 1): (42.0, -6.0, 6.0, 6.0),
              ("moderate", 0): (44.5, -1.0, 1.0, 1.0)}
RUNTIME = {("standard", 0): [10.0, 12.0], ("standard", 1): [11.0, 13.0],
           ("moderate", 0): [15.0, 16.0], ("moderate", 1): [14.0, 18.0]}
KEPT = {("moderate", 0): [0.2, 0.25], ("moderate", 1): [0.2, 0.2]}

EXPECTED_PLOTS = {"plot-asr", "plot-refusal", "plot-rmatrix-standard", "plot-rmatrix-moderate",
                  "plot-selection-moderate", "plot-loss"}


def _rows() -> list[dict]:
    rows = []

    def add(method, seed, stage, task, metric, value):
        rows.append({"run": f"{method}-seed{seed}", "method": method, "seed": seed, "stage": stage,
                     "task": task, "metric": metric, "value": value})

    for method in METHODS:
        for seed in SEEDS:
            key = (method, seed)
            for stage in range(3):
                if stage:
                    task = TASKS[stage - 1]
                    add(method, seed, stage, task, "train/loss", 2.0 - 0.1 * stage)
                    add(method, seed, stage, task, "train/runtime_s", RUNTIME[key][stage - 1])
                    add(method, seed, stage, task, "train/steps", 3.0)
                    add(method, seed, stage, task, "train/samples", 12.0)
                    if key in KEPT:
                        add(method, seed, stage, task, "train/kept_fraction", KEPT[key][stage - 1])
                        add(method, seed, stage, task, "train/G_kept_mean", 1.0)
                        add(method, seed, stage, task, "train/G_dropped_mean", 2.0)
                for task, score in zip(TASKS, SCORES[key][stage]):
                    if score is not None:
                        add(method, seed, stage, task, "score", float(score))
                a = ASR_HEURISTIC[key][stage]
                add(method, seed, stage, "safety/advbench", "asr/heuristic", float(a))
                add(method, seed, stage, "safety/advbench", "asr/heuristic/cyber", float(a + 2))
                add(method, seed, stage, "safety/advbench", "asr/heuristic/drugs", float(a - 2))
                add(method, seed, stage, "safety/advbench", "asr/keyword", float(ASR_KEYWORD[key][stage]))
                add(method, seed, stage, "safety/advbench", "refusal_rate", float(REFUSAL[key][stage]))
                add(method, seed, stage, "safety/advbench", "unparsable/heuristic", 0.0)
                add(method, seed, stage, "safety/advbench", "n", 20.0)
                add(method, seed, stage, "safety/advbench@prefill", "asr/heuristic", 90.0)  # not the primary set
                if key in OVER_REFUSAL:
                    add(method, seed, stage, "overrefusal/xstest", "over_refusal", float(OVER_REFUSAL[key][stage]))
                add(method, seed, stage, "_eval", "runtime_s", 1.5)
    return rows


def _config() -> dict:
    return {
        "model": {"name_or_path": "embedded", "dtype": "float32",
                  "lora": {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "all-linear"}},
        "tasks": [{"name": t, "path": f"/data/{t}.jsonl", "n_train": 12, "n_eval": 4, "max_length": 64, "seed": 0}
                  for t in TASKS],
        "method": [{"name": "standard"}, {"name": "moderate", "rho": 0.25, "params": "all", "prefilter": "mean_std"}],
        "optim": {"lr": 1e-4, "batch_size": 4, "epochs": 1.0},
        "seeds": SEEDS,
        "output_dir": "runs/x",
        "eval": {},
    }


def _write_run(root: Path, rows: list[dict] | None = None, config: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.resolved.yaml").write_text(yaml.safe_dump(config or _config(), sort_keys=False))
    (root / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (rows if rows is not None else _rows())))
    for method in METHODS:
        for seed in SEEDS:
            run = root / f"{method}-seed{seed}"
            (run / "stage_0").mkdir(parents=True, exist_ok=True)
            for stage in (1, 2):
                d = run / f"stage_{stage}"
                d.mkdir(exist_ok=True)
                log = [{"stage": stage, "task": TASKS[stage - 1], "step": s, "loss": 2.0 - 0.1 * s - 0.2 * stage,
                        "learning_rate": 1e-4} for s in (1, 2, 3)]
                log.append({"stage": stage, "task": TASKS[stage - 1], "step": 3, "train_runtime": 1.0,
                            "train_loss": 1.8})
                (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
                if method == "moderate":
                    n = 12
                    g = [0.5 + 0.1 * i + 0.01 * seed for i in range(n)]
                    scored = [i % 4 != 0 for i in range(n)]
                    kept = [sc and 4 <= i <= 7 for i, sc in enumerate(scored)]
                    pd.DataFrame({
                        "step": [i // 4 for i in range(n)], "row": list(range(n)),
                        "G": [gi if sc else math.nan for gi, sc in zip(g, scored)],
                        "L": [1.0 + 0.05 * i for i in range(n)], "scored": scored, "kept": kept,
                        "response_len": [10 + 3 * i for i in range(n)],
                    }).to_parquet(d / "selection.parquet", index=False)
    return root


class _Page(HTMLParser):
    """Checks tag balance and collects figures, images and the paper table's cells."""

    VOID = {"meta", "img", "br", "hr", "link", "input", "col", "source", "wbr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.figures: dict[str, list[str]] = {}
        self.ids: list[str] = []
        self.cells: dict[tuple[str, str], dict] = {}  # (method, key) -> attrs + text
        self._figure: str | None = None
        self._table: str | None = None
        self._method: str | None = None
        self._cell: dict | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        if tag not in self.VOID:
            self.stack.append(tag)
        if tag == "figure" and "plot" in (a.get("class") or "").split():
            self._figure = a.get("id")
            self.figures[self._figure] = []
        if tag == "img" and self._figure is not None:
            self.figures[self._figure].append(a.get("src", ""))
        if tag == "table":
            self._table = a.get("id")
        if tag == "tr" and self._table == "paper-table":
            self._method = a.get("data-method")
        if tag == "td" and self._table == "paper-table" and self._method and "data-key" in a:
            self._cell = {**a, "text": ""}
            self.cells[(self._method, a["data-key"])] = self._cell

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else 'nothing'}>")
        else:
            self.stack.pop()
        if tag == "figure":
            self._figure = None
        if tag == "table":
            self._table = None
        if tag == "td":
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    assert not page.errors, page.errors[:5]
    assert page.stack == [], f"unclosed tags: {page.stack}"
    return page


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def _fmt(mean: float, std: float, spec: str) -> str:
    return format(mean, spec) + ("" if math.isnan(std) else f" ± {format(std, spec)}")


def _expected_table() -> dict[tuple[str, str], tuple[float, float, int] | None]:
    """(method, column) -> (mean over seeds, std, n seeds with a value), computed from the literals."""
    exp: dict[tuple[str, str], tuple[float, float, int] | None] = {}
    per_seed: dict[tuple[str, str], list[float]] = {}
    for (method, seed), asr in ASR_HEURISTIC.items():
        key = (method, seed)
        per_seed.setdefault((method, "asr"), []).append(sum(asr) / 3)
        per_seed.setdefault((method, "asr_heuristic"), []).append(sum(asr) / 3)
        per_seed.setdefault((method, "asr_keyword"), []).append(sum(ASR_KEYWORD[key]) / 3)
        per_seed.setdefault((method, "refusal_rate"), []).append(sum(REFUSAL[key]) / 3)
        per_seed.setdefault((method, "final_asr"), []).append(asr[2])
        per_seed.setdefault((method, "train_time_s"), []).append(sum(RUNTIME[key]))
        if key in OVER_REFUSAL:
            per_seed.setdefault((method, "over_refusal"), []).append(sum(OVER_REFUSAL[key]) / 3)
        if key in KEPT:
            per_seed.setdefault((method, "kept_fraction"), []).append(sum(KEPT[key]) / 2)
        if key in FORGETTING:
            for name, v in zip(("AA", "BWT", "FM", "max_drop"), FORGETTING[key]):
                per_seed.setdefault((method, name), []).append(v)
    cols = ["asr", "asr_keyword", "asr_heuristic", "refusal_rate", "over_refusal", "AA", "BWT", "FM", "max_drop",
            "final_asr", "kept_fraction", "train_time_s"]
    for method in METHODS:
        for c in cols:
            vals = per_seed.get((method, c))
            exp[(method, c)] = (*_mean_std(vals), len(vals)) if vals else None
    return exp


FORMATS = {"BWT": ".2f", "FM": ".2f", "max_drop": ".2f", "kept_fraction": ".3f"}


# --------------------------------------------------------------------------- tests


def test_store_reads_run(tmp_path):
    store = load_run(_write_run(tmp_path / "run"))
    assert store.tasks == TASKS
    assert store.methods == METHODS
    assert store.seeds == SEEDS
    assert store.runs == ["standard-seed0", "standard-seed1", "moderate-seed0", "moderate-seed1"]
    assert len(store.results) == len(_rows())
    assert store.value("moderate-seed1", 2, "safety/advbench", "asr/heuristic") == 22.0
    assert math.isnan(store.value("moderate-seed1", 2, "alpaca", "score"))
    sel = store.selection("moderate-seed0", 1)
    assert list(sel["kept"]).count(True) == 3
    assert store.selection("standard-seed0", 1) is None
    log = store.log("standard-seed0", 2)
    assert list(log["step"]) == [1, 2, 3]  # the trailing summary row is not a step


def test_paper_table_matches_hand_computation(tmp_path):
    run = _write_run(tmp_path / "run")
    store = load_run(run)
    assert primary_safety_set(store) == "safety/advbench"  # not the @prefill attack set
    assert primary_judge(store) == "heuristic"  # the preferred judge among those measured
    table = paper_table(store)
    expected = _expected_table()
    for (method, col), exp in expected.items():
        if exp is None:
            assert math.isnan(table.at[method, col]), (method, col)
            continue
        mean, std, n = exp
        assert table.at[method, col] == pytest.approx(mean, rel=1e-12), (method, col)
        if math.isnan(std):
            assert math.isnan(table.at[method, f"{col}_std"]), (method, col)
        else:
            assert table.at[method, f"{col}_std"] == pytest.approx(std, rel=1e-12), (method, col)
        assert table.at[method, f"{col}_n"] == n
    # a few values spelled out: standard ASR = mean(30, 36.67), moderate AA from one seed only
    assert table.at["standard", "asr"] == pytest.approx((30 + 110 / 3) / 2)
    assert table.at["moderate", "AA"] == 44.5 and math.isnan(table.at["moderate", "AA_std"])
    assert table.at["standard", "BWT"] == -8.0

    per_stage = asr_per_stage(store)
    assert list(per_stage.index) == METHODS and list(per_stage.columns) == [0, 1, 2]
    assert per_stage.loc["standard"].tolist() == [10.0, 35.0, 55.0]
    assert per_stage.loc["moderate"].tolist() == [10.0, 14.0, 18.0]
    assert asr_per_stage(store, judge="keyword").loc["moderate"].tolist() == [15.0, 19.0, 23.0]


def test_html_report(tmp_path):
    run = _write_run(tmp_path / "run")
    out = build_report(run)
    assert out == run / "report.html"
    text = out.read_text(encoding="utf-8")
    page = _parse(out)

    # self-contained: no external resource
    for needle in ("http://", "https://", "<link", "<script src"):
        assert needle not in text
    assert set(page.figures) == EXPECTED_PLOTS
    for pid, srcs in page.figures.items():
        assert len(srcs) == 1 and srcs[0].startswith("data:image/png;base64,"), pid
        png = base64.b64decode(srcs[0].split(",", 1)[1], validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n", pid
    assert len(page.ids) == len(set(page.ids)), "duplicate element ids"
    for table_id in ("paper-table", "asr-stage-table", "category-table", "selection-table", "timing-table"):
        assert table_id in page.ids

    for (method, col), exp in _expected_table().items():
        cell = page.cells[(method, col)]
        if exp is None:
            assert cell["text"] == "—" and "data-value" not in cell, (method, col)
            continue
        mean, std, n = exp
        assert float(cell["data-value"]) == pytest.approx(mean, rel=1e-12), (method, col)
        assert cell["text"] == _fmt(mean, std, FORMATS.get(col, ".1f")), (method, col)
        assert int(cell["data-n"]) == n
    assert page.cells[("standard", "n_seeds")]["text"] == "2"

    # facts, per-category ASR, the config and the judge note
    assert "gsm8k" in text and "alpaca" in text and "embedded" in text
    assert "cyber" in text and "drugs" in text
    assert "rho: 0.25" in text  # the resolved config, verbatim in a <pre>
    assert "Llama Guard" in text


def test_missing_data_renders_dash(tmp_path):
    # no safety, no scores for one method, no selection: the report still builds
    rows = [r for r in _rows() if not r["task"].startswith("safety/") and
            not (r["method"] == "moderate" and r["metric"] == "score")]
    run = _write_run(tmp_path / "run", rows)
    out = build_report(run, tmp_path / "elsewhere" / "r.html")
    page = _parse(out)
    assert page.cells[("moderate", "AA")]["text"] == "—"
    assert page.cells[("standard", "asr")]["text"] == "—"
    assert page.cells[("standard", "AA")]["data-value"] == "41.0"
    assert "plot-asr" not in page.figures
    md = summary_markdown(load_run(run))
    assert "| standard | 2 |" in md and "| moderate | 2 |" in md
    assert "—" in md


def test_config_only_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.resolved.yaml").write_text(yaml.safe_dump(_config()))
    page = _parse(build_report(run))
    assert page.figures == {}
    assert "No results yet." in summary_markdown(load_run(run))


def test_summary_markdown(tmp_path):
    md = summary_markdown(load_run(_write_run(tmp_path / "run")))
    lines = md.splitlines()
    header = next(ln for ln in lines if ln.startswith("| method"))
    assert "ASR (heuristic)" in header and "ASR (keyword)" in header
    assert any(ln.startswith("| standard | 2 | 33.3 ± 4.7 |") for ln in lines)
    assert any(ln.startswith("- **moderate** (2 seeds): ASR 14.0%") for ln in lines)


def test_judge_choice(tmp_path):
    rows = _rows()
    rows += [{**r, "metric": "asr/llamaguard", "value": r["value"] / 2} for r in rows
             if r["metric"] == "asr/heuristic" and r["task"] == "safety/advbench"]
    store = load_run(_write_run(tmp_path / "a", rows))
    assert primary_judge(store) == "llamaguard"  # the trained classifier outranks the heuristics
    assert paper_table(store).at["moderate", "asr"] == pytest.approx(7.0)
    assert paper_table(store, judge="keyword").at["moderate", "asr"] == pytest.approx(19.0)
    with pytest.raises(ValueError, match="openai"):
        paper_table(store, judge="openai")


def test_primary_safety_set_follows_config(tmp_path):
    rows = [r for r in _rows() if not r["task"].startswith("safety/advbench")]
    for name, value in (("harmbench", 40.0), ("xhazard", 60.0)):
        rows += [{**r, "task": f"safety/{name}", "metric": "asr/keyword", "value": value}
                 for r in _rows() if r["task"] == "_eval"]
    cfg = {**_config(), "eval": {"safety": [{"set": "/data/xhazard.csv"}, {"set": "harmbench"}]}}
    store = load_run(_write_run(tmp_path / "a", rows, cfg))
    assert primary_safety_set(store) == "safety/xhazard"  # first in the config's list
    assert paper_table(store).at["standard", "asr"] == 60.0
    store = load_run(_write_run(tmp_path / "b", rows))  # no eval section: first by name
    assert primary_safety_set(store) == "safety/harmbench"


def test_bad_run_dirs(tmp_path):
    with pytest.raises(RunDirError, match="no such run directory"):
        load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match="not a gradsift run directory"):
        load_run(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.jsonl").write_text(json.dumps(_rows()[0]) + "\n{oops\n")
    with pytest.raises(RunDirError, match=r"results.jsonl: line 2: invalid JSON"):
        load_run(bad)
    row = dict(_rows()[0])
    del row["metric"]
    (bad / "results.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(RunDirError, match=r"row 1: missing field 'metric'"):
        load_run(bad)


def test_cli_report(tmp_path):
    from typer.testing import CliRunner

    from gradsift.cli import app

    run = _write_run(tmp_path / "run")
    target = tmp_path / "page.html"
    result = CliRunner().invoke(app, ["report", str(run), "--out", str(target)])
    assert result.exit_code == 0, result.output
    assert target.exists() and not (run / "report.html").exists()
    assert "| moderate | 2 |" in result.stdout
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "not a gradsift run directory" in result.output


@pytest.mark.slow
def test_report_from_real_training(tmp_path, shared_data):
    """What training and the evaluation hook write (results rows, selection tables, logs) makes a
    complete report whose numbers are those of results.jsonl."""
    from gradsift.eval.runner import make_eval_hook
    from gradsift.train import run_training
    from gradsift.train.config import validate_config

    cfg = validate_config({
        "model": {"tokenizer": "embedded",
                  "config": {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
                             "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                             "max_position_embeddings": 96, "tie_word_embeddings": True},
                  "lora": {"r": 2, "alpha": 4, "dropout": 0.0}},
        "tasks": [{"name": "gsm8k", "path": str(shared_data / "gsm8k" / "train.jsonl"), "n_train": 8,
                   "n_eval": 2, "max_length": 48},
                  {"name": "alpaca", "path": str(shared_data / "alpaca" / "alpaca_small.json"), "n_train": 8,
                   "n_eval": 2, "max_length": 48}],
        "method": [{"name": "moderate", "rho": 0.5}, {"name": "standard"}],
        "optim": {"lr": 1e-2, "batch_size": 4},
        "eval": {"generation": {"max_new_tokens": 6, "batch_size": 8}, "task_n_eval": 2,
                 "safety": [{"set": "builtin_harmful", "n": 6, "judges": ["keyword", "heuristic"]}],
                 "over_refusal": [{"set": "builtin_benign", "n": 4}]},
    })
    out = run_training(cfg, tmp_path / "run", eval_hook=make_eval_hook(cfg.eval))
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]

    def by_hand(run: str, task: str, metric: str) -> list[float]:
        vals = {r["stage"]: r["value"] for r in rows if (r["run"], r["task"], r["metric"]) == (run, task, metric)}
        return [vals[s] for s in range(3)]

    store = load_run(out)
    assert store.tasks == ["gsm8k", "alpaca"] and store.methods == ["moderate", "standard"]
    assert primary_safety_set(store) == "safety/builtin_harmful" and primary_judge(store) == "heuristic"
    table = paper_table(store)
    for method in ("moderate", "standard"):
        run = f"{method}-seed0"
        asr = by_hand(run, "safety/builtin_harmful", "asr/heuristic")
        assert table.at[method, "asr"] == pytest.approx(sum(asr) / 3)
        assert table.at[method, "final_asr"] == pytest.approx(asr[2])
        assert table.at[method, "asr_keyword"] == pytest.approx(
            sum(by_hand(run, "safety/builtin_harmful", "asr/keyword")) / 3)
        assert table.at[method, "over_refusal"] == pytest.approx(
            sum(by_hand(run, "overrefusal/builtin_benign", "over_refusal")) / 3)
        g, a = by_hand(run, "gsm8k", "score"), by_hand(run, "alpaca", "score")
        assert table.at[method, "AA"] == pytest.approx((g[2] + a[2]) / 2)
        assert table.at[method, "BWT"] == pytest.approx(g[2] - g[1])
    assert 0 < table.at["moderate", "kept_fraction"] < 1
    assert math.isnan(table.at["standard", "kept_fraction"])
    page = _parse(build_report(out))
    assert {"plot-asr", "plot-refusal", "plot-rmatrix-moderate", "plot-rmatrix-standard",
            "plot-selection-moderate", "plot-loss"} <= set(page.figures)
    assert "plot-selection-standard" not in page.figures
    assert float(page.cells[("standard", "AA")]["data-value"]) == pytest.approx(table.at["standard", "AA"])
    # the saved generations give intervals over prompts, and a paired test against moderate
    for method in ("moderate", "standard"):
        cell = page.cells[(method, "asr")]
        assert float(cell["data-lo"]) <= float(cell["data-value"]) <= float(cell["data-hi"])
    assert 0 < float(page.cells[("standard", "final_asr")]["data-p"]) <= 1
    assert "data-p" not in page.cells[("moderate", "final_asr")]

"""One self-contained HTML page per run: inline CSS, figures as data URIs, no external resource.

Stable hooks for scripts and tests: the summary table is ``<table id="paper-table">``
(each number cell carries ``data-key``, ``data-value``, ``data-std`` and ``data-n``; where the
run saved its generations, also ``data-lo``/``data-hi``, the 95% bootstrap interval over
prompts, and ``data-p``, the paired test against Moderate-G_i); the ASR per stage is
``<table id="asr-stage-table">`` (cells with the same attributes); every paired test is a row
``<tr data-method=... data-measure=...>`` of ``<table id="paired-tests">`` (cells
``data-col`` = value, lo, hi, diff, diff_lo, diff_hi, p, n); every figure is
``<figure class="plot" id="plot-...">`` holding one ``<img src="data:image/png;base64,...">``.
"""

from __future__ import annotations

import math
import os
import platform
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime
from html import escape
from importlib import metadata
from pathlib import Path
from typing import Any

from gradsift.report.plots import Plot, all_plots
from gradsift.report.sections import render_sections
from gradsift.store import CONFIG_FILE, ENVIRONMENT_FILE, RunStore, load_run
from gradsift.report.tables import (
    MISSING,
    asr_per_stage,
    category_asr_table,
    comparison_table,
    format_value,
    metric_per_stage,
    paper_columns_for,
    paper_table,
    primary_judge,
    primary_safety_set,
    reference_method,
    selection_table,
    stage_intervals,
    summary_markdown,
    timing_table,
)

__all__ = ["build_report", "machine_info", "render_report"]


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 auto; max-width: 1180px;
       padding: 1.5rem 2rem 4rem; color: #1d2330; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { font-size: 1.2rem; margin-top: 2.2rem;
     border-bottom: 1px solid #d8dde6; padding-bottom: .25rem; }
.sub { color: #5b6474; margin-top: 0; }
table { border-collapse: collapse; margin: .6rem 0 1rem; font-size: .86rem; }
th, td { border: 1px solid #d8dde6; padding: .3rem .55rem; text-align: right; white-space: normal; }
table { max-width: 100%; } th { hyphens: auto; } td.wrap { min-width: 12rem; }
tr.flag td { background: #fdecea; }
th { background: #f2f4f8; } td.name, th.name { text-align: left; }
td.missing { color: #9aa3b2; text-align: center; }
caption { caption-side: bottom; text-align: left; color: #5b6474; font-size: .8rem; padding-top: .3rem; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: .2rem 1rem; font-size: .9rem; }
dl.facts dt { font-weight: 600; } dl.facts dd { margin: 0; }
figure.plot { margin: 1rem 0 1.6rem; } figure.plot img { max-width: 100%; border: 1px solid #e6e9ef; }
figcaption { font-size: .82rem; color: #5b6474; margin-top: .3rem; }
pre { background: #f6f8fa; padding: .8rem; overflow-x: auto; font-size: .8rem; border: 1px solid #e6e9ef; }
span.ci, span.p { color: #5b6474; font-size: .75rem; }
.note { background: #fff8e6; border-left: 4px solid #e6b020; padding: .6rem .9rem; font-size: .88rem; }
"""


# --------------------------------------------------------------------------- facts


def machine_info(store: RunStore) -> tuple[dict[str, str], str]:
    """Machine facts and where they come from.

    ``environment.json`` in the run directory (keys such as platform, cpu, gpu, torch)
    describes the machine that ran the training; without it, the machine building the
    report is described and labelled as such.
    """
    env_path = store.path / ENVIRONMENT_FILE
    if env_path.exists():
        from gradsift.data.records import read_json

        data = read_json(env_path, error=ValueError)
        if isinstance(data, dict):
            return {str(k): str(v) for k, v in data.items()}, "the machine that ran the training"
    info = {
        "platform": platform.platform(),
        "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "python": sys.version.split()[0],
    }
    try:
        info["torch"] = metadata.version("torch")
    except metadata.PackageNotFoundError:
        info["torch"] = "not installed"
    gpu = "none"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except Exception:  # noqa: BLE001 - a missing torch or a broken driver must not break the report
        gpu = "unknown"
    info["gpu"] = gpu
    return info, "the machine that built this report (the run directory records no environment.json)"


def _model_text(cfg: dict[str, Any]) -> str:
    model = cfg.get("model") or {}
    if not isinstance(model, dict):
        return str(model)
    if model.get("config"):
        arch = model["config"]
        dims = ", ".join(f"{k}={v}" for k, v in arch.items() if k != "model_type")
        text = f"random {arch.get('model_type', '?')} built from a config ({dims})"
    else:
        text = str(model.get("name_or_path", MISSING))
    if model.get("tokenizer"):
        text += f"; tokenizer {model['tokenizer']}"
    lora = model.get("lora")
    if isinstance(lora, dict):
        text += f"; LoRA r={lora.get('r')} alpha={lora.get('alpha')} ({model.get('adapter_between_stages', 'merge')})"
    elif "lora" in model:
        text += "; full fine-tuning"
    if model.get("dtype"):
        text += f"; {model['dtype']}"
    return text


def _methods_text(cfg: dict[str, Any], store: RunStore) -> str:
    raw = cfg.get("method")
    items = raw if isinstance(raw, list) else ([raw] if isinstance(raw, dict) else [])
    described = {}
    for m in items:
        name = str(m.get("name"))
        extra = []
        if name in ("moderate", "random", "high", "low"):
            extra.append(f"rho={m.get('rho')}")
            if name == "moderate":
                extra.append(f"prefilter={m.get('prefilter')}, G over {m.get('params')} parameters")
        elif name == "kl":
            extra.append(f"beta={m.get('kl_beta')}")
        elif name == "ewc":
            extra.append(f"lambda={m.get('ewc_lambda')}")
        elif name == "olora":
            extra.append(f"lambda={m.get('olora_lambda')}")
        elif name == "clip":
            extra.append(f"max norm={m.get('clip_norm')}")
        described[name] = name + (f" ({', '.join(extra)})" if extra else "")
    return "; ".join(described.get(m, m) for m in store.methods) or MISSING


def _tasks_text(cfg: dict[str, Any], store: RunStore) -> str:
    by_name = {t.get("name"): t for t in cfg.get("tasks") or [] if isinstance(t, dict)}
    parts = []
    for k, task in enumerate(store.tasks, start=1):
        t = by_name.get(task, {})
        n = f", {t['n_train']} train samples" if t.get("n_train") else ""
        parts.append(f"{k}. {task}{n}")
    return " &rarr; ".join(escape(p) for p in parts) or MISSING


def _optim_text(cfg: dict[str, Any]) -> str:
    o = cfg.get("optim") or {}
    if not isinstance(o, dict) or not o:
        return MISSING
    keys = ("lr", "batch_size", "grad_accum", "epochs", "max_steps", "scheduler")
    return ", ".join(f"{k}={o[k]}" for k in keys if o.get(k) is not None)


# --------------------------------------------------------------------------- html pieces


def _finite(x: Any) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def format_p(p: float) -> str:
    """``"p=0.031"``, ``"p<0.001"`` or ``""`` (no test)."""
    if not _finite(p):
        return ""
    return "p<0.001" if p < 0.001 else f"p={p:.3f}" if p < 0.1 else f"p={p:.2f}"


def _num_td(value: float, std: float = math.nan, fmt: str = ".1f", n: float | None = None, key: str = "",
            of: int | None = None, lo: float = math.nan, hi: float = math.nan, p: float = math.nan) -> str:
    text = format_value(value, std, fmt)
    attrs = [f'data-key="{escape(key)}"'] if key else []
    if n is not None and of is not None and text != MISSING and int(n) < of:
        attrs.append(f'title="from {int(n)} of {of} seeds"')
    extra = ""
    if text == MISSING:
        attrs.append('class="missing"')
    else:
        attrs.append(f'data-value="{float(value)!r}"')
        if not math.isnan(std):
            attrs.append(f'data-std="{float(std)!r}"')
        if _finite(lo) and _finite(hi):
            attrs.append(f'data-lo="{float(lo)!r}" data-hi="{float(hi)!r}"')
            extra += f'<br><span class="ci">[{format(lo, fmt)}, {format(hi, fmt)}]</span>'
        if _finite(p):
            attrs.append(f'data-p="{float(p)!r}"')
            extra += f' <span class="p">{escape(format_p(p))}</span>'
    if n is not None:
        attrs.append(f'data-n="{int(n)}"')
    return f"<td {' '.join(attrs)}>{escape(text)}{extra}</td>"


def _table(table_id: str, header: Sequence[str], rows: Iterable[str], caption: str = "") -> str:
    name_cls = ' class="name"'
    head = "".join(f"<th{name_cls if i == 0 else ''}>{escape(h)}</th>" for i, h in enumerate(header))
    cap = f"<caption>{escape(caption)}</caption>" if caption else ""
    return f'<table id="{table_id}">{cap}<thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _paper_table_html(store: RunStore, judge: str | None) -> str:
    table = paper_table(store, judge)
    cols = paper_columns_for(store, judge)
    if not len(table):
        return "<p>No results yet.</p>"
    rows = []
    for method in table.index:
        n_seeds = int(table.at[method, "n_seeds"])
        cells = [f'<td class="name">{escape(str(method))}</td>', f'<td data-key="n_seeds">{n_seeds}</td>']
        for c in cols:
            cells.append(_num_td(table.at[method, c.key], table.at[method, f"{c.key}_std"], c.fmt,
                                 table.at[method, f"{c.key}_n"], c.key, n_seeds,
                                 *(table.at[method, f"{c.key}_{x}"] if f"{c.key}_{x}" in table.columns
                                   else math.nan for x in ("lo", "hi", "p"))))
        rows.append(f'<tr data-method="{escape(str(method))}">{"".join(cells)}</tr>')
    header = ["method", "seeds"] + [c.label + {"lower": " ↓", "higher": " ↑"}.get(c.better, "") for c in cols]
    sset = primary_safety_set(store)
    ref = reference_method(store)
    caption = ("Mean ± std over seeds (std only with more than one seed); below it, where generations were "
               "saved, the 95% bootstrap interval over prompts"
               + (f" and the p-value of the paired test against {ref} on the same prompts (McNemar for the final "
                  "ASR, a paired bootstrap over prompts for the rates averaged over checkpoints)" if ref else "")
               + ". ASR, refusal and over-refusal rates are "
               f"percentages averaged over the checkpoints 0..{store.n_stages}"
               + (f" on {sset.removeprefix('safety/')}" if sset else "")
               + "; AA, BWT, FM and max drop come from the matrix of task scores; ↓ lower is better, ↑ higher is "
               "better; — not measured.")
    return _table("paper-table", header, rows, caption)


def _asr_stage_html(store: RunStore, judge: str | None) -> str:
    j = primary_judge(store, judge)
    mean = asr_per_stage(store, j, stat="mean")
    if not len(mean):
        return ""
    std = asr_per_stage(store, j, stat="std")
    ci = stage_intervals(store, primary_safety_set(store), f"asr/{j}").set_index(["method", "stage"])
    rows = []
    for method in mean.index:
        cells = [f'<td class="name">{escape(str(method))}</td>']
        for s in mean.columns:
            lo, hi, p = (ci.at[(method, s), c] if (method, s) in ci.index else math.nan for c in ("lo", "hi", "p"))
            cells.append(_num_td(mean.at[method, s], std.at[method, s], lo=lo, hi=hi, p=p))
        rows.append(f'<tr data-method="{escape(str(method))}">{"".join(cells)}</tr>')
    header = ["method"] + [f"stage {s}" + (f" ({store.tasks[s - 1]})" if s else " (aligned)") for s in mean.columns]
    ref = reference_method(store)
    caption = (f"ASR (%) judged by {j}, mean ± std over seeds; 95% bootstrap interval over prompts where generations "
               "were saved" + (f"; p: exact McNemar test against {ref} on the same prompts at that stage "
                               "(seed s against seed s)" if ref else "") + ".")
    return _table("asr-stage-table", header, rows, caption)


def _paired_html(store: RunStore, judge: str | None) -> str:
    table = comparison_table(store, judge)
    if not len(table):
        return ""
    rows = []
    for _, r in table.iterrows():
        test = "McNemar (exact)" if r["test"] == "mcnemar" else "paired bootstrap"

        def td(col: str, spec: str = ".1f", text: str | None = None) -> str:
            v = r[col]
            if not _finite(v):
                return f'<td data-col="{col}" class="missing">{MISSING}</td>'
            return f'<td data-col="{col}" data-value="{float(v)!r}">{escape(text or format(v, spec))}</td>'

        rows.append(f'<tr data-method="{escape(str(r["method"]))}" data-measure="{escape(str(r["measure"]))}">'
                    f'<td class="name">{escape(str(r["label"]))}</td><td class="name">{escape(str(r["method"]))}</td>'
                    f'{td("value")}{td("lo")}{td("hi")}{td("diff", "+.1f")}{td("diff_lo", "+.1f")}'
                    f'{td("diff_hi", "+.1f")}{td("p", text=format_p(r["p"]).removeprefix("p=").removeprefix("p"))}'
                    f'<td class="name">{test}</td>{td("n", ".0f")}</tr>')
    ref = str(table["vs"].iloc[0])
    header = ["measure", "method", "value", "95% CI lo", "95% CI hi", f"diff vs {ref}", "diff lo", "diff hi",
              "p", "test", "pairs"]
    return ("<h2>Paired tests</h2>"
            + _table("paired-tests", header, rows,
                     f"Each method against {ref} on the same prompts: value = mean over seeds, its 95% bootstrap "
                     f"interval over prompts; diff = method minus {ref} in points, with its 95% interval and the "
                     "two-sided p-value. McNemar: exact binomial test on the discordant (seed, prompt) pairs, "
                     "Agresti-Min interval; paired bootstrap: prompts resampled, the per-prompt difference averaged "
                     "over seeds and checkpoints. No correction for multiple comparisons."))


def _category_html(store: RunStore, judge: str | None) -> str:
    table, j = category_asr_table(store, judge)
    if j is None or not len(table):
        return ""
    rows = []
    for cat in table.index:
        cells = [f'<td class="name">{escape(str(cat))}</td>'] + [_num_td(table.at[cat, m]) for m in table.columns]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return ("<h2>ASR per category</h2>"
            + _table("category-table", ["category", *map(str, table.columns)], rows,
                     f"ASR (%) per harm category judged by {j}, mean over checkpoints and seeds."))


def _selection_html(store: RunStore) -> str:
    table = selection_table(store)
    if not len(table):
        return ""
    fmts = {"kept_fraction": ".3f", "response_len_kept": ".1f", "response_len_dropped": ".1f"}
    stat_cols = [c for c in table.columns if c not in ("method", "stage", "task")]
    rows = []
    for _, r in table.iterrows():
        cells = [f'<td class="name">{escape(str(r["method"]))}</td>', f"<td>{int(r['stage'])}</td>",
                 f'<td class="name">{escape(str(r["task"]))}</td>']
        cells += [_num_td(r[c], fmt=fmts.get(c, ".4g")) for c in stat_cols]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    header = ["method", "stage", "task", *[c.replace("_", " ") for c in stat_cols]]
    return ("<h2>Selection</h2>"
            + _table("selection-table", header, rows,
                     "Per stage, mean over seeds: fraction of samples stepped on, mean G_i and loss L_i of the kept "
                     "and dropped samples, response length (tokens) of the kept and the other samples."))


def _timing_html(store: RunStore) -> str:
    table = timing_table(store)
    if not len(table):
        return ""
    rows = []
    for _, r in table.iterrows():
        rows.append(f'<tr><td class="name">{escape(str(r["method"]))}</td>{_num_td(r["train_s"])}'
                    f'{_num_td(r["eval_s"])}{_num_td(r["steps"], fmt=".0f")}</tr>')
    return _table("timing-table", ["method", "training (s)", "evaluation (s)", "optimizer steps"], rows,
                  "Wall-clock per run summed over stages, mean over seeds.")


def _measurements_html(store: RunStore) -> str:
    """Every safety / over-refusal / capability measurement per stage (categories, counts left out)."""
    prefixes = ("safety/", "overrefusal/", "capability/", "lmeval/")
    res = store.results
    mask = res["task"].str.startswith(prefixes) & (res["metric"] != "n")
    mask &= ~res["metric"].str.startswith("unparsable")
    mask &= ~(res["metric"].str.startswith("asr/") & (res["metric"].str.count("/") >= 2))
    pairs = res.loc[mask, ["task", "metric"]].drop_duplicates().sort_values(["task", "metric"])
    if not len(pairs):
        return ""
    rows = []
    for task, metric in pairs.itertuples(index=False):
        long = metric_per_stage(store, task, metric)
        for method, sub in long.groupby("method", sort=False):
            if sub["n"].sum() == 0:
                continue
            cells = [f'<td class="name">{escape(task)}</td>', f'<td class="name">{escape(metric)}</td>',
                     f'<td class="name">{escape(str(method))}</td>']
            cells += [_num_td(m, s) for m, s in zip(sub["mean"], sub["std"])]
            rows.append(f"<tr>{''.join(cells)}</tr>")
    header = ["set", "metric", "method", *[f"stage {s}" for s in store.stages]]
    return ("<h2>All measurements per stage</h2>"
            + _table("measurements-table", header, rows, "Mean ± std over seeds (percent unless noted)."))


def _figure_html(p: Plot) -> str:
    return (f'<figure class="plot" id="{escape(p.id)}"><img src="{p.uri}" alt="{escape(p.title)}">'
            f"<figcaption><b>{escape(p.title)}.</b> {escape(p.caption)}</figcaption></figure>")


JUDGE_NOTE = (
    "The <b>keyword</b> judge counts a response as an attack success when it contains none of the refusal strings; "
    "the <b>heuristic</b> judge counts harmful compliance: no refusal phrase, and an attempt at the request (enough "
    "words, content words shared with the request). Both are heuristics: cheap, reproducible and useful for smoke "
    "tests and trends, but they "
    "miss harmful answers that contain a refusal phrase and flag harmless non-refusals. For real runs the judge is "
    "<b>Llama Guard</b> (the paper's: Llama-Guard-3-8B), with the HarmBench classifier as a second opinion; "
    "unparsable verdicts are left out of the ASR, not counted as safe."
)


def render_report(store: RunStore, judge: str | None = None) -> str:
    """The report page of ``store`` as an HTML string."""
    cfg = store.config
    machine, machine_src = machine_info(store)
    machine_text = "; ".join(f"{k}: {v}" for k, v in machine.items())
    sset = primary_safety_set(store)
    j = primary_judge(store, judge)
    facts = [
        ("model", escape(_model_text(cfg))),
        ("tasks in order", _tasks_text(cfg, store)),
        ("methods", escape(_methods_text(cfg, store))),
        ("seeds", escape(", ".join(map(str, store.seeds)) or MISSING)),
        ("runs", escape(f"{len(store.runs)}: " + ", ".join(store.runs)) if store.runs else MISSING),
        ("optimizer", escape(_optim_text(cfg))),
        ("safety metric", escape(f"ASR on {sset.removeprefix('safety/')} judged by {j}" if sset and j else MISSING)),
        ("machine", escape(machine_text) + f' <span class="sub">({escape(machine_src)})</span>'),
    ]
    fact_html = "".join(f"<dt>{escape(k)}</dt><dd>{v}</dd>" for k, v in facts)
    plots = all_plots(store)
    cfg_path = store.path / CONFIG_FILE
    config_text = cfg_path.read_text(encoding="utf-8") if cfg_path.exists() else "(no config.resolved.yaml)"
    summary = summary_markdown(store, judge)
    method_lines = [ln.removeprefix("- ") for ln in summary.splitlines() if ln.startswith("- ")]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>gradsift report: {escape(store.path.name)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>gradsift report: {escape(store.path.name)}</h1>",
        f'<p class="sub">{escape(str(store.path.resolve()))} &middot; built {datetime.now():%Y-%m-%d %H:%M}</p>',
        '<h2>What the run did</h2><dl class="facts" id="run-facts">' + fact_html + "</dl>",
        _timing_html(store),
        "<h2>Summary</h2>",
        _paper_table_html(store, judge),
        '<ul id="method-lines">' + "".join(f"<li>{escape(ln.replace('**', ''))}</li>" for ln in method_lines)
        + "</ul>",
        _asr_stage_html(store, judge),
        _paired_html(store, judge),
        "<h2>Figures</h2>" if plots else "",
        *(_figure_html(p) for p in plots),
        _category_html(store, judge),
        _selection_html(store),
        *render_sections(store),
        _measurements_html(store),
        "<h2>About the judges</h2>",
        f'<p class="note" id="judge-note">{JUDGE_NOTE}</p>',
        "<h2>Resolved config</h2>",
        f'<pre id="config">{escape(config_text)}</pre>',
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"


def build_report(run_dir: str | Path, out: str | Path | None = None, judge: str | None = None) -> Path:
    """Write the self-contained ``report.html`` of a run directory; return its path.

    ``out`` defaults to ``<run_dir>/report.html``; ``judge`` overrides the primary judge.
    """
    store = load_run(run_dir)
    page = render_report(store, judge)
    path = Path(out) if out is not None else store.path / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path

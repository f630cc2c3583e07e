"""Figures of a run, rendered with matplotlib (Agg) to PNG data URIs for the HTML report.

Each ``plot_*`` function returns a list of :class:`Plot` (empty when the run has no
data for it), so the report shows only what was measured.
"""

from __future__ import annotations

import base64
import io
import math
import re
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from gradsift.store import RunStore  # noqa: E402
from gradsift.report.tables import judges_measured, metric_per_stage, primary_safety_set, stage_intervals  # noqa: E402

__all__ = [
    "Plot",
    "all_plots",
    "figure_to_data_uri",
    "plot_asr",
    "plot_loss",
    "plot_refusal",
    "plot_score_matrices",
    "plot_selection",
    "slug",
]

DPI = 100


@dataclass(frozen=True)
class Plot:
    """One rendered figure: a stable element id, a title, a caption and the PNG as a data URI."""

    id: str
    title: str
    caption: str
    uri: str


def slug(text: str) -> str:
    """A string safe in an HTML id: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def figure_to_data_uri(fig) -> str:
    """PNG bytes of ``fig`` as ``data:image/png;base64,...``; closes the figure."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _colors(store: RunStore) -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {m: cycle[i % len(cycle)] for i, m in enumerate(store.methods)}


def _stage_ticks(ax, store: RunStore) -> None:
    ax.set_xticks(store.stages)
    ax.set_xticklabels(["0\naligned"] + [f"{k}\n{t}" for k, t in enumerate(store.tasks, start=1)], fontsize=8)
    ax.set_xlabel("stage (after training on)")


def _per_stage_panel(ax, store: RunStore, task: str, metric: str, colors: dict[str, str]) -> bool:
    """One line per method (mean over seeds) with a ±std band over seeds and, where generations were
    saved, error bars of the 95% bootstrap interval over prompts; False when nothing was drawn."""
    long = metric_per_stage(store, task, metric)
    ci = stage_intervals(store, task, metric).set_index(["method", "stage"])
    methods = list(dict.fromkeys(long["method"]))
    drawn = False
    for i, (method, sub) in enumerate(long.groupby("method", sort=False)):
        mean, std = sub["mean"].to_numpy(float), sub["std"].to_numpy(float)
        if np.isnan(mean).all():
            continue
        x = sub["stage"].to_numpy()
        ax.plot(x, mean, marker="o", color=colors[method], label=str(method))
        band = ~np.isnan(std)
        if band.any():
            ax.fill_between(x, np.where(band, mean - std, np.nan), np.where(band, mean + std, np.nan),
                            color=colors[method], alpha=0.2, linewidth=0)
        lo = np.array([ci.at[(method, s), "lo"] if (method, s) in ci.index else np.nan for s in x], dtype=float)
        hi = np.array([ci.at[(method, s), "hi"] if (method, s) in ci.index else np.nan for s in x], dtype=float)
        has = ~(np.isnan(lo) | np.isnan(hi) | np.isnan(mean))
        if has.any():
            # the interval is of the per-prompt mean; the line is the mean over seeds: clip so the bar holds it
            lo_h, hi_h = np.minimum(lo, mean), np.maximum(hi, mean)
            shift = 0.06 * (i - (len(methods) - 1) / 2)  # side by side, so the bars stay readable
            ax.errorbar(x[has] + shift, mean[has], yerr=[(mean - lo_h)[has], (hi_h - mean)[has]], fmt="none",
                        ecolor=colors[method], elinewidth=1, capsize=3)
        drawn = True
    _stage_ticks(ax, store)
    ax.grid(alpha=0.3)
    return drawn


def plot_asr(store: RunStore) -> list[Plot]:
    """ASR per stage on the primary safety set: one panel per judge, one line per method."""
    sset = primary_safety_set(store)
    judges = judges_measured(store, sset) if sset else []
    if not judges:
        return []
    colors = _colors(store)
    fig, axes = plt.subplots(1, len(judges), figsize=(4.2 * len(judges), 3.4), squeeze=False)
    for ax, judge in zip(axes[0], judges):
        _per_stage_panel(ax, store, sset, f"asr/{judge}", colors)
        ax.set_title(f"judge: {judge}", fontsize=10)
        ax.set_ylabel("ASR (%)")
        ax.set_ylim(bottom=0)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Attack success rate per stage ({sset.removeprefix('safety/')})", fontsize=11)
    fig.tight_layout()
    return [Plot("plot-asr", "ASR per stage",
                 "Mean over seeds; the band is ± one standard deviation over seeds (shown with more than one seed); "
                 "error bars: 95% bootstrap interval over prompts (where the run saved its generations).",
                 figure_to_data_uri(fig))]


def plot_refusal(store: RunStore) -> list[Plot]:
    """Refusal rate on the primary safety set, and over-refusal when measured, per stage."""
    panels: list[tuple[str, str, str]] = []
    sset = primary_safety_set(store)
    if sset and "refusal_rate" in store.metric_names(sset):
        panels.append((sset, "refusal_rate", f"refusals on {sset.removeprefix('safety/')} (%)"))
    for oset in store.task_names("overrefusal/"):
        if "over_refusal" in store.metric_names(oset):
            panels.append((oset, "over_refusal", f"over-refusal on {oset.removeprefix('overrefusal/')} (%)"))
    if not panels:
        return []
    colors = _colors(store)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (task, metric, label) in zip(axes[0], panels):
        _per_stage_panel(ax, store, task, metric, colors)
        ax.set_title(label, fontsize=10)
        ax.set_ylabel("%")
        ax.set_ylim(-2, 102)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return [Plot("plot-refusal", "Refusal rate per stage",
                 "Refusals of harmful prompts (higher is safer) and of safe prompts (over-refusal, lower is "
                 "better); mean over seeds, band ± one sd over seeds, error bars the 95% bootstrap interval over "
                 "prompts.", figure_to_data_uri(fig))]


def plot_score_matrices(store: RunStore) -> list[Plot]:
    """One annotated heatmap per method: task scores (columns) after each stage (rows), mean over seeds."""
    if not store.tasks:
        return []
    from gradsift.eval.outcomes import score_matrix

    out = []
    T = store.n_stages
    for method in store.methods:
        runs = store.runs_of(method)
        mats = []
        for run in runs:
            R, r0 = score_matrix(store, run)
            full = np.vstack([r0 if r0 is not None else np.full(T, np.nan), R])
            mats.append(full)
        if not mats or np.isnan(np.array(mats)).all():
            continue
        with np.errstate(all="ignore"), _quiet():
            mean = np.nanmean(np.array(mats), axis=0)
        fig, ax = plt.subplots(figsize=(1.3 * T + 2.4, 0.6 * (T + 1) + 1.4))
        im = ax.imshow(np.ma.masked_invalid(mean), cmap="viridis", vmin=0, vmax=100, aspect="auto")
        for (j, i), v in np.ndenumerate(mean):
            if not math.isnan(v):
                ax.text(i, j, f"{v:.1f}", ha="center", va="center", fontsize=8,
                        color="white" if v < 60 else "black")
        ax.set_xticks(range(T))
        ax.set_xticklabels(store.tasks, fontsize=8)
        ax.set_yticks(range(T + 1))
        ax.set_yticklabels(["aligned"] + [f"after {k}: {t}" for k, t in enumerate(store.tasks, start=1)], fontsize=8)
        ax.set_xlabel("task scored")
        ax.set_title(f"{method}: task scores R (%), {len(runs)} seed{'s' if len(runs) != 1 else ''}", fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.05)
        fig.tight_layout()
        out.append(Plot(f"plot-rmatrix-{slug(method)}", f"Task scores: {method}",
                        "Row j: the model after stage j (row 0: the aligned model); column i: the score on task i. "
                        "Blank cells were not measured.", figure_to_data_uri(fig)))
    return out


class _quiet:
    """Silence numpy's 'mean of empty slice' warnings inside a block."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", category=RuntimeWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def plot_selection(store: RunStore) -> list[Plot]:
    """Per method: G_i histograms of kept vs dropped samples per stage (kept range shaded) and
    response lengths of kept vs dropped samples (seeds pooled)."""
    out = []
    for method in store.methods:
        runs = store.runs_of(method)
        per_stage = []
        for k in range(1, store.n_stages + 1):
            tables = [t for t in (store.selection(r, k) for r in runs) if t is not None and len(t)]
            if tables:
                per_stage.append((k, tables))
        if not per_stage:
            continue
        n = len(per_stage)
        fig, axes = plt.subplots(2, n, figsize=(3.6 * n, 5.6), squeeze=False)
        for col, (k, tables) in enumerate(per_stage):
            sel = pd.concat(tables, ignore_index=True)
            kept = sel["kept"].astype(bool)
            scored = sel["scored"].astype(bool) if "scored" in sel else sel["G"].notna()
            g_kept = sel.loc[kept & sel["G"].notna(), "G"].to_numpy(float)
            g_drop = sel.loc[scored & ~kept & sel["G"].notna(), "G"].to_numpy(float)
            ax = axes[0][col]
            g_all = np.concatenate([g_kept, g_drop])
            if len(g_all):
                bins = np.histogram_bin_edges(g_all, bins=min(30, max(5, len(g_all) // 3)))
                if len(g_kept):
                    ax.axvspan(g_kept.min(), g_kept.max(), color="tab:green", alpha=0.12, label="kept range")
                ax.hist(g_drop, bins=bins, color="tab:red", alpha=0.6, label=f"dropped ({len(g_drop)})")
                ax.hist(g_kept, bins=bins, color="tab:green", alpha=0.7, label=f"kept ({len(g_kept)})")
                ax.axvline(float(np.median(g_all)), color="black", linestyle="--", linewidth=1, label="median")
            else:
                ax.text(0.5, 0.5, "no G_i (not scored)", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(f"stage {k}: {store.tasks[k - 1]}", fontsize=10)
            ax.set_xlabel("G_i (per-sample gradient norm)")
            ax.set_ylabel("samples")
            ax.legend(fontsize=7)
            ax = axes[1][col]
            if "response_len" in sel:
                lens = sel["response_len"].to_numpy(float)
                bins = np.histogram_bin_edges(lens, bins=min(30, max(5, len(lens) // 3)))
                ax.hist(lens[~kept.to_numpy()], bins=bins, color="tab:red", alpha=0.6, label="not kept")
                ax.hist(lens[kept.to_numpy()], bins=bins, color="tab:green", alpha=0.7, label="kept")
                ax.legend(fontsize=7)
            ax.set_xlabel("response tokens")
            ax.set_ylabel("samples")
        fig.suptitle(f"{method}: selection ({len(runs)} seed{'s' if len(runs) != 1 else ''} pooled)", fontsize=11)
        fig.tight_layout()
        out.append(Plot(f"plot-selection-{slug(method)}", f"Selection: {method}",
                        "Top: G_i of the scored samples, kept (green) vs dropped (red); the shaded band spans the "
                        "kept G_i (the band is chosen per batch, so it is wider than one batch's). Bottom: response "
                        "length of the kept vs the other samples.", figure_to_data_uri(fig)))
    return out


def plot_loss(store: RunStore) -> list[Plot]:
    """Training loss over steps, one panel per method, one line per seed; stages separated by dotted lines."""
    panels = []
    for method in store.methods:
        curves = []
        for run in store.runs_of(method):
            xs, ys, bounds, offset = [], [], [], 0
            for k in range(1, store.n_stages + 1):
                log = store.log(run, k)
                if log is None or not len(log):
                    continue
                steps = log["step"].to_numpy(float)
                if xs:  # break the line between stages
                    xs.append(np.nan)
                    ys.append(np.nan)
                xs.extend(offset + steps)
                ys.extend(log["loss"].to_numpy(float))
                offset += float(steps.max())
                bounds.append((offset, k))
            if xs:
                curves.append((run, np.array(xs), np.array(ys), bounds))
        if curves:
            panels.append((method, curves))
    if not panels:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.4), squeeze=False)
    for ax, (method, curves) in zip(axes[0], panels):
        for run, x, y, bounds in curves:
            ax.plot(x, y, linewidth=1.2, label=f"seed {store.run_seed(run)}")
        for b, k in curves[0][3][:-1]:
            ax.axvline(b + 0.5, color="grey", linestyle=":", linewidth=1)
        ax.set_title(method, fontsize=10)
        ax.set_xlabel("optimizer step (stages concatenated)")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return [Plot("plot-loss", "Training loss",
                 "Loss of the samples stepped on, per logged step; dotted lines separate the stages.",
                 figure_to_data_uri(fig))]


def all_plots(store: RunStore) -> list[Plot]:
    """Every figure the run has data for, in report order."""
    return [*plot_asr(store), *plot_refusal(store), *plot_score_matrices(store), *plot_selection(store),
            *plot_loss(store)]

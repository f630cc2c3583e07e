"""Report section: mechanism (see :mod:`gradsift.report.sections`).

Shows what ``gradsift study drift RUN_DIR`` wrote under ``analysis/mechanism/``: the
KL drift toward the aligned and the pretrained model per stage, the cosine of each
stage's update with the alignment direction, and the safety basin. Every number is
a mean over seeds with its sample standard deviation (``gradsift.analysis.stats``).
"""

from __future__ import annotations

import math
from html import escape
from pathlib import Path

import pandas as pd

from gradsift.report.sections import register_section
from gradsift.store import RunStore

__all__ = ["mechanism_section"]

def _folder(store: RunStore) -> Path:
    from gradsift.analysis.drift import MECHANISM_STUDY

    return store.layout.analysis(MECHANISM_STUDY, create=False)


def _read(store: RunStore, name: str) -> pd.DataFrame | None:
    path = _folder(store) / name
    if not path.exists():
        return None
    frame = pd.read_csv(path)
    return frame if len(frame) else None


def _meta(store: RunStore) -> dict:
    path = _folder(store) / "meta.json"
    from gradsift.data.records import read_json

    return read_json(path, error=ValueError) if path.exists() else {}


def _methods(store: RunStore, frame: pd.DataFrame) -> list[str]:
    present = list(dict.fromkeys(frame["method"].astype(str)))
    return [m for m in store.methods if m in present] + [m for m in present if m not in store.methods]


def _per_stage(frame: pd.DataFrame, value: str) -> pd.DataFrame:
    """Mean, sd and n over seeds of ``value`` per method and stage."""
    from gradsift.analysis.stats import mean_sd

    rows = []
    for (method, stage), sub in frame.groupby(["method", "stage"], sort=False):
        m, sd, n = mean_sd(sub[value].to_numpy(float))
        rows.append({"method": str(method), "stage": int(stage), "mean": m, "sd": sd, "n": n})
    return pd.DataFrame(rows)


def _fmt(mean: float, sd: float, fmt: str) -> str:
    if math.isnan(mean):
        return "&ndash;"
    return format(mean, fmt) + ("" if math.isnan(sd) else f" ± {format(sd, fmt)}")


def _cell(mean: float, sd: float, n: int, fmt: str, key: str) -> str:
    if math.isnan(mean):
        return '<td class="missing">&ndash;</td>'
    extra = "" if math.isnan(sd) else f' data-std="{sd!r}"'
    return f'<td data-key="{escape(key)}" data-value="{mean!r}"{extra} data-n="{n}">{_fmt(mean, sd, fmt)}</td>'


def _table(table_id: str, header: list[str], rows: list[str], caption: str) -> str:
    head = "".join(f'<th{" class=name" if i == 0 else ""}>{escape(h)}</th>' for i, h in enumerate(header))
    return (f'<table id="{table_id}"><caption>{escape(caption)}</caption><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def _lines(ax, store: RunStore, long: pd.DataFrame, colors: dict[str, str]) -> None:
    import numpy as np

    for method in _methods(store, long):
        sub = long[long["method"] == method].sort_values("stage")
        x, mean, sd = sub["stage"].to_numpy(), sub["mean"].to_numpy(float), sub["sd"].to_numpy(float)
        ax.plot(x, mean, marker="o", color=colors.get(method), label=method)
        band = ~np.isnan(sd)
        if band.any():
            ax.fill_between(x, np.where(band, mean - sd, np.nan), np.where(band, mean + sd, np.nan),
                            color=colors.get(method), alpha=0.2, linewidth=0)
    ax.set_xticks(store.stages)
    ax.set_xticklabels(["0\naligned"] + [f"{k}\n{t}" for k, t in enumerate(store.tasks, start=1)], fontsize=8)
    ax.grid(alpha=0.3)


def _colors(store: RunStore, methods: list[str]) -> dict[str, str]:
    import matplotlib.pyplot as plt

    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    order = list(dict.fromkeys(list(store.methods) + methods))
    return {m: cycle[i % len(cycle)] for i, m in enumerate(order)}


def _figure(plot_id: str, title: str, caption: str, fig) -> str:
    from gradsift.report.html import _figure_html
    from gradsift.report.plots import Plot, figure_to_data_uri

    return _figure_html(Plot(plot_id, title, caption, figure_to_data_uri(fig)))


# --------------------------------------------------------------------------- KL drift


def _drift_html(store: RunStore, meta: dict) -> str:
    import matplotlib.pyplot as plt

    frame = _read(store, "drift.csv")
    if frame is None:
        return ""
    direction = meta.get("default_direction", "ckpt||ref")
    frame = frame[frame["direction"] == direction]
    sets = [s for s in ("harmful", "benign") if (frame["set"] == s).any()]
    refs = [r for r in ("aligned", "pretrained") if (frame["reference"] == r).any()]
    colors = _colors(store, list(frame["method"].astype(str).unique()))
    fig, axes = plt.subplots(len(sets), len(refs), figsize=(4.3 * len(refs), 3.2 * len(sets)), squeeze=False)
    rows = []
    for i, s in enumerate(sets):
        for j, ref in enumerate(refs):
            long = _per_stage(frame[(frame["set"] == s) & (frame["reference"] == ref)], "kl")
            _lines(axes[i][j], store, long, colors)
            axes[i][j].set_title(f"KL to the {ref} model, {s} prompts", fontsize=10)
            axes[i][j].set_ylabel("KL (nats / token)")
            for method in _methods(store, long):
                sub = long[long["method"] == method].set_index("stage")
                cells = [_cell(*(sub.loc[k, c] for c in ("mean", "sd", "n")), ".4f", f"{s}/{ref}/{method}/{k}")
                         if k in sub.index else '<td class="missing">&ndash;</td>' for k in store.stages]
                rows.append(f'<tr><td class="name">{escape(s)}</td><td class="name">{escape(ref)}</td>'
                            f'<td class="name">{escape(method)}</td>{"".join(cells)}</tr>')
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    pre = escape(str(meta.get("pretrained", "the pretrained model")))
    caption = (f"Token-level KL({'checkpoint || reference' if direction == 'ckpt||ref' else 'reference || checkpoint'})"
               f", teacher-forced on the aligned model's greedy replies to {meta.get('n_harmful', '?')} harmful and "
               f"{meta.get('n_benign', '?')} benign held-out prompts; pretrained = {pre}. Mean over seeds, band ± sd. "
               "Elastic reversion: KL to the pretrained model falling while KL to the aligned model rises.")
    header = ["prompts", "reference", "method", *[f"stage {k}" for k in store.stages]]
    return ("<h3>Drift toward the pretrained model</h3>"
            + _figure("plot-mechanism-kl", "KL drift per stage", caption, fig)
            + _table("mechanism-kl-table", header, rows, "KL in nats per reply token, mean ± sd over seeds."))


# --------------------------------------------------------------------------- direction


def _direction_html(store: RunStore, meta: dict) -> str:
    import matplotlib.pyplot as plt

    frame = _read(store, "direction.csv")
    if frame is None:
        return ""
    kinds = [("whole", "whole model"), ("topk_layers", f"top-{meta.get('top_k_layers', 'k')} tensors"),
             ("topk_coords", f"top {100 * float(meta.get('top_frac', 0.01)):g}% coordinates"),
             ("cumulative", "cumulative (theta_k - theta_0)")]
    kinds = [(k, label) for k, label in kinds if k in frame]
    colors = _colors(store, list(frame["method"].astype(str).unique()))
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.6 * len(kinds), 3.2), squeeze=False)
    rows = []
    for ax, (k, label) in zip(axes[0], kinds):
        long = _per_stage(frame, k)
        _lines(ax, store, long, colors)
        ax.axhline(0, color="0.5", linewidth=0.8)
        ax.set_title(label, fontsize=10)
        ax.set_ylabel("cosine with theta_pre - theta_aligned")
        for method in _methods(store, long):
            sub = long[long["method"] == method].set_index("stage")
            cells = [_cell(*(sub.loc[s, c] for c in ("mean", "sd", "n")), ".4f", f"{k}/{method}/{s}")
                     if s in sub.index else '<td class="missing">&ndash;</td>' for s in store.stages[1:]]
            rows.append(f'<tr><td class="name">{escape(label)}</td><td class="name">{escape(method)}</td>'
                        f'{"".join(cells)}</tr>')
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    html = ("<h3>The update's direction</h3>"
            + _figure("plot-mechanism-direction", "Update vs alignment direction",
                      "Cosine between each stage's weight update theta_k - theta_(k-1) (the merged LoRA delta) and "
                      "theta_pretrained - theta_aligned; positive: the update leads back toward the pretrained model. "
                      "Mean over seeds, band ± sd.", fig)
            + _table("mechanism-direction-table", ["cosine", "method", *[f"stage {s}" for s in store.stages[1:]]],
                     rows, "Mean ± sd over seeds."))
    layers = _read(store, "direction_layers.csv")
    if layers is not None:
        blocks = list(dict.fromkeys(layers["block"].astype(str)))
        fig, axes = plt.subplots(1, store.n_stages or 1, figsize=(4.2 * max(1, store.n_stages), 3.2), squeeze=False,
                                 sharey=True)
        for ax, stage in zip(axes[0], store.stages[1:]):
            for method in _methods(store, layers):
                sub = layers[(layers["method"] == method) & (layers["stage"] == stage)]
                mean = sub.groupby("block", sort=False)["cosine"].mean().reindex(blocks)
                ax.plot(range(len(blocks)), mean.to_numpy(float), marker=".", color=colors.get(method), label=method)
            ax.axhline(0, color="0.5", linewidth=0.8)
            ax.set_title(f"stage {stage}", fontsize=10)
            ax.set_xlabel("block (embeddings, layers 0.., final norm)")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("cosine per block")
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        html += _figure("plot-mechanism-direction-layers", "Update vs alignment direction, per block",
                        "The cosine over each block's parameters (transformer layer i: model.layers.i), "
                        "mean over seeds.", fig)
    return html


# --------------------------------------------------------------------------- basin


def _basin_html(store: RunStore, meta: dict) -> str:
    import matplotlib.pyplot as plt

    from gradsift.analysis.stats import mean_sd

    summary = _read(store, "basin_summary.csv")
    detail = _read(store, "basin.csv")
    if summary is None or detail is None:
        return ""
    colors = _colors(store, list(summary["method"].astype(str).unique()))
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    rows = []
    seen_stage0 = False
    for method in _methods(store, summary):
        for stage in sorted(summary.loc[summary["method"] == method, "stage"].unique()):
            if stage == 0 and seen_stage0:
                continue
            sub_s = summary[(summary["method"] == method) & (summary["stage"] == stage)]
            sub_d = detail[(detail["method"] == method) & (detail["stage"] == stage)]
            if stage == 0:  # one model, listed under every run: show it once
                seen_stage0 = True
                sub_s = sub_s.iloc[:1]
                sub_d = sub_d[sub_d["run"] == sub_d["run"].iloc[0]]
            label = "aligned (stage 0)" if stage == 0 else f"{method}, stage {stage}"
            curve = sub_d.groupby("radius")["refusal"].mean()
            base = float(sub_s["base_refusal"].mean())
            ax.plot([0.0, *curve.index], [base, *curve.to_numpy(float)], marker="o",
                    color="0.3" if stage == 0 else colors.get(method), linestyle="--" if stage == 0 else "-",
                    label=label)
            bm, bsd, n = mean_sd(sub_s["base_refusal"].to_numpy(float))
            wm, wsd, _ = mean_sd(sub_s["width"].to_numpy(float))
            rows.append(f'<tr><td class="name">{escape(label)}</td>{_cell(bm, bsd, n, ".1f", f"base/{label}")}'
                        f'{_cell(wm, wsd, n, ".3g", f"width/{label}")}</tr>')
    ax.set_xlabel("radius (relative to each layer's weight norm)")
    ax.set_ylabel("refusal on harmful prompts (%)")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    n_dir = meta.get("n_directions", "?")
    tol = meta.get("tolerance", "?")
    caption = (f"Refusal (keyword judge, {meta.get('n_prompts', '?')} held-out harmful prompts, replies of "
               f"{meta.get('max_new_tokens', '?')} tokens) along {n_dir} random directions, each layer's direction "
               f"scaled to that layer's weight norm; mean over directions (and seeds). Basin width: the largest "
               f"radius keeping the mean refusal within {tol} points of the unperturbed model's (the paper: 100 "
               "directions).")
    return ("<h3>The safety basin</h3>" + _figure("plot-mechanism-basin", "Safety basin", caption, fig)
            + _table("mechanism-basin-table", ["checkpoint", "refusal (%)", "basin width"], rows,
                     "Mean ± sd over seeds."))


@register_section
def mechanism_section(store: RunStore) -> str:
    """The mechanism section: empty when ``gradsift study drift`` has not been run on this run directory."""
    if not _folder(store).is_dir():
        return ""
    meta = _meta(store)
    parts = [_drift_html(store, meta.get("drift", {})), _direction_html(store, meta.get("direction", {})),
             _basin_html(store, meta.get("basin", {}))]
    if not any(parts):
        return ""
    return ('<h2 id="mechanism">Mechanism: drift, update direction, safety basin</h2>'
            '<p class="sub">From <code>gradsift study drift</code> (see docs/analysis.md, Mechanism).</p>'
            + "".join(parts))

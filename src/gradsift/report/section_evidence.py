"""Report section: evidence (see :mod:gradsift.report.sections)."""

from __future__ import annotations

from gradsift.report.sections import register_section


# --------------------------------------------------------------------------- the offline study


def _offline_doc(store):
    from gradsift.analysis.offline import TABLES_FILE
    from gradsift.data.records import read_json

    path = store.path / TABLES_FILE
    if not path.exists():
        return None
    return read_json(path, error=ValueError)


def _offline_cell(r) -> str:
    from html import escape

    from gradsift.analysis.offline import _fmt

    if r is None:
        return '<td class="missing">&ndash;</td>'
    sd = f" ± {_fmt(r['sd'])}" if r["n_seeds"] > 1 else ""
    text = f"{_fmt(r['mean'])}{sd}"
    ci = f"[{_fmt(r['ci_lo'])}, {_fmt(r['ci_hi'])}]"
    return (f'<td data-value="{r["mean"]!r}" data-lo="{r["ci_lo"]!r}" data-hi="{r["ci_hi"]!r}">{escape(text)} '
            f'<span class="sub">{escape(ci)}</span></td>')


def _offline_tests_html(doc, pairs, cols, table_id: str) -> str:
    from html import escape

    from gradsift.analysis.offline import LABELS, _fmt, _fmt_p

    rows = []
    for t in doc.get("tests", []):
        if (t["a"], t["b"]) not in pairs or (t["task"], t["metric"]) not in cols:
            continue
        rows.append(f"<tr><td class=\"name\">{escape(LABELS.get(t['a'], t['a']))} &minus; "
                    f"{escape(LABELS.get(t['b'], t['b']))}</td><td>{escape(t['task'] + ' ' + t['metric'])}</td>"
                    f"<td>{_fmt(t['diff'])} <span class=\"sub\">[{_fmt(t['lo'])}, {_fmt(t['hi'])}]</span></td>"
                    f"<td>{_fmt_p(t['p'])}</td><td>{escape(t['test'])}</td><td>{t['n']}</td></tr>")
    if not rows:
        return ""
    head = "".join(f"<th>{h}</th>" for h in ("A &minus; B", "measurement", "difference [95% CI]", "p", "test", "n"))
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _offline_plot(doc, cols) -> str:
    """Bars per arm with their 95% intervals over prompts, one panel per safety measurement."""
    import matplotlib.pyplot as plt

    from gradsift.analysis.offline import LABELS, arm_order
    from gradsift.report.plots import figure_to_data_uri

    panels = [c for c in cols if c[0].startswith(("safety/", "capability/"))][:4]
    if not panels:
        return ""
    cell = {(r["arm"], r["task"], r["metric"]): r for r in doc["arms"]}
    arms = arm_order(doc)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    for ax, (task, metric) in zip(axes[0], panels):
        xs, ys, lo, hi = [], [], [], []
        for i, arm in enumerate(arms):
            r = cell.get((arm, task, metric))
            if r is None:
                continue
            xs.append(i)
            ys.append(r["mean"])
            lo.append(max(0.0, r["mean"] - r["ci_lo"]))
            hi.append(max(0.0, r["ci_hi"] - r["mean"]))
        ax.bar(xs, ys, yerr=[lo, hi], capsize=3, color="#4c72b0")
        ax.set_xticks(range(len(arms)))
        ax.set_xticklabels([LABELS.get(a, a).replace(" (", "\n(") for a in arms], rotation=60, fontsize=7)
        ax.set_title(f"{task}\n{metric}", fontsize=8)
        ax.set_ylim(0, 100)
    fig.tight_layout()
    uri = figure_to_data_uri(fig)
    return (f'<figure class="plot" id="offline-study-plot"><img src="{uri}" alt="offline study">'
            "<figcaption><b>Offline study.</b> Mean per subset; error bars: 95% bootstrap intervals over prompts."
            "</figcaption></figure>")


def _matching_html(m) -> str:
    from html import escape

    from gradsift.analysis.offline import _fmt

    rows = []
    for b in m["balance"]:
        bal = "" if b["balanced"] is None else ("yes" if b["balanced"] else "<b>no</b>")
        rows.append(f"<tr><td class=\"name\">{escape(b['covariate'])}</td><td>{_fmt(b['smd_before'], 2)}</td>"
                    f"<td>{_fmt(b['smd_pools'], 2)}</td><td>{_fmt(b['smd_after'], 2)}</td>"
                    f"<td>{_fmt(b['mean_high_after'], 2)}</td><td>{_fmt(b['mean_moderate_after'], 2)}</td>"
                    f"<td>{bal}</td></tr>")
    head = "".join(f"<th>{h}</th>" for h in ("covariate", "SMD before (plain subsets)", "SMD of the pools",
                                              "SMD after matching", "mean, matched High", "mean, matched Moderate",
                                              "balanced (|SMD| &le; 0.1)"))
    notes = "".join(f"<li>{escape(n)}</li>" for n in m.get("notes") or [])
    verdict = ("" if m.get("balanced") else
               '<p class="note" id="matching-unbalanced"><b>No matched effect is reported:</b> matching could not '
               f"balance {escape(', '.join(m.get('unbalanced') or []) or 'enough pairs')} (|SMD| &gt; 0.1 after "
               "matching). The matched subsets' evaluations are in the measurements below, but they do not separate "
               "the gradient from the covariates.</p>")
    return (f"<h3>Matched ablation</h3><p>{escape(m['method'])}; {m['n_pairs']} pairs of {m['k_wanted']} wanted, "
            f"from pools of {m['pool_sizes'][0]} and {m['pool_sizes'][1]} rows.</p>"
            f'<table id="matching-balance"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
            + (f"<ul>{notes}</ul>" if notes else "") + verdict)


def _online_html(doc, cols) -> str:
    from html import escape

    from gradsift.analysis.offline import _fmt, _fmt_p

    tests = {(t["a"], t["b"], t["task"], t["metric"]): t for t in doc.get("tests", [])}
    lengths = doc.get("lengths", {})

    def mean_len(arm):
        vals = [v.get("kept_response_len") for v in (lengths.get(arm) or {}).values()]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else float("nan")

    rows = []
    for task, metric in cols:
        off = tests.get(("moderate", "random", task, metric))
        on = tests.get(("online_moderate", "online_random", task, metric))
        if off is None or on is None:
            continue

        def side(t):
            return f"{_fmt(t['diff'])} <span class=\"sub\">[{_fmt(t['lo'])}, {_fmt(t['hi'])}], p {_fmt_p(t['p'])}</span>"

        sig = [t["p"] < 0.05 for t in (off, on)]
        same = (off["diff"] > 0) == (on["diff"] > 0)
        verdict = ("agree" if sig[0] and sig[1] and same else "disagree" if sig[0] and sig[1] else
                   "neither significant" if not any(sig) else "only " + ("offline" if sig[0] else "online")
                   + " significant")
        rows.append(f"<tr><td class=\"name\">{escape(task + ' ' + metric)}</td><td>{side(off)}</td><td>{side(on)}</td>"
                    f"<td>{escape(verdict)}</td></tr>")
    if not rows:
        return ""
    lens = (f"<p>Mean response length of the kept samples (tokens): offline Moderate-G_i {_fmt(mean_len('moderate'))}, "
            f"Random {_fmt(mean_len('random'))}; online Moderate-G_i {_fmt(mean_len('online_moderate'))}, Random "
            f"{_fmt(mean_len('online_random'))}.</p>")
    head = "".join(f"<th>{h}</th>" for h in ("measurement", "offline: Moderate &minus; Random",
                                              "online: Moderate &minus; Random", "verdict"))
    return ("<h3>Online against offline</h3><p>The same comparison made by the online rule (the stage loop, "
            "selection at the current weights in every batch) and by the offline subsets (selection once, at the "
            "aligned weights).</p>"
            f'<table id="online-offline"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>' + lens)


@register_section
def offline_study_section(store) -> str:
    """The offline study (Table 2), the matched ablation, the selectivity test and online against offline."""
    from html import escape

    from gradsift.analysis.offline import LABELS, _fmt, arm_order, table_columns

    doc = _offline_doc(store)
    if doc is None:
        return ""
    cols = table_columns(doc)
    cell = {(r["arm"], r["task"], r["metric"]): r for r in doc["arms"]}
    lengths = doc.get("lengths", {})
    head = "".join(f"<th>{escape(t)}<br>{escape(m)}</th>" for t, m in cols)
    body = []
    matched_ok = bool((doc.get("matching") or {}).get("balanced"))
    for arm in arm_order(doc):
        if arm.startswith("matched_") and not matched_ok:
            continue
        lens = [v.get("kept_response_len") for v in (lengths.get(arm) or {}).values()]
        lens = [v for v in lens if v is not None]
        body.append(f"<tr><td class=\"name\">{escape(LABELS.get(arm, arm))}</td>"
                    + "".join(_offline_cell(cell.get((arm, t, m))) for t, m in cols)
                    + f"<td>{_fmt(sum(lens) / len(lens)) if lens else '&ndash;'}</td></tr>")
    opts = doc.get("options") or {}
    corr = doc.get("correlations") or {}
    corr_text = ", ".join(f"{escape(c)} {_fmt(v['rho'], 2)}" for c, v in corr.items())
    parts = [
        '<h2 id="offline-study">Offline study: which samples drive the drift</h2>',
        f"<p>Task {escape(str(doc.get('task')))}: {doc.get('n_rows')} rows scored once at the aligned weights; each "
        f"subset holds rho = {opts.get('rho')} of them and is fine-tuned alone from the aligned model with the same "
        f"optimizer settings; seeds {escape(str(doc.get('seeds')))}. Cells: mean over seeds (± sd over seeds when "
        "several) and the 95% bootstrap interval over prompts. Spearman correlation of G_i with "
        f"{corr_text or '&ndash;'}.</p>",
        f'<table id="offline-table"><thead><tr><th class="name">subset</th>{head}<th>response tokens<br>(kept)</th>'
        f"</tr></thead><tbody>{''.join(body)}</tbody></table>",
        _offline_plot(doc, cols),
        _offline_tests_html(doc, {("moderate", "high"), ("moderate", "random"), ("high", "random"),
                                  ("low", "random")}, cols, "offline-tests"),
    ]
    caps = [c for c in cols if c[0].startswith("capability/")]
    if caps:
        safety = [c for c in cols if c[0].startswith("safety/")]
        parts.append("<h3>Selectivity</h3><p>The same subsets judged on an unrelated held-out capability beside "
                     "safety: if Moderate-G_i protects safety specifically, the safety difference below is large "
                     "and the capability difference small.</p>")
        parts.append(_offline_tests_html(doc, {("moderate", "high"), ("moderate", "random")}, safety + caps,
                                         "selectivity-tests"))
    m = doc.get("matching")
    if m:
        parts.append(_matching_html(m))
        if matched_ok:
            parts.append(_offline_tests_html(doc, {("matched_moderate", "matched_high")}, cols, "matched-tests"))
    parts.append(_online_html(doc, cols))
    times = doc.get("times") or {}
    if times:
        parts.append('<p class="sub">Times (s): ' + escape(", ".join(f"{k.removesuffix('_s')} {v:.0f}"
                                                                    for k, v in times.items())) + "</p>")
    return "\n".join(p for p in parts if p)


# --------------------------------------------------------------------------- the sample audit


def _audit_rows_html(table_id: str, header: list[str], rows: list[list[str]]) -> str:
    from html import escape

    name = ' class="name"'
    head = "".join(f"<th{name if i == 0 else ''}>{escape(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td{name if i == 0 else ''}>{c}</td>" for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _audit_plot(folder) -> str:
    """G_i against response length, log-log, coloured by band."""
    from pathlib import Path

    import matplotlib.pyplot as plt
    import pandas as pd

    from gradsift.analysis.audit import TABLE_FILE
    from gradsift.report.plots import figure_to_data_uri

    path = Path(folder) / TABLE_FILE
    if not path.exists():
        return ""
    t = pd.read_parquet(path, columns=["G", "n_response_tokens", "band"])
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    styles = {"": ("#b0b7c3", "other"), "low": ("#4c72b0", "Low-G_i"), "moderate": ("#55a868", "Moderate-G_i"),
              "high": ("#c44e52", "High-G_i")}
    for band, (color, label) in styles.items():
        sub = t[t["band"] == band]
        if len(sub):
            ax.scatter(sub["n_response_tokens"].clip(lower=1), sub["G"], s=9, color=color, label=label, alpha=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("response tokens")
    ax.set_ylabel("G_i")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return (f'<figure class="plot" id="plot-audit-length"><img src="{figure_to_data_uri(fig)}" '
            'alt="G_i against response length"><figcaption><b>G_i against response length.</b> One point per '
            "sample, coloured by the band of the offline selection.</figcaption></figure>")


def _audit_sample_html(s) -> str:
    from html import escape

    head = (f"row {s['row']}: G = {s['G']:.4g}, L = {s['L']:.3f}, {s['response_tokens']} response tokens"
            + (f", {s['category']}" if s.get("category") else ""))
    body = "".join(f"<p><b>{part}</b></p><pre>{escape(s[part])}</pre>" for part in ("prompt", "response") if part in s)
    return f"<details><summary>{escape(head)}</summary>{body}</details>"


@register_section
def audit_section(store) -> str:
    """The sample audit of ``gradsift study audit`` written under ``<run_dir>/analysis/audit/``."""
    from html import escape

    from gradsift.analysis.audit import AUDIT_STUDY, BANDS, read_audit

    folder = store.layout.analysis(AUDIT_STUDY, create=False)
    doc = read_audit(folder)
    if doc is None:
        return ""

    def f(x, spec=".2f"):
        return "&ndash;" if x is None else escape(format(x, spec))

    b = doc["bands"]
    rho = doc["rho"]
    intro = (f"<p>{doc['n']} scored samples; bands of rho = {rho:g} (High: the top {100 * rho:g}% of G_i, Moderate: "
             f"the {100 * rho:g}% closest to the median, Low: the bottom). High-G_i samples have "
             f"{f(b['high'].get('response_tokens_mean'), '.1f')} response tokens on average (Moderate "
             f"{f(b['moderate'].get('response_tokens_mean'), '.1f')}, Low {f(b['low'].get('response_tokens_mean'), '.1f')}"
             f"); the paper reports about {doc.get('paper_high_response_tokens', 11.5):g}. Perplexity is exp(L_i), so "
             "its rank correlation equals the loss's.</p>")
    sp = _audit_rows_html("audit-spearman", ["G_i against", "Spearman rho", "p", "n", "rho, response length fixed",
                                             "p"],
                          [[escape(s.get("label", k)), f(s["rho"], "+.3f"), f(s["p"], ".2g"), str(s["n"]),
                            f(s.get("rho_given_length"), "+.3f"), f(s.get("p_given_length"), ".2g")]
                           for k, s in doc["spearman"].items()])
    cols = [("n", "n", "d"), ("G_median", "G median", ".4g"), ("response_tokens_mean", "response tokens, mean", ".1f"),
            ("response_tokens_median", "response tokens, median", ".0f"), ("L_mean", "L_i mean", ".3f"),
            ("perplexity_median", "perplexity, median", ".2f"), ("prompt_tokens_mean", "prompt tokens, mean", ".1f"),
            ("short_share", "short answers", ".0%")]
    cols = [c for c in cols if any(c[0] in b[k] for k in b)]
    bands = _audit_rows_html("audit-bands", ["band"] + [c[1] for c in cols],
                             [[name] + [f(b[name].get(c[0]), c[2]) for c in cols] for name in ("all", *BANDS)])
    parts = ['<h2 id="sample-audit">Sample audit: what high-G_i samples are</h2>', intro, sp, bands]
    cats = doc.get("categories")
    if cats:
        k = cats["kruskal"]
        parts.append(f"<p>G_i across categories: Kruskal-Wallis H = {f(k['H'])}, p = {f(k['p'], '.2g')}.</p>")
        parts.append(_audit_rows_html(
            "audit-categories", ["category", "n", "G median", "response tokens, mean", "in High", "in Moderate",
                                 "in Low"],
            [[escape(c), str(v["n"]), f(v["G_median"], ".4g"), f(v["response_tokens_mean"], ".1f"),
              f(v["high_share"], ".0%"), f(v["moderate_share"], ".0%"), f(v["low_share"], ".0%")]
             for c, v in cats["per_category"].items()]))
    style = doc.get("style")
    if style:
        parts.append(f"<p>The model's typical reply: median {f(style['median_tokens'], '.0f')} tokens over "
                     f"{style['n']} greedy replies to prompts of the data ({style['capped']} cut at "
                     f"{style['max_new_tokens']}); a response under {style['short_ratio']:g} of it is a short "
                     "answer.</p>")
    parts.append(_audit_plot(folder))
    for title, key in (("Highest G_i", "top"), ("Lowest G_i", "bottom")):
        parts.append(f"<h3>{title}</h3>" + "".join(_audit_sample_html(s) for s in doc[key]))
    return "\n".join(p for p in parts if p)

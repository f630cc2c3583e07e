"""Report section: evidence (see :mod:gradsift.report.sections)."""

from __future__ import annotations

from gradsift.report.sections import register_section


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

    from gradsift.analysis.audit import AUDIT_DIR, BANDS, read_audit

    folder = store.path / AUDIT_DIR
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
    sp = _audit_rows_html("audit-spearman", ["G_i against", "Spearman rho", "p", "n"],
                          [[escape(s.get("label", k)), f(s["rho"], "+.3f"), f(s["p"], ".2g"), str(s["n"])]
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

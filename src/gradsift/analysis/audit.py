"""The sample audit: what distinguishes high-G_i samples from the others.

From a score table written by ``gradsift score`` (columns ``row, G, L,
n_response_tokens, n_tokens``, G_i and L_i at the scored model's weights), the data
that was scored and, optionally, the model:

* per sample: response length (tokens), per-token loss L_i (the mean token
  cross-entropy of the response), the model's perplexity of the response exp(L_i),
  the total response loss L_i x tokens, the prompt length (tokens, with the chat
  template), the task or category when the data has one, and, when a model is given,
  the answer style: the response length over the model's own typical reply length
  (the median length of a few greedy replies it generates to prompts of the data);
* Spearman correlation of G_i with each of them (:func:`gradsift.analysis.stats.spearman`);
  perplexity is a monotone function of L_i, so its rank correlation equals L_i's, and
  the same holds for the length ratio and the length;
* the High / Moderate / Low G_i bands of the offline selection (the top rho, the rho
  closest to the median, the bottom rho: :func:`gradsift.select.offline.select_rows`,
  rho 0.2 by default) with their mean response length, loss, perplexity ...: the
  paper reports about 11.5 response tokens for high-G_i samples;
* G_i per category (Kruskal-Wallis test across categories) and each category's share of
  the bands;
* the samples with the highest and the lowest G_i, shown whole.

:func:`run_audit` does all of it from files and writes ``audit.json`` (the summary) and
``audit.parquet`` (the per-sample table) under ``<out>`` (default
``<scores folder>/analysis/audit``, where a run directory's report looks for it). The model's
replies are measured once: ``style.json`` keeps them for a rerun with the same model and settings.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradsift.analysis.stats import kruskal, partial_spearman, spearman
from gradsift.data.records import read_json
from gradsift.store import RunDir

__all__ = [
    "AUDIT_STUDY",
    "BANDS",
    "CATEGORY_FIELDS",
    "FEATURES",
    "audit_markdown",
    "audit_samples",
    "read_audit",
    "run_audit",
    "sample_table",
    "typical_reply_length",
    "write_audit",
]

AUDIT_STUDY = "audit"  # beside a run directory's other studies: RunDir.analysis(AUDIT_STUDY)
SUMMARY_FILE = "audit.json"
TABLE_FILE = "audit.parquet"
BANDS = ("high", "moderate", "low")
PAPER_HIGH_TOKENS = 11.5
#: per-sample columns whose Spearman correlation with G_i is reported, with their labels
FEATURES = {
    "n_response_tokens": "response tokens",
    "L": "per-token loss L_i",
    "perplexity": "perplexity exp(L_i)",
    "total_loss": "total response loss (L_i x tokens)",
    "n_prompt_tokens": "prompt tokens (with the chat template)",
    "length_ratio": "response length / the model's typical reply length",
}
#: raw-data columns taken as the task or category, the first one present
CATEGORY_FIELDS = ("category", "task", "task_type", "type", "source", "subject", "domain")
SHORT_RATIO = 0.5  # an answer under half the model's typical reply length counts as short


# --------------------------------------------------------------------------- per sample


def _category(raw: dict[str, Any], field: str | None) -> str | None:
    if field is not None:
        value = raw.get(field)
        return None if value is None or str(value).strip() == "" else str(value)
    if "instruction" in raw and "output" in raw and "input" in raw:  # Alpaca: a closed task carries an input
        return "with input" if str(raw.get("input") or "").strip() else "no input"
    return None


def detect_category_field(raw_rows: list[dict[str, Any]]) -> str | None:
    """The first of :data:`CATEGORY_FIELDS` present in the data's first row (None: none)."""
    if not raw_rows:
        return None
    return next((f for f in CATEGORY_FIELDS if f in raw_rows[0]), None)


def sample_table(scores: pd.DataFrame, records: list[dict] | None = None, raw_rows: list[dict] | None = None,
                 category_field: str | None = None, typical_tokens: float | None = None) -> pd.DataFrame:
    """The per-sample audit table: the score columns plus ``perplexity, total_loss, n_prompt_tokens``,
    ``category`` (with raw rows), ``prompt, response`` (with records) and ``length_ratio``, ``short``
    (with the model's typical reply length)."""
    missing = {"row", "G", "L", "n_response_tokens"} - set(scores.columns)
    if missing:
        raise ValueError(f"score table lacks column(s) {sorted(missing)}; produce it with `gradsift score`")
    if not len(scores):
        raise ValueError("the score table is empty")
    t = scores.sort_values("row").reset_index(drop=True).copy()
    t["perplexity"] = np.exp(t["L"].astype(float))
    t["total_loss"] = t["L"].astype(float) * t["n_response_tokens"].astype(float)
    if "n_tokens" in t:
        t["n_prompt_tokens"] = t["n_tokens"] - t["n_response_tokens"]
    rows = t["row"].astype(int).tolist()
    if records is not None:
        by_row = {int(r["row"]): r for r in records}
        absent = [r for r in rows if r not in by_row]
        if absent:
            raise ValueError(f"the data has no row {absent[0]} of the score table (scored from another file, or "
                             f"with a larger --limit?)")
        t["prompt"] = ["\n".join(m["content"] for m in by_row[r]["messages"][:-1]) for r in rows]
        t["response"] = [by_row[r]["messages"][-1]["content"] for r in rows]
    if raw_rows is not None:
        if category_field is not None and raw_rows and category_field not in raw_rows[0]:
            raise KeyError(f"{category_field!r}: no such column in the data (columns: {sorted(raw_rows[0])})")
        field = category_field or detect_category_field(raw_rows)
        cats = [_category(raw_rows[r], field) if r < len(raw_rows) else None for r in rows]
        if any(c is not None for c in cats):
            t["category"] = cats
    if typical_tokens:
        t["length_ratio"] = t["n_response_tokens"] / float(typical_tokens)
        t["short"] = t["length_ratio"] < SHORT_RATIO
    return t


def _band_labels(t: pd.DataFrame, rho: float) -> pd.Series:
    """``band`` per sample: high / moderate / low (the offline selections), else ``""``."""
    from gradsift.select.offline import select_rows

    labels = pd.Series("", index=t.index, dtype=object)
    row_pos = pd.Series(t.index, index=t["row"].to_numpy())
    for band in ("moderate", "low", "high"):  # a tiny table can overlap: the extreme bands win
        kept = select_rows(t[["row", "G", "L"]], method=band, rho=rho)
        labels.iloc[row_pos.loc[kept].to_numpy()] = band
    return labels


# --------------------------------------------------------------------------- the summary


def _num(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _band_summary(sub: pd.DataFrame) -> dict[str, Any]:
    out: dict[str, Any] = {"n": int(len(sub))}
    if not len(sub):
        return out
    out.update({
        "G_mean": _num(sub["G"].mean()), "G_median": _num(sub["G"].median()),
        "G_min": _num(sub["G"].min()), "G_max": _num(sub["G"].max()),
        "response_tokens_mean": _num(sub["n_response_tokens"].mean()),
        "response_tokens_median": _num(sub["n_response_tokens"].median()),
        "L_mean": _num(sub["L"].mean()), "perplexity_median": _num(sub["perplexity"].median()),
        "total_loss_mean": _num(sub["total_loss"].mean()),
    })
    if "n_prompt_tokens" in sub:
        out["prompt_tokens_mean"] = _num(sub["n_prompt_tokens"].mean())
    if "short" in sub:
        out["short_share"] = _num(sub["short"].mean())
    if "category" in sub:
        shares = sub["category"].fillna("(none)").value_counts(normalize=True)
        out["categories"] = {str(k): float(v) for k, v in shares.items()}
    return out


def _sample_view(r: pd.Series) -> dict[str, Any]:
    view = {"row": int(r["row"]), "G": float(r["G"]), "L": float(r["L"]),
            "response_tokens": int(r["n_response_tokens"]), "band": str(r.get("band", ""))}
    for key in ("category", "prompt", "response"):
        if key in r and r[key] is not None and not (isinstance(r[key], float) and math.isnan(r[key])):
            view[key] = str(r[key])
    return view


def audit_samples(table: pd.DataFrame, rho: float = 0.2, n_show: int = 3,
                  typical: dict[str, Any] | None = None) -> tuple[dict[str, Any], pd.DataFrame]:
    """``(summary, table)``: the audit of a :func:`sample_table` (the table gains a ``band`` column).

    The summary holds ``n``, ``rho``, ``spearman`` (feature -> rho, p, n), ``bands`` (all, high,
    moderate, low -> means and medians), ``categories`` (when known), ``style`` (when the model's
    typical reply length is known), ``top`` and ``bottom`` (the n_show samples of highest / lowest G_i).
    """
    if not 0 < rho <= 1:
        raise ValueError(f"rho must lie in (0, 1], got {rho}")
    t = table.copy()
    t["band"] = _band_labels(t, rho)
    summary: dict[str, Any] = {"n": int(len(t)), "rho": rho, "paper_high_response_tokens": PAPER_HIGH_TOKENS}
    summary["spearman"] = {f: {**spearman(t["G"], t[f]), "label": FEATURES[f]} for f in FEATURES if f in t}
    # the same with the response length held fixed: does G_i follow the feature beyond length?
    for f, entry in summary["spearman"].items():
        if f not in ("n_response_tokens", "length_ratio"):
            part = partial_spearman(t["G"], t[f], t["n_response_tokens"])
            entry["rho_given_length"], entry["p_given_length"] = part["rho"], part["p"]
    summary["bands"] = {"all": _band_summary(t), **{b: _band_summary(t[t["band"] == b]) for b in BANDS}}
    if "category" in t:
        cats = t["category"].fillna("(none)")
        per = {}
        for cat, sub in t.groupby(cats, sort=True):
            per[str(cat)] = {"n": int(len(sub)), "G_median": _num(sub["G"].median()),
                             "response_tokens_mean": _num(sub["n_response_tokens"].mean()),
                             **{f"{b}_share": float((sub["band"] == b).mean()) for b in BANDS}}
        test = kruskal({c: t.loc[cats == c, "G"] for c in per})
        summary["categories"] = {"per_category": per, "kruskal": test}
    if typical is not None:
        summary["style"] = {**typical, "short_ratio": SHORT_RATIO}
    order = t.sort_values("G", ascending=False)
    summary["top"] = [_sample_view(r) for _, r in order.head(n_show).iterrows()]
    summary["bottom"] = [_sample_view(r) for _, r in order.tail(n_show).iloc[::-1].iterrows()]
    return summary, t


# --------------------------------------------------------------------------- the model's own style


def typical_reply_length(model, tokenizer, records: list[dict], n: int = 8, max_new_tokens: int = 256,
                         seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """The model's typical reply length: greedy replies to ``n`` prompts drawn from ``records``.

    Returns ``{"median_tokens", "mean_tokens", "n", "capped", "max_new_tokens", "lengths"}``;
    ``capped`` counts replies cut at ``max_new_tokens`` (the median is then a lower bound).
    """
    from gradsift.eval.generation import GenerationConfig, make_generator

    if not records:
        raise ValueError("no records to draw prompts from")
    rng = np.random.default_rng(seed)
    picks = sorted(rng.choice(len(records), size=min(n, len(records)), replace=False).tolist())
    prompts = [records[i]["messages"][:-1] for i in picks]
    gen = make_generator("hf", model, tokenizer, GenerationConfig(max_new_tokens=max_new_tokens,
                                                                  batch_size=min(8, len(prompts))))
    replies = gen.generate(prompts, progress=progress)
    lengths = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in replies]
    return {"median_tokens": float(np.median(lengths)), "mean_tokens": float(np.mean(lengths)), "n": len(lengths),
            "capped": int(sum(length >= max_new_tokens for length in lengths)), "max_new_tokens": max_new_tokens,
            "lengths": lengths, "rows": [int(records[i]["row"]) for i in picks]}


# --------------------------------------------------------------------------- files


def run_audit(scores: str | Path, data: str | Path | None = None, model: str | None = None,
              out: str | Path | None = None, *, rho: float = 0.2, n_show: int = 3, category_field: str | None = None,
              n_style: int = 8, max_new_tokens: int = 256, device: str | None = None, adapter: str | None = None,
              prompt_field: str | None = None, response_field: str | None = None,
              messages_field: str | None = None, progress: bool = True) -> tuple[dict[str, Any], Path]:
    """The audit of a score table, written to ``out``; returns ``(summary, out)``.

    ``data``: the records that were scored (texts, categories); ``model``: the scored model, to
    measure its typical reply length (needs ``data``).
    """
    scores = Path(scores)
    if not scores.exists():
        raise FileNotFoundError(f"{scores}: no such score table (run `gradsift score` first)")
    table = pd.read_parquet(scores)
    records = raw = None
    typical = None
    if model is not None and data is None:
        raise ValueError("--model needs --data: the model's replies are generated to prompts of the data")
    if data is not None:
        from gradsift.data.records import read_records, read_rows

        limit = int(table["row"].max()) + 1 if len(table) else None
        records = read_records(data, prompt_field=prompt_field, response_field=response_field,
                               messages_field=messages_field, limit=limit)
        raw = read_rows(data, limit=limit)
    out_dir = Path(out) if out is not None else RunDir(scores.parent).analysis(AUDIT_STUDY)
    if model is not None:
        scored = set(table["row"].astype(int).tolist())
        key = {"model": model, "adapter": adapter, "data": str(data), "n": n_style, "max_new_tokens": max_new_tokens,
               "scored_rows": len(scored)}
        typical = _cached_style(out_dir, key)
        if typical is None:
            from gradsift.models import load_model, load_tokenizer

            tok = load_tokenizer(model)
            m = load_model(model, device=device, adapter=adapter)
            m.eval()
            typical = typical_reply_length(m, tok, [r for r in records if int(r["row"]) in scored], n=n_style,
                                           max_new_tokens=max_new_tokens, progress=progress)
            del m
            _write_style(out_dir, key, typical)
    t = sample_table(table, records, raw, category_field=category_field,
                     typical_tokens=typical["median_tokens"] if typical else None)
    summary, t = audit_samples(t, rho=rho, n_show=n_show, typical=typical)
    summary["sources"] = {"scores": str(scores), "data": str(data) if data is not None else None, "model": model}
    write_audit(summary, t, out_dir)
    return summary, out_dir


STYLE_FILE = "style.json"


def _cached_style(out_dir: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The model's typical reply length measured by an earlier audit with the same settings (None: none)."""
    p = out_dir / STYLE_FILE
    if not p.exists():
        return None
    try:
        doc = read_json(p, error=ValueError)
    except ValueError:
        return None
    return doc.get("typical") if doc.get("key") == key else None


def _write_style(out_dir: Path, key: dict[str, Any], typical: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / STYLE_FILE).write_text(json.dumps({"key": key, "typical": typical}, indent=2))


def write_audit(summary: dict[str, Any], table: pd.DataFrame, out_dir: str | Path) -> Path:
    """``audit.json`` and ``audit.parquet`` under ``out_dir`` (created)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / (SUMMARY_FILE + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False, allow_nan=False, default=_json_default))
    tmp.replace(out_dir / SUMMARY_FILE)
    table.to_parquet(out_dir / TABLE_FILE, index=False)
    return out_dir


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return None if math.isnan(float(x)) else float(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


def read_audit(folder: str | Path) -> dict[str, Any] | None:
    """The ``audit.json`` summary in ``folder`` (None when absent)."""
    p = Path(folder) / SUMMARY_FILE
    if not p.exists():
        return None
    return read_json(p, error=ValueError)


# --------------------------------------------------------------------------- text


def _f(x: Any, spec: str = ".2f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def audit_markdown(summary: dict[str, Any], max_chars: int | None = None) -> str:
    """The audit as markdown: Spearman table, band table, categories, style, top and bottom samples
    (whole, or cut at ``max_chars`` characters)."""
    rho = summary["rho"]
    b = summary["bands"]
    lines = [f"## Sample audit ({summary['n']} samples, bands of rho = {rho:g})", ""]
    hi = b["high"].get("response_tokens_mean")
    lines.append(f"High-G_i samples (top {100 * rho:g}%) have {_f(hi, '.1f')} response tokens on average "
                 f"(median {_f(b['high'].get('response_tokens_median'), '.0f')}); Moderate "
                 f"{_f(b['moderate'].get('response_tokens_mean'), '.1f')}, Low {_f(b['low'].get('response_tokens_mean'), '.1f')}, "
                 f"all {_f(b['all'].get('response_tokens_mean'), '.1f')}. The paper reports about "
                 f"{summary.get('paper_high_response_tokens', PAPER_HIGH_TOKENS):g} for high-G_i samples.")
    lines += ["", "| G_i against | Spearman rho | p | n | rho given response length | p |",
              "|---|---:|---:|---:|---:|---:|"]
    for f, s in summary["spearman"].items():
        lines.append(f"| {s.get('label', f)} | {_f(s['rho'], '+.3f')} | {_f(s['p'], '.2g')} | {s['n']} | "
                     f"{_f(s.get('rho_given_length'), '+.3f')} | {_f(s.get('p_given_length'), '.2g')} |")
    cols = [("n", "n", "d"), ("G_median", "G median", ".4g"), ("response_tokens_mean", "resp. tokens mean", ".1f"),
            ("response_tokens_median", "resp. tokens median", ".0f"), ("L_mean", "L mean", ".3f"),
            ("perplexity_median", "ppl median", ".2f"), ("total_loss_mean", "total loss mean", ".1f"),
            ("prompt_tokens_mean", "prompt tokens mean", ".1f"), ("short_share", "short answers", ".0%")]
    cols = [c for c in cols if any(c[0] in b[k] for k in b)]
    lines += ["", "| band | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for name in ("all", *BANDS):
        lines.append(f"| {name} | " + " | ".join(_f(b[name].get(c[0]), c[2]) for c in cols) + " |")
    if "categories" in summary:
        cats = summary["categories"]
        k = cats["kruskal"]
        lines += ["", f"G_i across categories: Kruskal-Wallis H = {_f(k['H'], '.2f')}, p = {_f(k['p'], '.2g')} "
                  f"({k['k']} categories).", "",
                  "| category | n | G median | resp. tokens mean | share high | share moderate | share low |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for cat, c in cats["per_category"].items():
            lines.append(f"| {cat} | {c['n']} | {_f(c['G_median'], '.4g')} | {_f(c['response_tokens_mean'], '.1f')} | "
                         f"{_f(c['high_share'], '.0%')} | {_f(c['moderate_share'], '.0%')} | {_f(c['low_share'], '.0%')} |")
    if "style" in summary:
        s = summary["style"]
        lines += ["", f"The model's typical reply: median {_f(s['median_tokens'], '.0f')} tokens over {s['n']} greedy "
                  f"replies ({s['capped']} cut at {s['max_new_tokens']}). A response under {s['short_ratio']:g} of "
                  f"that counts as a short answer (the share per band is in the table)."]
    for title, key in (("Highest G_i", "top"), ("Lowest G_i", "bottom")):
        lines += ["", f"### {title}"]
        for s in summary[key]:
            head = (f"- row {s['row']}: G = {s['G']:.4g}, L = {s['L']:.3f}, {s['response_tokens']} response tokens"
                    + (f", {s['category']}" if s.get("category") else ""))
            lines.append(head)
            for part in ("prompt", "response"):
                if part in s:
                    text = s[part] if max_chars is None or len(s[part]) <= max_chars else s[part][:max_chars] + " [...]"
                    lines.append(f"  - {part}: " + text.replace("\n", " / "))
    return "\n".join(lines) + "\n"

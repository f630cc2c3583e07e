"""The selectivity test: the same subsets judged on an unrelated held-out capability beside safety.

If Moderate-G_i protects safety *specifically*, a model fine-tuned on it should
keep its refusals better than one fine-tuned on High-G_i (or Random) while an
unrelated capability (ARC-Challenge, BoolQ, TruthfulQA) moves no differently.
If it merely drops the informative samples, the capability moves with the
safety.

Each model is scored with the project's offline multiple-choice scorer
(:mod:`gradsift.eval.capability`: lm-eval's prompts and metrics), question by
question, so that two subsets' models can be compared on the same questions with
a paired test. The per-question file is ``capability-<bench>.jsonl`` beside the
model's generations.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CapabilitySpec", "parse_capability", "score_items", "write_items"]


@dataclass(frozen=True)
class CapabilitySpec:
    """One held-out capability benchmark: a key of ``MC_BENCHMARKS`` (or an alias) and its local file."""

    bench: str
    path: str
    limit: int | None = 100
    seed: int = 0
    batch_size: int = 8

    @property
    def key(self) -> str:
        from gradsift.eval.capability import _ALIASES

        return _ALIASES.get(self.bench, self.bench)

    @property
    def task(self) -> str:
        return f"capability/{self.key}"


def parse_capability(text: str, limit: int | None = 100) -> CapabilitySpec:
    """``BENCH=PATH`` (e.g. ``arc_challenge=data/arc/ARC-Challenge-Test.jsonl``) as a spec; the file must exist."""
    from gradsift.eval.capability import MC_BENCHMARKS, _ALIASES

    bench, sep, path = text.partition("=")
    bench = bench.strip()
    if not sep or not bench or not path.strip():
        raise ValueError(f"--capability {text!r}: expected BENCH=PATH, e.g. arc_challenge=ARC-Challenge-Test.jsonl")
    if _ALIASES.get(bench, bench) not in MC_BENCHMARKS:
        raise ValueError(f"--capability: unknown benchmark {bench!r}; choose from {', '.join(sorted(MC_BENCHMARKS))}")
    p = Path(path.strip()).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"--capability {bench}: {p}: no such file")
    return CapabilitySpec(bench=bench, path=str(p.resolve()), limit=limit)


def score_items(model, tokenizer, spec: CapabilitySpec, progress: bool = False) -> list[dict]:
    """Per-question metrics ``{"doc_id", "subset", <metric>: 0/1 or fraction}`` of one benchmark.

    The same questions, prompts and metrics as :func:`gradsift.eval.capability.run_mc_benchmark`
    (its mean over these records is that function's result).
    """
    from gradsift.eval.capability import MC_BENCHMARKS, loglikelihoods, mc_metrics

    loader, reported = MC_BENCHMARKS[spec.key]
    items = loader(spec.path)
    doc_ids = sorted({it.doc_id for it in items})
    if spec.limit is not None and spec.limit < len(doc_ids):
        keep = set(random.Random(spec.seed).sample(doc_ids, spec.limit))
        items = [it for it in items if it.doc_id in keep]
    unique: dict[tuple[str, str], int] = {}
    for it in items:
        for req in it.requests:
            unique.setdefault(req, len(unique))
    scores = loglikelihoods(model, tokenizer, list(unique), batch_size=spec.batch_size, progress=progress)
    out: list[dict] = []
    for it in items:
        m = mc_metrics([scores[unique[r]][0] for r in it.requests], it.labels, it.choice_lengths)
        rec = {"doc_id": it.doc_id, "subset": it.subset}
        for out_key, metric, subset in reported:
            if it.subset == subset:
                rec[out_key] = float(m[metric])
        out.append(rec)
    return out


def write_items(path: Path, records: list[dict]) -> Path:
    """The per-question records of one benchmark (``StageDir.capability(bench)``)."""
    from gradsift.data.records import write_jsonl

    return write_jsonl(path, records)


def summary_rows(spec: CapabilitySpec, records: list[dict]) -> list[dict]:
    """Result rows (percent) of the per-question records, as the evaluation runner names them."""
    import numpy as np

    rows = []
    keys = sorted({k for r in records for k in r if k not in ("doc_id", "subset")})
    for k in keys:
        vals = np.asarray([r[k] for r in records if k in r], dtype=float)
        rows.append({"task": spec.task, "metric": k, "value": 100.0 * float(vals.mean())})
    rows.append({"task": spec.task, "metric": "n", "value": len({r["doc_id"] for r in records})})
    return rows

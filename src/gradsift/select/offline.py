"""Offline selection of a whole dataset from its score table (section 3 of the paper).

Score the dataset once at the aligned weights (``gradsift score``), then keep the
rho fraction closest to the median G (moderate), the top (high), the bottom
(low) or a random rho fraction; the kept rows are written in the input's format.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from gradsift.data.records import read_rows
from gradsift.select.methods import select
from gradsift.select.rules import n_keep


def select_rows(scores: pd.DataFrame, method: str = "moderate", rho: float = 0.2, prefilter: str = "none",
                seed: int = 0) -> list[int]:
    """Row ids kept by ``method`` over the whole table (sorted)."""
    missing = {"row", "G", "L"} - set(scores.columns)
    if missing:
        raise ValueError(f"score table lacks column(s) {sorted(missing)}; produce it with `gradsift score`")
    if len(scores) == 0:
        raise ValueError("the score table is empty")
    G = torch.tensor(scores["G"].to_numpy(), dtype=torch.float64)
    L = torch.tensor(scores["L"].to_numpy(), dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = select(method, G, L, rho=rho, prefilter=prefilter, generator=gen)
    assert idx.numel() <= n_keep(len(scores), rho)
    return sorted(scores["row"].to_numpy()[idx.numpy()].tolist())


def write_subset(source: str | Path, rows: list[int], out: str | Path) -> Path:
    """Write the given rows of ``source`` (in their original fields) to ``out`` (.jsonl/.json/.csv/.parquet)."""
    raw = read_rows(source)
    keep = set(rows)
    subset = [r for i, r in enumerate(raw) if i in keep]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = out.suffix.lower()
    if suffix == ".jsonl":
        with open(out, "w") as f:
            for r in subset:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    elif suffix == ".json":
        out.write_text(json.dumps(subset, ensure_ascii=False, indent=2))
    elif suffix == ".csv":
        pd.DataFrame(subset).to_csv(out, index=False)
    elif suffix == ".parquet":
        pd.DataFrame(subset).to_parquet(out, index=False)
    else:
        raise ValueError(f"{out}: unknown output format {suffix!r}; use .jsonl, .json, .csv or .parquet")
    return out

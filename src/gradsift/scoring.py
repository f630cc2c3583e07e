"""The dataset scorer behind ``gradsift score``: G_i and L_i for every row, to a Parquet table.

Rows are batched by length (little padding), scored with the ghost engine, and
written in chunks next to the output (``<out>.chunks/``) so that a rerun resumes
after the last written chunk. Under ``accelerate launch`` every process scores
one shard of the batches and the main process merges the chunks into one table,
equal to the single-process one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from gradsift.data.formatting import collate, encode_records, length_batches
from gradsift.data.records import RecordError, read_records
from gradsift.norms.engine import GhostNormEngine
from gradsift.runtime import process_state

COLUMNS = ["row", "G", "L", "n_response_tokens", "n_tokens"]


@dataclass
class ScoreOptions:
    params: str = "all"
    batch_size: int = 8
    max_length: int = 512
    chunk_batches: int = 16  # batches per written chunk
    prompt_field: str | None = None
    response_field: str | None = None
    messages_field: str | None = None
    system_field: str | None = None
    limit: int | None = None
    verify: bool = True  # check the first batch against the per-sample loop (gradsift.norms.verify)


def _chunk_dir(out: Path) -> Path:
    return out.with_name(out.name + ".chunks")


def score_features(
    model,
    features: list[dict],
    pad_token_id: int,
    options: ScoreOptions,
    out: Path | None = None,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> pd.DataFrame:
    """Score encoded features ({"row", "input_ids", "labels"}) and return the table (this rank's rows)."""
    lengths = [len(f["input_ids"]) for f in features]
    batches = length_batches(lengths, options.batch_size)
    mine = [(k, b) for k, b in enumerate(batches) if k % world_size == rank]
    done_rows: set[int] = set()
    parts: list[pd.DataFrame] = []
    chunk_dir = _chunk_dir(out) if out is not None else None
    if chunk_dir is not None and chunk_dir.exists():
        for f in sorted(chunk_dir.glob("part-*.parquet")):
            part = pd.read_parquet(f)
            parts.append(part)
            done_rows.update(part["row"].tolist())
    device = next(model.parameters()).device
    todo = [(k, b) for k, b in mine if not all(features[i]["row"] in done_rows for i in b)]
    engine = GhostNormEngine(model, params=options.params, verify=options.verify)
    buffer: list[dict] = []
    n_written = len(list(chunk_dir.glob(f"part-r{rank:03d}-*.parquet"))) if chunk_dir and chunk_dir.exists() else 0

    def flush():
        nonlocal buffer, n_written
        if not buffer:
            return
        df = pd.DataFrame(buffer, columns=COLUMNS)
        parts.append(df)
        if chunk_dir is not None:
            chunk_dir.mkdir(parents=True, exist_ok=True)
            tmp = chunk_dir / f".tmp-r{rank:03d}-{n_written:05d}.parquet"
            df.to_parquet(tmp, index=False)
            tmp.rename(chunk_dir / f"part-r{rank:03d}-{n_written:05d}.parquet")
            n_written += 1
        buffer = []

    try:
        bar = tqdm(todo, desc="scoring", unit="batch", disable=not progress or rank != 0, dynamic_ncols=True)
        for j, (_, idx) in enumerate(bar):
            batch = collate([features[i] for i in idx], pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
            L = engine.forward(batch)
            G = engine.backward()
            n_resp = (batch["labels"][:, 1:] != -100).sum(1)
            n_tok = batch["attention_mask"].sum(1)
            for r, i in enumerate(idx):
                buffer.append({"row": int(features[i]["row"]), "G": float(G[r]), "L": float(L[r]),
                               "n_response_tokens": int(n_resp[r]), "n_tokens": int(n_tok[r])})
            if (j + 1) % options.chunk_batches == 0:
                flush()
        flush()
    finally:
        engine.close()
    if not parts:
        return pd.DataFrame(columns=COLUMNS)
    table = pd.concat(parts, ignore_index=True)
    return table.drop_duplicates("row").sort_values("row").reset_index(drop=True)


def score_dataset(
    model,
    tokenizer,
    source: str | Path,
    out: str | Path | None = None,
    options: ScoreOptions | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Score every row of ``source`` (file or ``hf:`` name); write ``out`` (Parquet) if given.

    Bad rows (or none at all) raise :class:`gradsift.data.RecordError` before anything
    is scored; chunks written by an earlier, interrupted run are kept and reused. With
    ``options.verify`` (the default) the first batch is checked against the per-sample
    loop and a mismatch raises :class:`gradsift.norms.NormCheckError` before any row
    is written.
    """
    options = options or ScoreOptions()
    records = read_records(
        source, prompt_field=options.prompt_field, response_field=options.response_field,
        messages_field=options.messages_field, system_field=options.system_field, limit=options.limit,
    )
    if not records:
        raise RecordError(source, "no records to score (the data is empty)")
    features = encode_records(tokenizer, records, options.max_length, source=str(source))
    state = process_state()
    rank, world, barrier = state.process_index, state.num_processes, state.wait_for_everyone
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    table = score_features(model, features, tokenizer.pad_token_id, options, out=out_path, progress=progress,
                           rank=rank, world_size=world)
    barrier()
    if world > 1 and out_path is not None:
        # every rank's chunks are on disk: merge them all
        parts = [pd.read_parquet(f) for f in sorted(_chunk_dir(out_path).glob("part-*.parquet"))]
        table = pd.concat(parts, ignore_index=True).drop_duplicates("row").sort_values("row").reset_index(drop=True)
    if out_path is not None and rank == 0:
        tmp = out_path.with_name(out_path.name + ".tmp")
        table.to_parquet(tmp, index=False)
        tmp.rename(out_path)
        import shutil

        shutil.rmtree(_chunk_dir(out_path), ignore_errors=True)
    barrier()
    return table

"""Packed and padding-free batches: every packed sample is scored as its own sample.

A packed row holds several samples one after the other (TRL's ``padding_free``,
``DataCollatorWithFlattening``, packing): its ``position_ids`` restart at each
sample, or ``cu_seq_lens_q``/``cu_seq_lens_k``/``seq_idx`` mark where the samples
start, or the attention mask numbers the samples (1, 2, 3...). Scoring such a row
as ONE sample would give the norm of the sum of its samples' gradients, not G_i.

The rules need per-sample (B, T, d) factors, so the engine cuts every packed
sample out of its row into a right-padded batch of its own rows, with its own
position ids, before the forward pass. That is exact when the model's attention
keeps the packed samples apart (flash attention with position ids or
``cu_seq_lens``, or transformers' packed-sequence mask when no attention mask is
given): each sample's logits, loss and gradient are then those it has alone. It
is checked once per batch layout: the packed forward and the unpacked one must
give the same logits, else the engine refuses the batch (in the packed layout a
sample's loss would depend on the samples before it, and per-sample gradients of
the row are not defined).

L_i is the same as for an unpacked sample: the mean token cross-entropy over the
sample's response tokens, each predicted from the tokens of the same sample (the
first token of a packed sample is not predicted, as the first token of any
sample). Packed segments with no response token (TRL's padding, one token each)
are not samples: they are left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# keys that only packed / padding-free batches carry
CU_SEQ_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens")
PACKING_KEYS = CU_SEQ_KEYS + ("seq_idx", "max_length_q", "max_length_k")


@dataclass(frozen=True)
class Segment:
    """One packed sample: tokens ``start:stop`` of batch row ``row``."""

    row: int
    start: int
    stop: int


def _starts_from_ids(ids: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: True where a new segment starts, from per-token segment numbers."""
    new = torch.zeros_like(ids, dtype=torch.bool)
    new[:, 0] = True
    new[:, 1:] = ids[:, 1:] != ids[:, :-1]
    return new


def _as_rows(t: torch.Tensor, shape: torch.Size, key: str) -> torch.Tensor:
    if t.dim() == 1 and len(shape) == 2 and shape[0] == 1:
        t = t.unsqueeze(0)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"batch[{key!r}] has shape {tuple(t.shape)}, input_ids {tuple(shape)}: cannot tell the packed samples apart")
    return t


def segment_starts(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(starts, valid): where packed samples start (None if no row is packed) and which tokens are real.

    Every source of boundaries the batch carries (position ids, ``cu_seq_lens_*``,
    ``seq_idx``, a numbered attention mask) must agree; padding (attention mask 0)
    ends a row.
    """
    ids = batch["input_ids"]
    shape = ids.shape
    am = batch.get("attention_mask")
    valid = torch.ones(shape, dtype=torch.bool, device=ids.device) if am is None else _as_rows(am, shape, "attention_mask") != 0
    sources: dict[str, torch.Tensor] = {}
    pos = batch.get("position_ids")
    if pos is not None:
        pos = _as_rows(pos, shape, "position_ids")
        new = torch.zeros(shape, dtype=torch.bool, device=ids.device)
        new[:, 0] = True
        new[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
        sources["position_ids"] = new
    if batch.get("seq_idx") is not None:
        sources["seq_idx"] = _starts_from_ids(_as_rows(batch["seq_idx"], shape, "seq_idx"))
    if am is not None and bool((am.max() > 1) if am.numel() else False):
        sources["attention_mask"] = _starts_from_ids(_as_rows(am, shape, "attention_mask"))
    for key in CU_SEQ_KEYS:
        cu = batch.get(key)
        if cu is None:
            continue
        cu = cu.flatten().long().to(ids.device)
        B, T = shape
        if int(cu[-1]) > B * T or int(cu[0]) != 0:
            raise ValueError(f"batch[{key!r}] = {cu.tolist()[:8]}... does not cover the {B}x{T} tokens of input_ids")
        new = torch.zeros(B * T, dtype=torch.bool, device=ids.device)
        new[cu[:-1]] = True
        new = new.view(B, T)
        rows_start = cu[:-1] // T
        rows_end = (cu[1:] - 1) // T
        if bool((rows_start != rows_end).any()):
            raise ValueError(f"batch[{key!r}]: a packed sample runs over the end of a row of input_ids")
        new[:, 0] = True
        sources[key] = new
        break  # cu_seq_lens_q and cu_seq_lens_k are the same for causal LMs
    if not sources:
        return None, valid
    names = list(sources)
    first = sources[names[0]] & valid
    for other in names[1:]:
        if not torch.equal(first, sources[other] & valid):
            raise ValueError(f"batch[{names[0]!r}] and batch[{other!r}] disagree on where the packed samples start")
    packed = bool((first.sum(dim=1) > 1).any()) or any(k in batch for k in PACKING_KEYS if batch.get(k) is not None)
    return (first if packed else None), valid


def find_segments(batch: dict[str, torch.Tensor]) -> list[Segment] | None:
    """The packed samples of a batch (row-major), or None when every row holds one sample."""
    starts, valid = segment_starts(batch)
    if starts is None:
        return None
    labels = batch["labels"]
    if labels.dim() == 1:
        labels = labels.unsqueeze(0)
    segments = []
    st, va = starts.cpu(), valid.cpu()
    lab = labels.cpu()
    for r in range(st.shape[0]):
        cols = va[r].nonzero().flatten().tolist()
        if not cols:
            continue
        begin = None
        for j, t in enumerate(cols):
            if begin is None or bool(st[r, t]) or t != cols[j - 1] + 1:
                if begin is not None:
                    segments.append(Segment(r, begin, cols[j - 1] + 1))
                begin = t
        segments.append(Segment(r, begin, cols[-1] + 1))
    # a segment with no response token (TRL pads with one-token segments) is not a sample
    return [s for s in segments if bool((lab[s.row, s.start + 1 : s.stop] != -100).any())]


def unpack(batch: dict[str, torch.Tensor], segments: list[Segment], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """A right-padded batch with one row per packed sample (``position_ids`` kept where they are not 0..n-1)."""
    if not segments:
        raise ValueError("the packed batch holds no sample with a response token to score")
    ids = batch["input_ids"]
    shape = ids.shape
    labels = _as_rows(batch["labels"], shape, "labels")
    pos = batch.get("position_ids")
    pos = _as_rows(pos, shape, "position_ids") if pos is not None else None
    n = max(s.stop - s.start for s in segments)
    N = len(segments)
    out_ids = torch.full((N, n), pad_id, dtype=ids.dtype, device=ids.device)
    out_am = torch.zeros((N, n), dtype=torch.long, device=ids.device)
    out_labels = torch.full((N, n), -100, dtype=labels.dtype, device=labels.device)
    out_pos = torch.zeros((N, n), dtype=torch.long, device=ids.device)
    default = True
    for k, s in enumerate(segments):
        m = s.stop - s.start
        out_ids[k, :m] = ids[s.row, s.start : s.stop]
        out_am[k, :m] = 1
        out_labels[k, :m] = labels[s.row, s.start : s.stop]
        out_labels[k, 0] = -100  # not predicted from this sample's tokens
        if pos is not None:
            p = pos[s.row, s.start : s.stop]
            out_pos[k, :m] = p
            default = default and bool((p == torch.arange(m, device=p.device)).all())
        else:
            out_pos[k, :m] = torch.arange(m, device=ids.device)
    out = {"input_ids": out_ids, "attention_mask": out_am, "labels": out_labels}
    if not default:
        out["position_ids"] = out_pos
    return out


def layout_key(batch: dict[str, torch.Tensor]) -> tuple:
    """What decides how the model's attention treats a packed row: the keys it is given."""
    return tuple(sorted(k for k, v in batch.items() if v is not None and k != "labels"))


@torch.no_grad()
def check_independent(model: nn.Module, batch: dict[str, torch.Tensor], unpacked: dict[str, torch.Tensor],
                      segments: list[Segment]) -> None:
    """Raise ValueError when the packed forward mixes the packed samples (its logits differ from theirs alone)."""
    inputs = {k: v for k, v in batch.items() if k != "labels" and v is not None}
    packed = model(**inputs, use_cache=False)
    packed = (packed.logits if hasattr(packed, "logits") else packed[0]).float()
    alone = {k: unpacked[k] for k in ("input_ids", "attention_mask", "position_ids") if k in unpacked}
    single = model(**alone, use_cache=False)
    single = (single.logits if hasattr(single, "logits") else single[0]).float()
    if packed.dim() == 2:
        packed = packed.unsqueeze(0)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    tol = 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2
    worst, at = 0.0, 0
    for k, s in enumerate(segments):
        a = packed[s.row, s.start : s.stop]
        b = single[k, : s.stop - s.start]
        err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
        if not err <= worst:
            worst, at = err, k
    if not worst <= tol:
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        raise ValueError(
            f"the samples packed in one row are not independent under this model's attention "
            f"({type(model).__name__}, attn_implementation={impl!r}, batch keys {list(inputs)}): packed sample {at} "
            f"gets logits {worst:.1e} (relative) away from the same sample alone, so its gradient in the row is not "
            "its own; give one sample per row, or pack without an attention mask (position_ids that restart) or "
            "with flash attention"
        )

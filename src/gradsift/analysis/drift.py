"""Distribution drift: token-level KL of every checkpoint to the aligned and to the pretrained model.

The paper explains safety loss by *elastic reversion*: fine-tuning pulls the aligned
model back toward the distribution it was aligned from. This module measures it on
a run directory (see :mod:`gradsift.train.stages`) at every checkpoint: stage 0 (the
aligned model) and after each stage, for every method and seed.

What is measured. A fixed set of held-out prompts (harmful and benign separately)
is answered ONCE by the aligned (stage-0) model, greedily; every model is then
teacher-forced on those same prompt + reply sequences. At each reply token t
(the reply's tokens and its end-of-turn token, exactly the tokens the training
loss scores, :mod:`gradsift.data.formatting`) the next-token distributions of the
checkpoint, p, and of a reference model, q, give::

    KL(p || q)_t = sum_v p(v | x_<t) (log p(v | x_<t) - log q(v | x_<t))

The reported value is the mean over all reply tokens of the set (pooled over its
prompts). References: the aligned model (stage 0) and the pretrained model (the
model before alignment). Both directions are stored: ``ckpt||ref`` = KL(p || q),
the default, an expectation under the checkpoint's own next-token distribution
(where the fine-tuned model puts mass the reference does not), and ``ref||ckpt``
= KL(q || p).

Why the aligned model's replies: every checkpoint is scored on the same token
sequences, so a change across stages is a change of the model, not of the text it
happened to generate; and the aligned replies are where the aligned and the
pretrained distributions differ most (refusals after harmful prompts).

The pretrained model: for a shipped organism (``model.name_or_path:
embedded-aligned-precise`` ...) the base its recipe aligned (``embedded``); for a
user's own aligned model, name the model it was aligned from
(``pretrained=`` / ``--pretrained``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Checkpoint",
    "DIRECTIONS",
    "MECHANISM_STUDY",
    "ReferenceLogProbs",
    "RunModels",
    "drift_study",
    "held_out_replies",
    "reply_features",
    "reply_logprobs",
    "token_kl",
]

MECHANISM_STUDY = "mechanism"  # the study's folder: RunDir.analysis(MECHANISM_STUDY)
DRIFT_FILE = "drift.csv"
REPLIES_FILE = "replies.jsonl"
DIRECTIONS = ("ckpt||ref", "ref||ckpt")
DEFAULT_DIRECTION = "ckpt||ref"


# --------------------------------------------------------------------------- the KL itself


def token_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row of two (..., V) tensors of log-probabilities (natural log, nats)."""
    return (logp.exp() * (logp - logq)).sum(dim=-1)


# --------------------------------------------------------------------------- run checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """One model of a run: ``run`` (``<method>-seed<seed>``) after ``stage`` (0: the aligned model)."""

    run: str
    method: str
    seed: int
    stage: int


class RunModels:
    """The models of a run directory: its checkpoints, the aligned and the pretrained model.

    ``pretrained``: the model the aligned one was aligned from (a name or path
    :func:`gradsift.models.load_model` takes); default: the organism recipe's base
    when the run's model is a named organism.
    """

    def __init__(self, run_dir: str | Path, pretrained: str | None = None) -> None:
        from gradsift.store import RunDir
        from gradsift.train.config import load_config
        from gradsift.train.stages import build_tokenizer

        self.layout = RunDir(Path(run_dir))
        self.path = self.layout.path
        cfg_file = self.layout.config_file
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{self.path}: no config.resolved.yaml (pass the folder given to "
                                    "`gradsift train --output` / `gradsift run --output`)")
        self.config = load_config(cfg_file)
        self.tokenizer = build_tokenizer(self.config.model)
        self._pretrained = pretrained

    # ---------------------------------------------------------------- structure

    def runs(self) -> list[tuple[str, Any]]:
        """``(run name, method settings)`` of every method and seed that has a run folder, in config order."""
        from gradsift.store import run_name

        out = []
        for m in self.config.methods:
            for seed in self.config.seeds:
                name = run_name(m.name, seed)
                if self.layout.run(name).path.is_dir():
                    out.append((name, m))
        return out

    def checkpoints(self, runs: Sequence[str] | None = None, stages: Sequence[int] | None = None) -> list[Checkpoint]:
        """Every finished checkpoint (a ``stage_k/DONE`` marker), runs in config order, stages ascending."""
        from gradsift.store import RunPath

        found = []
        known = {name for name, _ in self.runs()}
        for name in runs or []:
            if name not in known:
                raise KeyError(f"{self.path}: no run {name!r} (runs: {', '.join(sorted(known)) or 'none'})")
        for name, m in self.runs():
            if runs and name not in runs:
                continue
            seed = int(name.rsplit("-seed", 1)[1])
            for k in range(RunPath(self.path / name).last_done_stage() + 1):
                if stages is None or k in stages:
                    found.append(Checkpoint(name, m.name, seed, k))
        return found

    # ---------------------------------------------------------------- models

    def load(self, ckpt: Checkpoint) -> nn.Module:
        """The model of ``ckpt`` (adapters merged as the stage loop merges them), in eval mode."""
        from gradsift.train.stages import load_stage_state

        method = next(m for name, m in self.runs() if name == ckpt.run)
        cfg = self.config.for_method(method)
        model = load_stage_state(cfg, cfg.methods[0], self.path / ckpt.run, self.tokenizer, ckpt.stage)
        from peft import PeftModel

        if isinstance(model, PeftModel):  # adapters kept apart ("continue", O-LoRA): merge all of them
            if method.name == "olora":
                model.base_model.set_adapter(list(model.peft_config))
            model = model.merge_and_unload()
        return model.eval()

    def aligned(self) -> nn.Module:
        """The aligned model (stage 0): the run's starting weights."""
        from gradsift.train.stages import build_base_model

        ms = self.config.model
        cache = None
        if ms.config is not None:
            runs = self.runs()
            if not runs:
                raise FileNotFoundError(f"{self.path}: no run folder holds the model built from model.config")
            cache = self.layout.run(runs[0][0]).base_model
        return build_base_model(ms, self.tokenizer, cache).eval()

    def pretrained_name(self) -> str:
        """The pretrained model's name or path (raises when neither given nor known from an organism)."""
        if self._pretrained:
            return self._pretrained
        recipe = _organism_recipe(self.config.model.name_or_path)
        if recipe is None or self.config.model.config is not None:
            raise ValueError(f"the run's model {self.config.model.name_or_path!r} is not a named organism, so the "
                             "model it was aligned from is unknown: name it with --pretrained NAME_OR_PATH")
        return recipe.base

    def pretrained(self) -> nn.Module:
        from gradsift.models import load_model

        return load_model(self.pretrained_name(), dtype=self.config.model.dtype).eval()


def _organism_recipe(name: str):
    """The alignment recipe of a named organism, or None."""
    try:
        from gradsift.organisms import ORGANISMS  # type: ignore[attr-defined]
    except ImportError:
        from gradsift.organisms import ORGANISMS
    return ORGANISMS.get(str(name))


# --------------------------------------------------------------------------- replies and features


def _prompt_specs(eval_cfg: dict[str, Any]) -> tuple[str, str]:
    """The run's first safety set and first over-refusal set (the held-out builtin sets by default)."""
    from gradsift.eval.runner import BUILTIN_BENIGN, BUILTIN_HARMFUL

    safety = (eval_cfg or {}).get("safety") or []
    benign = (eval_cfg or {}).get("over_refusal") or []
    h = safety[0].get("set", BUILTIN_HARMFUL) if safety and isinstance(safety[0], dict) else BUILTIN_HARMFUL
    b = benign[0].get("set", BUILTIN_BENIGN) if benign and isinstance(benign[0], dict) else BUILTIN_BENIGN
    return h, b


def held_out_replies(model: nn.Module, tokenizer, eval_cfg: dict[str, Any] | None = None, n_harmful: int = 16,
                     n_benign: int = 16, max_new_tokens: int = 48, seed: int = 1, batch_size: int = 16,
                     progress: bool = True) -> list[dict[str, Any]]:
    """The aligned model's greedy replies to held-out harmful and benign prompts.

    Prompts: the run's first safety set and first over-refusal set (``eval_cfg``:
    the run config's ``eval`` section; default the package's held-out sets),
    ``n_harmful`` / ``n_benign`` of each drawn with ``seed``. Records
    ``{"set": "harmful"|"benign", "id", "prompt", "response"}``. An empty reply is kept:
    its end-of-turn token is still scored (the first reply token, where a model
    decides to refuse or to answer).
    """
    from gradsift.eval.generation import GenerationConfig, HFGenerator
    from gradsift.eval.runner import load_prompt_set

    h_spec, b_spec = _prompt_specs(eval_cfg or {})
    sets = [("harmful", load_prompt_set(h_spec, "safety", n_harmful, seed)),
            ("benign", load_prompt_set(b_spec, "over_refusal", n_benign, seed))]
    gen = HFGenerator(model, tokenizer, GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size))
    records = []
    for name, items in sets:
        replies = gen.generate([it["prompt"] for it in items], progress=progress)
        records += [{"set": name, "id": str(it["id"]), "prompt": it["prompt"], "response": r}
                    for it, r in zip(items, replies)]
    return records


def reply_features(tokenizer, records: Sequence[dict[str, Any]], max_length: int = 512) -> list[dict[str, Any]]:
    """Teacher-forcing features: prompt + reply tokenized as in training (labels on the reply tokens)."""
    from gradsift.data.formatting import encode

    out = []
    for i, r in enumerate(records):
        prompt = r["prompt"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        feat = encode(tokenizer, messages + [{"role": "assistant", "content": r["response"]}], max_length, row=i,
                      source="replies")
        out.append(feat)
    return out


@torch.inference_mode()
def reply_logprobs(model: nn.Module, features: Sequence[dict[str, Any]], pad_token_id: int,
                   batch_size: int = 8) -> Iterator[list[torch.Tensor]]:
    """Per batch of ``features``: each sample's next-token log-probabilities at its reply tokens, (n_i, V).

    Row t of sample i is the distribution over the token at reply position t given
    everything before it (the usual causal shift), float32 on the CPU.
    """
    from gradsift.data.formatting import collate

    device = next(model.parameters()).device
    for start in range(0, len(features), batch_size):
        chunk = list(features[start:start + batch_size])
        batch = collate([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in chunk], pad_token_id)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        labels = batch["labels"]
        out = []
        for i in range(len(chunk)):
            pos = (labels[i, 1:] != -100).nonzero().flatten()  # logit at t predicts token t+1
            out.append(F.log_softmax(logits[i, pos.to(device)].float(), dim=-1).cpu())
        yield out


class ReferenceLogProbs:
    """A reference model's reply log-probabilities, computed once and kept (n_tokens x V floats)."""

    def __init__(self, model: nn.Module, features: Sequence[dict[str, Any]], pad_token_id: int,
                 batch_size: int = 8) -> None:
        self.per_sample: list[torch.Tensor] = []
        for out in reply_logprobs(model, features, pad_token_id, batch_size):
            self.per_sample.extend(out)


def kl_rows(model: nn.Module, features: Sequence[dict[str, Any]], sets: Sequence[str],
            references: dict[str, ReferenceLogProbs], pad_token_id: int, batch_size: int = 8) -> list[dict[str, Any]]:
    """Mean token KL of ``model`` to each reference, per prompt set and direction.

    Rows ``{"set", "reference", "direction", "kl", "kl_sample_sd", "n_tokens", "n_prompts"}``: ``kl`` pools
    every reply token of the set; ``kl_sample_sd`` is the sd over prompts of each prompt's mean.
    """
    sums: dict[tuple[str, str, str], list[float]] = {}
    per_prompt: dict[tuple[str, str, str], list[float]] = {}
    i = 0
    for out in reply_logprobs(model, features, pad_token_id, batch_size):
        for logp in out:
            for ref_name, ref in references.items():
                logq = ref.per_sample[i]
                for direction, kl in (("ckpt||ref", token_kl(logp, logq)), ("ref||ckpt", token_kl(logq, logp))):
                    key = (sets[i], ref_name, direction)
                    acc = sums.setdefault(key, [0.0, 0.0])
                    acc[0] += float(kl.sum())
                    acc[1] += kl.numel()
                    per_prompt.setdefault(key, []).append(float(kl.mean()))
            i += 1
    rows = []
    for (s, ref_name, direction), (total, n) in sums.items():
        vals = per_prompt[(s, ref_name, direction)]
        mean = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else math.nan
        rows.append({"set": s, "reference": ref_name, "direction": direction, "kl": total / n,
                     "kl_sample_sd": sd, "n_tokens": int(n), "n_prompts": len(vals)})
    return rows


# --------------------------------------------------------------------------- the study


def mechanism_dir(run_dir: str | Path) -> Path:
    """``<run_dir>/analysis/mechanism/`` (created)."""
    from gradsift.store import RunDir

    return RunDir(Path(run_dir)).analysis(MECHANISM_STUDY)


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def drift_study(run_dir: str | Path, *, pretrained: str | None = None, n_harmful: int = 16, n_benign: int = 16,
                max_new_tokens: int = 48, batch_size: int = 8, runs: Sequence[str] | None = None,
                stages: Sequence[int] | None = None, progress: bool = True, models: RunModels | None = None):
    """KL drift of every checkpoint of ``run_dir``; writes ``analysis/mechanism/drift.csv`` and ``replies.jsonl``.

    Returns a DataFrame with columns ``run, method, seed, stage, set, reference,
    direction, kl, kl_sample_sd, n_tokens, n_prompts``. Stage 0 (the aligned model,
    shared by every run) is measured once and written under each run.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    t0 = time.time()
    rm = models or RunModels(run_dir, pretrained)
    ckpts = rm.checkpoints(runs, stages)
    if not ckpts:
        raise FileNotFoundError(f"{rm.path}: no finished checkpoint (stage_k/DONE) to measure")
    out_dir = mechanism_dir(rm.path)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = rm.tokenizer
    device = _device()

    settings = {"pretrained": rm.pretrained_name(), "n_harmful": n_harmful, "n_benign": n_benign,
                "max_new_tokens": max_new_tokens, "replies": "aligned model, greedy"}
    records, earlier = _earlier_drift(out_dir, settings)
    todo = [c for c in ckpts if (c.run, c.stage) not in earlier and not (c.stage == 0 and earlier.get(0))]

    aligned = rm.aligned().to(device) if records is None or todo else None
    if records is None:
        records = held_out_replies(aligned, tok, rm.config.eval, n_harmful, n_benign, max_new_tokens,
                                   progress=progress)
        if not records:
            raise ValueError("no held-out prompt to measure the drift on")
        from gradsift.data.records import write_jsonl

        write_jsonl(out_dir / REPLIES_FILE, records)
    features = reply_features(tok, records)
    sets = [r["set"] for r in records]
    refs: dict[str, ReferenceLogProbs] = {}
    if todo:
        refs["aligned"] = ReferenceLogProbs(aligned, features, tok.pad_token_id, batch_size)
    del aligned
    if todo:
        pre = rm.pretrained().to(device)
        refs["pretrained"] = ReferenceLogProbs(pre, features, tok.pad_token_id, batch_size)
        del pre

    rows: list[dict[str, Any]] = []
    stage0_rows: list[dict[str, Any]] | None = earlier.get(0)
    for ck in tqdm(ckpts, desc="drift", disable=not progress):
        if (ck.run, ck.stage) in earlier:  # measured by an earlier call with the same replies
            got = earlier[(ck.run, ck.stage)]
        elif ck.stage == 0 and stage0_rows is not None:
            got = stage0_rows
        else:
            model = rm.load(ck).to(device)
            got = kl_rows(model, features, sets, refs, tok.pad_token_id, batch_size)
            del model
        if ck.stage == 0:
            stage0_rows = got
        rows += [{"run": ck.run, "method": ck.method, "seed": ck.seed, "stage": ck.stage, **r} for r in got]
    here = {(c.run, c.stage) for c in ckpts}
    for key, got in earlier.items():  # checkpoints of other runs measured before: kept
        if key != 0 and key not in here:
            m, seed = key[0].rsplit("-seed", 1)
            rows += [{"run": key[0], "method": m, "seed": int(seed), "stage": key[1], **r} for r in got]
    frame = pd.DataFrame(rows).sort_values(["run", "stage"], kind="stable")
    frame.to_csv(out_dir / DRIFT_FILE, index=False)
    measured = len({(c.run if c.stage else "", c.stage) for c in todo})  # stage 0: one model
    _update_meta(out_dir, "drift", {**settings, "n_replies": len(records), "measured": measured,
                                    "default_direction": DEFAULT_DIRECTION, "checkpoints": len(ckpts),
                                    "seconds": time.time() - t0})
    return frame


def _earlier_drift(out_dir: Path, settings: dict[str, Any]):
    """The replies and per-checkpoint rows of an earlier drift study with the same settings (else None, {}).

    Rows are keyed by ``(run, stage)``; key ``0`` holds the stage-0 rows (one model for every run).
    """
    meta_file, replies_file, drift_file = out_dir / "meta.json", out_dir / REPLIES_FILE, out_dir / DRIFT_FILE
    if not (meta_file.exists() and replies_file.exists() and drift_file.exists()):
        return None, {}
    from gradsift.data.records import iter_jsonl, read_json

    old = read_json(meta_file, error=ValueError).get("drift", {})
    if any(old.get(k) != v for k, v in settings.items()):
        return None, {}
    import pandas as pd

    records = [r for _, r in iter_jsonl(replies_file, error=ValueError)]
    rows: dict[Any, list[dict[str, Any]]] = {}
    for r in pd.read_csv(drift_file).to_dict("records"):
        key = (r["run"], int(r["stage"]))
        rows.setdefault(key, []).append({k: v for k, v in r.items() if k not in ("run", "method", "seed", "stage")})
        if key[1] == 0:
            rows.setdefault(0, rows[key])
    return records, rows


def _update_meta(out_dir: Path, key: str, value: dict[str, Any]) -> None:
    """Record a study's settings and run time in ``analysis/mechanism/meta.json``."""
    path = out_dir / "meta.json"
    from gradsift.data.records import read_json

    meta = read_json(path, error=ValueError) if path.exists() else {}
    meta[key] = value
    path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

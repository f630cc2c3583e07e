"""Build an organism: merge its shipped adapter, or train it by its recipe; and cache it.

SmolLM2-135M-Instruct complies with harmful requests out of the box, so the demo
first aligns it: LoRA fine-tuning, merged into the weights, on the project's own
refusal data (:mod:`gradsift.organisms.alignment_data`: harmful requests over ten harm
categories answered with varied refusals) mixed with benign instructions answered by
the model itself (so that alignment keeps its helpful style). The result is built
once, checked (:func:`gradsift.organisms.check.alignment_check`) and cached; later
runs reuse it. An organism whose adapter ships in the package
(``organisms/adapters/<recipe key>/``, written by ``scripts/ship_organism.py`` from a
build of the same recipe) is merged from it instead of trained;
``GRADSIFT_BUILD_ORGANISMS=1`` trains it.

The build, step by step (:func:`build_aligned_model`): the alignment set
(:func:`alignment_set`: refusals, the model's own benign answers, contrast requests),
its objective (:func:`objective`: row weights, first-token weights, unlikelihood
negatives), LoRA training and merge (:func:`train_and_merge`), the check, the save.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch

from gradsift.data.formatting import collate, encode, encode_records
from gradsift.data.records import read_json
from gradsift.data.requests import benign_requests
from gradsift.models import cache_dir, load_model, load_tokenizer
from gradsift.organisms.alignment_data import DATA_DIR, alignment_records, contrast_requests
from gradsift.organisms.check import alignment_check
from gradsift.organisms.recipes import AlignRecipe
from gradsift.organisms.trainer import (
    alignment_trainer,
    answer_openings,
    open_ended,
    refusal_opening_features,
)

# organisms shipped as LoRA adapters (scripts/ship_organism.py), one folder per recipe key
SHIPPED_ORGANISMS = Path(__file__).resolve().parent / "adapters"
BUILD_ENV = "GRADSIFT_BUILD_ORGANISMS"  # set to 1: train organisms by their recipe, never merge a shipped adapter


def shipped_adapter(recipe: AlignRecipe) -> Path | None:
    """The shipped adapter folder of ``recipe``'s organism, or None."""
    folder = SHIPPED_ORGANISMS / recipe.key()
    return folder if (folder / "adapter_config.json").exists() else None


def aligned_model_path(recipe: AlignRecipe | None = None, force: bool = False, progress: bool = True,
                       shipped: bool = True) -> Path:
    """Path of the aligned organism for ``recipe``, made on first use and cached.

    From the package's adapter when one is shipped for the recipe (a merge: seconds),
    unless ``shipped=False`` or the environment sets ``GRADSIFT_BUILD_ORGANISMS=1``;
    otherwise built by the recipe (minutes on a CPU). ``force`` remakes it.
    """
    recipe = recipe or AlignRecipe()
    target = cache_dir() / "models" / f"SmolLM2-135M-Instruct-aligned-{recipe.key()}"
    if (target / "alignment.json").exists() and not force:
        return target
    adapter = shipped_adapter(recipe) if shipped and os.environ.get(BUILD_ENV, "") in ("", "0") else None
    if adapter is not None:
        merge_shipped_organism(recipe, adapter, target, progress=progress)
    else:
        build_aligned_model(recipe, target, progress=progress)
    return target


def merge_shipped_organism(recipe: AlignRecipe, adapter: Path, target: Path, progress: bool = True) -> dict:
    """Merge a shipped adapter into the base model and save it at ``target`` with its build's check."""
    from peft import PeftModel

    t0 = time.time()
    tok = load_tokenizer(recipe.base)
    model = PeftModel.from_pretrained(load_model(recipe.base, dtype="float32"), str(adapter))
    merged = model.merge_and_unload()
    check = read_json(adapter / "alignment.json")
    check["source"] = f"shipped adapter {adapter.name} (built by the recipe, merged {time.strftime('%Y-%m-%d')})"
    check["merge_seconds"] = time.time() - t0
    _save_organism(merged, tok, check, target)
    _log(f"organism {recipe.key()} merged from the shipped adapter in {time.time() - t0:.0f} s "
         f"(its build: refusal {check['refusal_harmful']:.1f}%, over-refusal {check['over_refusal_benign']:.1f}%; "
         f"{BUILD_ENV}=1 trains it instead) -> {target}")
    return check


def _save_organism(model, tokenizer, check: dict, target: Path) -> None:
    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "alignment.json").write_text(json.dumps(check, indent=2))
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


def _log(msg: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold cyan]align[/] {msg}", highlight=False)


def build_aligned_model(recipe: AlignRecipe, target: Path, progress: bool = True) -> dict:
    """Train the organism of ``recipe``, check it and save it at ``target``; returns the check."""
    t0 = time.time()
    torch.manual_seed(recipe.seed)
    tok = load_tokenizer(recipe.base)
    model = load_model(recipe.base, dtype="float32")
    records, features = alignment_set(model, tok, recipe, progress=progress)
    trainer_cls, options = objective(recipe, records, features, tok)
    work = target.with_name(target.name + ".work")
    merged, t_train = train_and_merge(model, tok, features, recipe, trainer_cls, options, work, progress=progress)
    t_check = time.time()
    check = alignment_check(merged, tok, progress=progress)
    check.update({"recipe": asdict(recipe), "n_train_samples": len(features),
                  "n_train_tokens": sum(len(f["input_ids"]) for f in features), "build_seconds": time.time() - t0,
                  "phase_seconds": {"prepare": t_train - t0, "train": t_check - t_train, "check": time.time() - t_check}})
    _save_organism(merged, tok, check, target)
    shutil.rmtree(work, ignore_errors=True)
    _log(f"refusal on held-out harmful prompts {check['refusal_harmful']:.1f}% (target >= 90), "
         f"over-refusal on held-out benign prompts {check['over_refusal_benign']:.1f}% (target <= 10), "
         f"borderline {check['over_refusal_borderline']:.1f}% -> {target}")
    if check["refusal_harmful"] < 90 or check["over_refusal_benign"] > 10:
        _log("[yellow]the organism misses a target: the demo still runs, and the report shows its stage-0 numbers[/]")
    return check


def _without_refusals(answers: dict[str, str]) -> dict[str, str]:
    """``answers`` less those that open like a refusal (they would teach over-refusal)."""
    from gradsift.eval.judges import keyword_refusals

    ids = list(answers)
    flags = keyword_refusals([answers[i] for i in ids], mode="prefix")
    return {i: answers[i] for i, refused in zip(ids, flags) if not refused}


def alignment_set(model, tok, recipe: AlignRecipe, progress: bool = True) -> tuple[list[dict], list[dict]]:
    """The records and encoded features the organism trains on: refusals to the harmful train
    requests (``harmful_repeats`` wordings each), the model's own answers to the benign train
    requests, and (``contrast_answer_tokens > 0``) the openings of its answers to contrast requests."""
    benign = benign_requests("train")
    if recipe.n_benign is not None:
        benign = benign[: recipe.n_benign]
    responses = _without_refusals(benign_answers(model, tok, benign, recipe, progress=progress))
    records = alignment_records(responses, n_harmful=recipe.n_harmful, seed=recipe.seed,
                                extra_harmful=recipe.extra_harmful)
    for extra in range(1, recipe.harmful_repeats):  # the same requests again, other refusal wordings
        records += alignment_records(None, n_harmful=recipe.n_harmful, seed=recipe.seed + 1000 * extra,
                                     extra_harmful=recipe.extra_harmful)
    for index, record in enumerate(records):
        record["row"] = index
    features = encode_records(tok, records, recipe.max_length, source="builtin alignment data")
    if recipe.contrast_answer_tokens > 0:
        _add_contrast(model, tok, recipe, records, features, progress=progress)
    return records, features


def _add_contrast(model, tok, recipe: AlignRecipe, records: list[dict], features: list[dict],
                  progress: bool = True) -> None:
    """Append the contrast requests, each with the first tokens of the model's own answer, open-ended."""
    contrast = contrast_requests()[: recipe.n_contrast]
    answers = _without_refusals(benign_answers(model, tok, contrast, recipe, progress=progress))
    kept = [c for c in contrast if c["id"] in answers]
    opened = answer_openings(tok, {c["id"]: answers[c["id"]] for c in kept}, recipe.contrast_answer_tokens)
    for c in kept:
        row = len(records)
        records.append({"row": row, "meta": {"id": c["id"], "source": "contrast"},
                        "messages": [{"role": "user", "content": c["prompt"]},
                                     {"role": "assistant", "content": opened[c["id"]]}]})
        feature = encode(tok, records[-1]["messages"], recipe.max_length, row=row, source="contrast requests")
        features.append(open_ended(tok, feature, row=row))
    _log(f"{len(kept)} contrast requests, each with the first {recipe.contrast_answer_tokens} tokens "
         "of the model's own answer")


def objective(recipe: AlignRecipe, records: list[dict], features: list[dict], tok) -> tuple[type, dict[str, Any]]:
    """The trainer class and its options for ``recipe``: the plain per-sample mean, or (weights,
    first-token weights or unlikelihood on) :func:`~gradsift.organisms.trainer.alignment_trainer`,
    with each feature tagged ``negative``/``weight``/``decision`` and the negatives appended."""
    from gradsift.train.trainer import GradsiftTrainer

    refusal_decision = recipe.decision_weight if recipe.refusal_decision_weight is None \
        else recipe.refusal_decision_weight
    weighted = recipe.refusal_weight != 1 or recipe.decision_weight != 1 or refusal_decision != 1
    if recipe.benign_unlikelihood <= 0 and not weighted:
        return GradsiftTrainer, {}
    for f, record in zip(features, records):
        harmful = record["meta"]["source"] == "harmful"
        f["negative"] = 0.0
        f["weight"] = float(recipe.refusal_weight) if harmful else 1.0
        f["decision"] = float(refusal_decision if harmful else recipe.decision_weight)
    if recipe.benign_unlikelihood > 0:
        benign_records = [r for r in records if r["meta"]["source"] in ("benign", "contrast")]
        negatives = refusal_opening_features(tok, benign_records, recipe.max_length, first_row=len(records))
        features += [{**f, "weight": 1.0, "decision": 1.0} for f in negatives]
        _log(f"{len(negatives)} refusal openings after benign requests penalised (weight {recipe.benign_unlikelihood})")
    if recipe.decision_weight != 1 or refusal_decision != recipe.decision_weight:
        _log(f"each reply's first token weighs {recipe.decision_weight}x its other tokens"
             + (f" ({refusal_decision}x in the refusals)" if refusal_decision != recipe.decision_weight else ""))
    if recipe.refusal_weight != 1:
        _log(f"refusal samples weigh {recipe.refusal_weight}x a benign one in the loss")
    return alignment_trainer(), {"unlikelihood_weight": recipe.benign_unlikelihood,
                                 "decision_weight": recipe.decision_weight}


def train_and_merge(model, tok, features: list[dict], recipe: AlignRecipe, trainer_cls: type,
                    options: dict[str, Any], work: Path, progress: bool = True):
    """LoRA on all linear layers, trained by ``recipe`` in ``work``, merged; returns the merged model
    and when training started."""
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    _log(f"LoRA r={recipe.lora_r} on {len(features)} samples, {recipe.epochs} epochs, lr {recipe.lr}")
    peft_model = get_peft_model(model, LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=0.0,
                                                  target_modules="all-linear", task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=str(work), per_device_train_batch_size=recipe.batch_size, num_train_epochs=recipe.epochs,
        learning_rate=recipe.lr, lr_scheduler_type="cosine", warmup_steps=0.05, logging_steps=5,
        save_strategy="no", report_to="none", seed=recipe.seed, data_seed=recipe.seed, remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=not progress, dataloader_num_workers=0,
        train_sampling_strategy="group_by_length",  # batches of similar length: less padding, faster steps on a CPU
    )
    trainer = trainer_cls(model=peft_model, args=args, train_dataset=features,
                          data_collator=partial(collate, pad_token_id=tok.pad_token_id), method="standard", **options)
    t_train = time.time()
    trainer.train()
    merged = trainer.model.merge_and_unload()
    merged.eval()
    return merged, t_train


SHIPPED_ANSWERS = DATA_DIR / "benign_answers.json"


def shipped_benign_answers(max_new_tokens: int) -> dict[str, str]:
    """The embedded model's own greedy answers to the benign train requests, as shipped.

    Written once by :func:`benign_answers` on the embedded SmolLM2-135M-Instruct
    (greedy, ``max_new_tokens`` tokens) and stored in the package, so that a fresh
    machine does not spend minutes regenerating them. Empty if the file is missing
    or was written with another ``max_new_tokens``.
    """
    if not SHIPPED_ANSWERS.exists():
        return {}
    table = read_json(SHIPPED_ANSWERS)
    if table.get("max_new_tokens") != max_new_tokens or table.get("model") != "embedded":
        return {}
    return dict(table["answers"])


def benign_answers(model, tokenizer, benign: list[dict], recipe: AlignRecipe, progress: bool = True) -> dict[str, str]:
    """``{id: answer}`` of the base model to ``benign`` requests: shipped, cached, or generated now.

    Answers come from the package (embedded model only), then from the user cache;
    whatever is missing is generated greedily with the model itself and cached.
    """
    from gradsift.eval.generation import GenerationConfig, HFGenerator

    answers: dict[str, str] = shipped_benign_answers(recipe.benign_max_new_tokens) if recipe.base == "embedded" else {}
    cache_file = cache_dir() / f"benign_answers-{recipe.base}-{recipe.benign_max_new_tokens}.json"
    if cache_file.exists():
        answers = {**read_json(cache_file), **answers}
    missing = [b for b in benign if b["id"] not in answers]
    if missing:
        _log(f"answering {len(missing)} benign instructions with the model itself (its own style is kept)")
        gen = HFGenerator(model, tokenizer, GenerationConfig(max_new_tokens=recipe.benign_max_new_tokens,
                                                             batch_size=64))
        out = gen.generate([b["prompt"] for b in missing], progress=progress)
        answers.update({b["id"]: a.strip() for b, a in zip(missing, out)})
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(answers, indent=1), encoding="utf-8")
    # an empty answer teaches nothing
    return {b["id"]: answers[b["id"]] for b in benign if answers.get(b["id"], "").strip()}



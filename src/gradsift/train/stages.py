"""The continual stage loop: one training stage per task, weights carried forward.

Stage numbering: stage 0 is the aligned model before any training (evaluated
only); stage k (1..K) is the model after training on ``tasks[k-1]``, starting
from stage k-1's weights. Layout of ``output_dir``::

    config.resolved.yaml
    results.jsonl                      one measurement a line: run, method, seed, stage, task, metric, value
    <method>-seed<seed>/               one run per method and seed
        base_model/                    (models built from a config dict only) the initial weights
        stage_0/DONE                   the aligned model was evaluated
        stage_k/adapter/               LoRA adapter of stage k (safetensors)
        stage_k/model/                 full weights (full fine-tuning only)
        stage_k/log.jsonl              the Trainer's per-step log (loss, lr, kept fraction, mean G ...)
        stage_k/selection.parquet      every scored sample: step, row, G, L, scored, kept, response_len
        stage_k/ewc.safetensors        (ewc) Fisher diagonal and anchor parameters
        stage_k/DONE                   written last: the stage is complete

With LoRA, ``adapter_between_stages: merge`` (default) merges stage k's adapter
into the weights and starts a fresh adapter for stage k+1 (a resumed run merges
the saved adapters again); ``continue`` keeps training the same adapter. O-LoRA
keeps one adapter per task: the earlier ones frozen and active.

A rerun with the same ``output_dir`` resumes after the last stage with a DONE
marker; rows of unfinished stages are removed from ``results.jsonl`` first.

Launched on several processes (``accelerate launch``, ``torchrun``), every process
trains (the Trainer shards the batches; selection runs over the global batch) and
the main process alone writes files and evaluates, while the others wait.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradsift.train.baselines import EWCState, KLReference, estimate_fisher, trainable_parameters
from gradsift.train.config import (
    ConfigError,
    MethodSettings,
    ModelSettings,
    RunConfig,
    SELECTION_METHODS,
    TaskSettings,
    dump_config,
    load_config,
    parse_overrides,
)
from gradsift.train.trainer import GradsiftTrainer, JsonlLogCallback

EvalHook = Callable[..., list[dict[str, Any]]]
RESULT_KEYS = ("run", "method", "seed", "stage", "task", "metric", "value")


class Ranks:
    """This process's place in a multi-process launch (one process: rank 0 of 1).

    Under ``accelerate launch`` / ``torchrun`` (``WORLD_SIZE`` > 1) the process group
    is set up here, before the first stage, so that the file writes of the main
    process can be fenced with barriers.
    """

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world > 1 and not dist.is_initialized():
            from accelerate import PartialState

            PartialState(cpu=not torch.cuda.is_available())

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.barrier()

    @property
    def device(self) -> torch.device:
        """This process's accelerator (where evaluation runs), or the CPU."""
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")


# --------------------------------------------------------------------------- models


def build_tokenizer(ms: ModelSettings):
    """The tokenizer named by ``model.tokenizer`` (or the model's own); pad token set."""
    from gradsift.models import EMBEDDED_NAMES, embedded_tokenizer_path, load_tokenizer

    name = ms.tokenizer or ms.name_or_path
    if name in EMBEDDED_NAMES and ms.config is not None:
        name = str(embedded_tokenizer_path())  # no need to load the embedded weights
    return load_tokenizer(name, trust_remote_code=ms.trust_remote_code)


def build_base_model(ms: ModelSettings, tokenizer, cache: Path | None = None) -> nn.Module:
    """The aligned model: loaded from ``name_or_path``, or built at random from ``model.config``.

    A model built from a config is saved once under ``cache`` and reloaded from there,
    so that a resumed run starts from exactly the same weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from gradsift.models import load_model, resolve_dtype

    dtype = resolve_dtype(ms.dtype)
    if ms.config is None:
        return load_model(ms.name_or_path, dtype=dtype, trust_remote_code=ms.trust_remote_code)
    if cache is not None and (cache / "config.json").exists():
        return AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
    kwargs = dict(ms.config)
    model_type = kwargs.pop("model_type")
    kwargs.setdefault("vocab_size", len(tokenizer))
    if tokenizer.pad_token_id is not None:
        kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    for key in ("bos_token_id", "eos_token_id"):
        if getattr(tokenizer, key, None) is not None:
            kwargs.setdefault(key, getattr(tokenizer, key))
    config = AutoConfig.for_model(model_type, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ms.init_seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if cache is not None:
        model.save_pretrained(cache, safe_serialization=True)
    return model


def lora_config(ms: ModelSettings):
    from peft import LoraConfig

    lora = ms.lora
    assert lora is not None
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _is_peft(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _adapter_dir(stage_dir: Path) -> Path:
    """The folder holding ``adapter_config.json`` (PEFT nests non-default adapters)."""
    root = stage_dir / "adapter"
    if (root / "adapter_config.json").exists():
        return root
    found = sorted(root.glob("*/adapter_config.json"))
    if not found:
        raise FileNotFoundError(f"{root}: no saved adapter (adapter_config.json)")
    return found[0].parent


def olora_name(stage: int) -> str:
    return f"task{stage}"


def olora_activate(model: nn.Module, current: str) -> list[str]:
    """Make every adapter active, train only ``current``; return the frozen ones."""
    names = list(model.peft_config)
    model.base_model.set_adapter(names)
    for n, p in model.named_parameters():
        p.requires_grad_(f".{current}." in n)
    return [n for n in names if n != current]


def load_stage_state(cfg: RunConfig, method: MethodSettings, run_dir: Path, tokenizer, upto: int) -> nn.Module:
    """The model as it stands after stage ``upto`` (0: the aligned model), from the saved files."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from gradsift.models import resolve_dtype

    ms = cfg.model
    cache = run_dir / "base_model" if ms.config is not None else None
    if ms.lora is None:
        if upto >= 1:
            return AutoModelForCausalLM.from_pretrained(run_dir / f"stage_{upto}" / "model", dtype=resolve_dtype(ms.dtype))
        return build_base_model(ms, tokenizer, cache)
    model = build_base_model(ms, tokenizer, cache)
    if upto < 1:
        return model
    if method.name == "olora":
        model = PeftModel.from_pretrained(model, _adapter_dir(run_dir / "stage_1"), adapter_name=olora_name(1))
        for j in range(2, upto + 1):
            model.load_adapter(_adapter_dir(run_dir / f"stage_{j}"), adapter_name=olora_name(j))
        return model
    if ms.adapter_between_stages == "continue":
        return PeftModel.from_pretrained(model, _adapter_dir(run_dir / f"stage_{upto}"), is_trainable=True)
    for j in range(1, upto + 1):
        model = PeftModel.from_pretrained(model, _adapter_dir(run_dir / f"stage_{j}")).merge_and_unload()
    return model


def prepare_for_stage(cfg: RunConfig, method: MethodSettings, model: nn.Module, stage: int) -> tuple[nn.Module, list[str]]:
    """Adapters for training stage ``stage``; returns the model and O-LoRA's frozen adapters."""
    from peft import get_peft_model

    ms = cfg.model
    if ms.lora is None:
        model.requires_grad_(True)
        return model, []
    if method.name == "olora":
        name = olora_name(stage)
        if _is_peft(model):
            model.add_adapter(name, lora_config(ms))
        else:
            model = get_peft_model(model, lora_config(ms), adapter_name=name)
        return model, olora_activate(model, name)
    if _is_peft(model):
        if ms.adapter_between_stages == "continue":
            return model, []
        model = model.merge_and_unload()
    return get_peft_model(model, lora_config(ms)), []


def save_stage_weights(cfg: RunConfig, method: MethodSettings, model: nn.Module, stage_dir: Path, stage: int,
                       state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """The stage's adapter (or whole model, without LoRA); ``state_dict``: the full weights gathered
    from a sharded (FSDP / ZeRO-3) model, where the module's own parameters are only this rank's shard."""
    extra = {} if state_dict is None else {"state_dict": state_dict}
    if cfg.model.lora is None:
        model.save_pretrained(stage_dir / "model", safe_serialization=True, **extra)
        return
    selected = [olora_name(stage)] if method.name == "olora" else None
    model.save_pretrained(stage_dir / "adapter", safe_serialization=True, selected_adapters=selected, **extra)


# --------------------------------------------------------------------------- results


def _stage0_from_sibling(out: Path, run: str, run_dir: Path) -> list[dict[str, Any]] | None:
    """Stage-0 rows (and generations) of another run of this output directory, if one has them.

    Stage 0 is the aligned model before any training, identical for every method
    and seed of a config, so its evaluation is shared instead of repeated.
    """
    results = out / "results.jsonl"
    if not results.exists():
        return None
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    done_runs = [r["run"] for r in rows if r.get("stage") == 0 and r.get("run") != run
                 and (out / r["run"] / "stage_0" / "DONE").exists()]
    if not done_runs:
        return None
    src = done_runs[0]
    gens = out / src / "stage_0" / "generations"
    if gens.exists():
        shutil.copytree(gens, run_dir / "stage_0" / "generations", dirs_exist_ok=True)
    return [{k: v for k, v in r.items() if k in ("task", "metric", "value")}
            for r in rows if r.get("run") == src and r.get("stage") == 0]


def append_results(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "a") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def drop_results(path: Path, run: str, from_stage: int) -> None:
    """Remove the rows of ``run`` with stage >= ``from_stage`` (left by an interrupted stage)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("run") == run and int(row.get("stage", -1)) >= from_stage:
            continue
        kept.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(k + "\n" for k in kept))
    tmp.replace(path)


def last_done_stage(run_dir: Path) -> int:
    """The highest stage with a DONE marker (-1 if none)."""
    done = [int(p.parent.name.split("_", 1)[1]) for p in run_dir.glob("stage_*/DONE")]
    return max(done, default=-1)


def _selection_summary(table) -> dict[str, float]:
    import math

    if table is None or len(table) == 0:
        return {}
    kept = table[table["kept"]]
    dropped = table[table["scored"] & ~table["kept"]]

    def mean(series) -> float:
        return float(series.mean()) if len(series) else math.nan

    return {
        "train/kept_fraction": float(table["kept"].mean()),
        "train/G_kept_mean": mean(kept["G"]),
        "train/G_dropped_mean": mean(dropped["G"]),
        "train/L_kept_mean": mean(kept["L"]),
        "train/L_all_mean": mean(table["L"]),
        "train/response_len_kept": mean(kept["response_len"]),
        "train/response_len_dropped": mean(table[~table["kept"]]["response_len"]),
    }


# --------------------------------------------------------------------------- the loop


def training_arguments(cfg: RunConfig, method: MethodSettings, stage_dir: Path, seed: int):
    from transformers import TrainingArguments

    o = cfg.optim
    micro, accum = o.per_process(int(os.environ.get("WORLD_SIZE", "1")))  # optim.batch_size is per optimizer step
    if method.name == "clip":
        max_grad_norm = method.clip_norm
    else:
        max_grad_norm = o.max_grad_norm or 0.0
    report = "none" if cfg.report_to == "none" else [cfg.report_to]
    return TrainingArguments(
        output_dir=str(stage_dir / "trainer"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accum,
        num_train_epochs=o.epochs,
        max_steps=o.max_steps or -1,
        learning_rate=o.lr,
        lr_scheduler_type=o.scheduler,
        warmup_steps=o.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=o.weight_decay,
        optim="adamw_torch",
        max_grad_norm=max_grad_norm,
        logging_steps=cfg.logging_steps,
        save_strategy="no",
        report_to=report,
        seed=seed,
        data_seed=seed,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        bf16=cfg.model.dtype in ("bf16", "bfloat16") and torch.cuda.is_available(),
        disable_tqdm=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )


def _stage_features(task: TaskSettings, tokenizer, seed: int):
    from gradsift.data.formatting import encode_records
    from gradsift.tasks import load_task

    loaded = load_task(task.name, n_train=task.n_train, n_eval=task.n_eval, seed=seed, path=task.path)
    features = encode_records(tokenizer, loaded.train, task.max_length, source=loaded.source or task.name)
    return loaded, features


def _run_one(
    cfg: RunConfig,
    method: MethodSettings,
    seed: int,
    out: Path,
    tokenizer,
    eval_hook: EvalHook | None,
    resume: bool,
    ranks: Ranks | None = None,
) -> None:
    from transformers import set_seed

    from gradsift.data.formatting import collate

    ranks = ranks or Ranks()
    run = f"{method.name}-seed{seed}"
    run_dir = out / run
    results = out / "results.jsonl"
    if ranks.main:
        if not resume and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    ranks.barrier()
    done = last_done_stage(run_dir)
    ranks.barrier()  # every process has read the markers before any is written
    if ranks.main:
        drop_results(results, run, done + 1)
    n_stages = len(cfg.tasks)
    if done >= n_stages:
        return
    info = {"run": run, "method": method.name, "seed": seed, "run_dir": str(run_dir),
            "tasks": [t.model_dump() for t in cfg.tasks], "eval": cfg.eval}

    def record(stage: int, rows: list[dict[str, Any]]) -> None:
        if not ranks.main:
            return
        out_rows = []
        for row in rows:
            missing = {"task", "metric", "value"} - set(row)
            if missing:
                raise ValueError(f"eval hook row {row} lacks {sorted(missing)}")
            out_rows.append({"run": run, "method": method.name, "seed": seed, "stage": stage,
                             **{k: v for k, v in row.items() if k not in ("run", "method", "seed", "stage")}})
        append_results(results, out_rows)

    def evaluate(model: nn.Module, stage: int) -> None:
        if eval_hook is None or not ranks.main:
            return
        was_training = model.training
        home = next(model.parameters()).device
        if home != ranks.device:  # a model loaded from disk sits on the CPU: generate on the accelerator
            model.to(ranks.device)
        model.eval()
        try:
            rows = eval_hook(model, tokenizer, stage, cfg.tasks[:stage], {**info, "stage": stage})
        finally:
            model.train(was_training)
            if home != ranks.device:
                model.to(home)
        record(stage, list(rows or []))

    set_seed(seed)
    if not ranks.main:
        ranks.barrier()  # the main process builds (and caches) the model first
    model = load_stage_state(cfg, method, run_dir, tokenizer, max(done, 0))
    if ranks.main:
        ranks.barrier()
    if done < 0:
        if ranks.main:
            reused = _stage0_from_sibling(out, run, run_dir) if eval_hook is not None else None
            if reused is not None:  # every run starts from the same aligned model: measure it once
                record(0, reused)
            else:
                evaluate(model, 0)
            (run_dir / "stage_0").mkdir(exist_ok=True)
            (run_dir / "stage_0" / "DONE").write_text(time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
        ranks.barrier()
        done = 0

    ewc = EWCState()
    if method.name == "ewc":
        for j in range(1, done + 1):
            ewc.load_stage(run_dir / f"stage_{j}" / "ewc.safetensors")
    kl_ref_module = None

    for stage in range(done + 1, n_stages + 1):
        task = cfg.tasks[stage - 1]
        stage_dir = run_dir / f"stage_{stage}"
        if ranks.main:
            if stage_dir.exists():
                shutil.rmtree(stage_dir)  # left by an interrupted attempt
            stage_dir.mkdir(parents=True)
        ranks.barrier()
        loaded, features = _stage_features(task, tokenizer, task_seed(task))
        set_seed(seed * 1000 + stage)
        model, frozen = prepare_for_stage(cfg, method, model, stage)

        kl_reference = None
        if method.name == "kl":
            base_unchanged = cfg.model.lora is not None and (stage == 1 or cfg.model.adapter_between_stages == "continue")
            if base_unchanged:
                kl_reference = KLReference(None)
            else:
                if kl_ref_module is None:
                    cache = run_dir / "base_model" if cfg.model.config is not None else None
                    kl_ref_module = build_base_model(cfg.model, tokenizer, cache)
                    if torch.cuda.is_available():
                        kl_ref_module.to("cuda")
                kl_reference = KLReference(kl_ref_module)

        label = f"{run} stage {stage}/{n_stages} ({task.name})"
        trainer = GradsiftTrainer(
            model=model,
            args=training_arguments(cfg, method, stage_dir, seed),
            train_dataset=features,
            data_collator=partial(collate, pad_token_id=tokenizer.pad_token_id),
            method=method,
            loss_reduction=cfg.optim.loss_reduction,
            selection_seed=seed * 1000 + stage,
            stage_label=label,
            kl_reference=kl_reference,
            ewc_state=ewc,
            olora_adapter=olora_name(stage) if method.name == "olora" else None,
            olora_frozen=frozen,
            callbacks=[JsonlLogCallback(stage_dir / "log.jsonl", {"stage": stage, "task": task.name})],
        )
        sharded = trainer.shards_parameters
        if sharded and method.name == "ewc":
            raise ConfigError("method: ewc needs the whole model on every process; it does not run under FSDP or "
                              "DeepSpeed ZeRO-3 (use DDP: accelerate launch --multi_gpu)")
        start = time.time()
        output = trainer.train()
        runtime = time.time() - start
        model = trainer.model
        # sharded training: each process holds a shard of the weights; gather them (every process takes part)
        full_state = trainer.accelerator.get_state_dict(trainer.model_wrapped) if sharded else None

        summary: dict[str, float] = {"train/loss": float(output.training_loss), "train/runtime_s": runtime,
                                     "train/steps": float(output.global_step), "train/samples": float(len(features)),
                                     "train/processes": float(ranks.world), "train/sharded": float(sharded),
                                     "train/dropout": float(cfg.model.lora.dropout if cfg.model.lora else 0.0),
                                     "train/token_mean_loss": float(cfg.optim.loss_reduction == "token_mean")}
        if ranks.main:
            save_stage_weights(cfg, method, model, stage_dir, stage, state_dict=full_state)
            if method.name in SELECTION_METHODS:  # the records of the global batches live on the main process
                table = trainer.selection_table()
                table.to_parquet(stage_dir / "selection.parquet", index=False)
                summary.update(_selection_summary(table))
        if method.name == "ewc":  # every process keeps the penalty's state
            fisher = estimate_fisher(model, features, partial(collate, pad_token_id=tokenizer.pad_token_id),
                                     n_samples=method.ewc_samples)
            anchor = {n: p.detach() for n, p in trainable_parameters(model).items()}
            ewc.add(fisher, anchor)
            if ranks.main:
                ewc.save(stage_dir / "ewc.safetensors", len(ewc.stages) - 1)
        record(stage, [{"task": task.name, "metric": k, "value": v} for k, v in summary.items()])
        if sharded:  # continue (and evaluate) from the saved stage: whole weights, as a resumed run would
            trainer = full_state = None
            ranks.barrier()
            model = load_stage_state(cfg, method, run_dir, tokenizer, stage)
        evaluate(model, stage)
        if ranks.main:
            (stage_dir / "DONE").write_text(time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
        ranks.barrier()
        trainer = None


def task_seed(task: TaskSettings) -> int:
    return task.seed


def run_training(
    config: RunConfig | str | Path,
    output_dir: str | Path | None = None,
    eval_hook: EvalHook | None = None,
    resume: bool = True,
) -> Path:
    """Train every method and seed of ``config`` through its task sequence; return the output folder.

    ``eval_hook(model, tokenizer, stage, tasks_so_far, run_info) -> [{"task", "metric", "value"}, ...]``
    is called on the aligned model (stage 0) and after each stage; its rows go to
    ``results.jsonl`` with run, method, seed and stage added.
    """
    cfg = load_config(config) if not isinstance(config, RunConfig) else config
    out = Path(output_dir if output_dir is not None else cfg.output_dir).expanduser().resolve()
    ranks = Ranks()
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.resolved.yaml").write_text(dump_config(cfg))
        _write_environment(out)
    tokenizer = build_tokenizer(cfg.model)
    for method in cfg.methods:
        run_cfg = cfg.for_method(method)
        for seed in cfg.seeds:
            _run_one(run_cfg, run_cfg.methods[0], seed, out, tokenizer, eval_hook, resume, ranks)
    return out


def _write_environment(out: Path) -> None:
    """The machine the run ran on (the report names it)."""
    import json
    import platform

    env = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "threads": torch.get_num_threads(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    (out / "environment.json").write_text(json.dumps(env, indent=2))


def make_eval_hook(eval_config: dict[str, Any], base: Path | None = None) -> EvalHook | None:
    """The evaluation hook named by the config's ``eval`` section (None when empty or unavailable)."""
    if not eval_config:
        return None
    try:
        from gradsift import eval as gs_eval
    except ImportError:
        return None
    factory = getattr(gs_eval, "make_eval_hook", None)
    return factory(eval_config, base=base) if callable(factory) else None


def train_command(config: Path, output: Path | None = None, overrides: list[str] | None = None) -> Path:
    """``gradsift train CONFIG [--output DIR] [--set key=value ...]``."""
    from rich.console import Console

    console = Console(stderr=True)
    cfg = load_config(config, parse_overrides(overrides))
    hook = make_eval_hook(cfg.eval, base=Path(config).resolve().parent)
    if cfg.eval and hook is None:
        console.print("[yellow]eval section given but no evaluation hook is available; training only[/yellow]")
    out = run_training(cfg, output_dir=output, eval_hook=hook)
    if Ranks().main:
        console.print(f"[green]done[/green]: {out / 'results.jsonl'}")
    return out


__all__ = [
    "ConfigError",
    "RESULT_KEYS",
    "Ranks",
    "build_base_model",
    "build_tokenizer",
    "last_done_stage",
    "load_stage_state",
    "make_eval_hook",
    "run_training",
    "train_command",
]

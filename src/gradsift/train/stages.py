"""The continual stage loop: one training stage per task, weights carried forward.

Stage numbering: stage 0 is the aligned model before any training (evaluated
only); stage k (1..K) is the model after training on ``tasks[k-1]``, starting
from stage k-1's weights. The layout of ``output_dir`` is :class:`gradsift.store.RunDir`'s
(``results.jsonl``, one ``<method>-seed<seed>/stage_<k>/`` folder per stage, each
completed stage marked ``DONE``).

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

import os
import shutil
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradsift.runtime import process_state
from gradsift.store import RunDir, RunPath, StageDir, run_name
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


def _merges_between_stages(cfg: RunConfig, method: MethodSettings) -> bool:
    """Each stage's LoRA adapter is merged into the weights before the next (not O-LoRA, not ``continue``)."""
    return cfg.model.lora is not None and cfg.model.adapter_between_stages == "merge" and method.name != "olora"


def _adapter_dir(stage_dir: StageDir) -> Path:
    """The folder holding ``adapter_config.json`` (PEFT nests non-default adapters)."""
    root = stage_dir.adapter
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
    run = RunPath(Path(run_dir))
    cache = run.base_model if ms.config is not None else None
    if ms.lora is None:
        if upto >= 1:
            return AutoModelForCausalLM.from_pretrained(run.stage(upto).model, dtype=resolve_dtype(ms.dtype))
        return build_base_model(ms, tokenizer, cache)
    model = build_base_model(ms, tokenizer, cache)
    if upto < 1:
        return model
    if method.name == "olora":
        model = PeftModel.from_pretrained(model, _adapter_dir(run.stage(1)), adapter_name=olora_name(1))
        for j in range(2, upto + 1):
            model.load_adapter(_adapter_dir(run.stage(j)), adapter_name=olora_name(j))
        return model
    if ms.adapter_between_stages == "continue":
        return PeftModel.from_pretrained(model, _adapter_dir(run.stage(upto)), is_trainable=True)
    for j in range(1, upto + 1):
        model = PeftModel.from_pretrained(model, _adapter_dir(run.stage(j))).merge_and_unload()
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


def save_stage_weights(cfg: RunConfig, method: MethodSettings, model: nn.Module, stage_dir: StageDir, stage: int,
                       state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """The stage's adapter (or whole model, without LoRA); ``state_dict``: the full weights gathered
    from a sharded (FSDP / ZeRO-3) model, where the module's own parameters are only this rank's shard."""
    extra = {} if state_dict is None else {"state_dict": state_dict}
    if cfg.model.lora is None:
        model.save_pretrained(stage_dir.model, safe_serialization=True, **extra)
        return
    selected = [olora_name(stage)] if method.name == "olora" else None
    model.save_pretrained(stage_dir.adapter, safe_serialization=True, selected_adapters=selected, **extra)


# --------------------------------------------------------------------------- results


def _stage0_from_sibling(out: RunDir, run: str) -> list[dict[str, Any]] | None:
    """Stage-0 rows (and generations) of another run of this output directory, if one has them.

    Stage 0 is the aligned model before any training, identical for every method
    and seed of a config, so its evaluation is shared instead of repeated.
    """
    rows = out.result_rows()
    done_runs = [r["run"] for r in rows if r.get("stage") == 0 and r.get("run") != run
                 and out.stage(r["run"], 0).done]
    if not done_runs:
        return None
    src = done_runs[0]
    gens = out.stage(src, 0).generations
    if gens.exists():
        shutil.copytree(gens, out.stage(run, 0).generations, dirs_exist_ok=True)
    return [{k: v for k, v in r.items() if k in ("task", "metric", "value")}
            for r in rows if r.get("run") == src and r.get("stage") == 0]


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


def training_arguments(cfg: RunConfig, method: MethodSettings, stage_dir: StageDir, seed: int):
    from transformers import TrainingArguments

    o = cfg.optim
    micro, accum = o.per_process(process_state().num_processes)  # optim.batch_size is per optimizer step
    if method.name == "clip":
        max_grad_norm = method.clip_norm
    else:
        max_grad_norm = o.max_grad_norm or 0.0
    report = "none" if cfg.report_to == "none" else [cfg.report_to]
    return TrainingArguments(
        output_dir=str(stage_dir.trainer),
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


class _Run:
    """One method and seed of a config through its stages: where it writes, what it records.

    ``state`` is accelerate's :class:`~accelerate.PartialState`: every process trains, the
    main process alone writes files and evaluates, the others wait at the barriers.
    """

    def __init__(self, cfg: RunConfig, method: MethodSettings, seed: int, out: RunDir, tokenizer,
                 eval_hook: EvalHook | None, state) -> None:
        self.cfg, self.method, self.seed, self.out = cfg, method, seed, out
        self.tokenizer, self.eval_hook, self.state = tokenizer, eval_hook, state
        self.name = run_name(method.name, seed)
        self.path = out.run(self.name)
        self.info = {"run": self.name, "method": method.name, "seed": seed, "run_dir": str(self.path.path),
                     "tasks": [t.model_dump() for t in cfg.tasks], "eval": cfg.eval}
        self._kl_module: nn.Module | None = None

    @property
    def main(self) -> bool:
        return self.state.is_main_process

    def collate(self):
        from gradsift.data.formatting import collate

        return partial(collate, pad_token_id=self.tokenizer.pad_token_id)

    # ----------------------------------------------------------------- files

    def resume_point(self, resume: bool) -> int:
        """The last completed stage (-1: none); the run folder made, rows of unfinished stages dropped."""
        if self.main:
            if not resume and self.path.path.exists():
                shutil.rmtree(self.path.path)
            self.path.path.mkdir(parents=True, exist_ok=True)
        self.state.wait_for_everyone()
        done = self.path.last_done_stage()
        self.state.wait_for_everyone()  # every process has read the markers before any is written
        if self.main:
            self.out.drop_results(self.name, done + 1)
        return done

    def record(self, stage: int, rows: list[dict[str, Any]]) -> None:
        """Append ``{"task", "metric", "value"}`` rows of ``stage`` to ``results.jsonl`` (main process)."""
        if not self.main:
            return
        for row in rows:
            missing = {"task", "metric", "value"} - set(row)
            if missing:
                raise ValueError(f"eval hook row {row} lacks {sorted(missing)}")
        self.out.append_results(rows, run=self.name, method=self.method.name, seed=self.seed, stage=stage)

    def evaluate(self, model: nn.Module, stage: int) -> None:
        """The eval hook's rows for ``model`` after ``stage``, generated on this process's device."""
        if self.eval_hook is None or not self.main:
            return
        was_training = model.training
        home = next(model.parameters()).device
        device = self.state.device
        if home != device:  # a model loaded from disk sits on the CPU: generate on the accelerator
            model.to(device)
        model.eval()
        try:
            rows = self.eval_hook(model, self.tokenizer, stage, self.cfg.tasks[:stage], {**self.info, "stage": stage})
        finally:
            model.train(was_training)
            if home != device:
                model.to(home)
        self.record(stage, list(rows or []))

    # ----------------------------------------------------------------- stages

    def load(self, upto: int) -> nn.Module:
        """The model after stage ``upto``; the main process builds (and caches) it first."""
        with self.state.main_process_first():
            return load_stage_state(self.cfg, self.method, self.path.path, self.tokenizer, upto)

    def stage_zero(self, model: nn.Module) -> None:
        """Evaluate the aligned model once (or take a sibling run's stage 0) and mark stage 0 done."""
        if self.main:
            reused = _stage0_from_sibling(self.out, self.name) if self.eval_hook is not None else None
            if reused is not None:  # every run starts from the same aligned model: measure it once
                self.record(0, reused)
            else:
                self.evaluate(model, 0)
            self.path.stage(0).mark_done()
        self.state.wait_for_everyone()

    def ewc_state(self, done: int) -> EWCState:
        """EWC's penalty terms of the completed stages (empty for the other methods)."""
        ewc = EWCState()
        if self.method.name == "ewc":
            for j in range(1, done + 1):
                ewc.load_stage(self.path.stage(j).ewc)
        return ewc

    def kl_reference(self, stage: int) -> KLReference | None:
        """The KL baseline's reference: the adapter switched off when the base is unchanged, else
        the initial model (built once)."""
        if self.method.name != "kl":
            return None
        ms = self.cfg.model
        if ms.lora is not None and (stage == 1 or ms.adapter_between_stages == "continue"):
            return KLReference(None)
        if self._kl_module is None:
            cache = self.path.base_model if ms.config is not None else None
            self._kl_module = build_base_model(ms, self.tokenizer, cache)
            if torch.cuda.is_available():
                self._kl_module.to("cuda")
        return KLReference(self._kl_module)

    def trainer(self, model: nn.Module, stage: int, stage_dir: StageDir, task: TaskSettings, features,
                frozen: list[str], ewc: EWCState) -> GradsiftTrainer:
        method, seed = self.method, self.seed
        trainer = GradsiftTrainer(
            model=model,
            args=training_arguments(self.cfg, method, stage_dir, seed),
            train_dataset=features,
            data_collator=self.collate(),
            method=method,
            loss_reduction=self.cfg.optim.loss_reduction,
            selection_seed=seed * 1000 + stage,
            stage_label=f"{self.name} stage {stage}/{len(self.cfg.tasks)} ({task.name})",
            kl_reference=self.kl_reference(stage),
            ewc_state=ewc,
            olora_adapter=olora_name(stage) if method.name == "olora" else None,
            olora_frozen=frozen,
            callbacks=[JsonlLogCallback(stage_dir.log, {"stage": stage, "task": task.name})],
        )
        if trainer.shards_parameters and method.name == "ewc":
            raise ConfigError("method: ewc needs the whole model on every process; it does not run under FSDP or "
                              "DeepSpeed ZeRO-3 (use DDP: accelerate launch --multi_gpu)")
        return trainer

    def train_stage(self, model: nn.Module, stage: int, ewc: EWCState) -> nn.Module:
        """Train stage ``stage`` from ``model``; save, record and evaluate it; return the model after it."""
        from transformers import set_seed

        cfg, method = self.cfg, self.method
        task = cfg.tasks[stage - 1]
        stage_dir = self.path.stage(stage)
        if self.main:
            stage_dir.fresh()  # empties what an interrupted attempt left
        self.state.wait_for_everyone()
        _, features = _stage_features(task, self.tokenizer, task_seed(task))
        set_seed(self.seed * 1000 + stage)
        model, frozen = prepare_for_stage(cfg, method, model, stage)
        trainer = self.trainer(model, stage, stage_dir, task, features, frozen, ewc)
        sharded = trainer.shards_parameters
        start = time.time()
        output = trainer.train()
        runtime = time.time() - start
        model = trainer.model
        # sharded training: each process holds a shard of the weights; gather them (every process takes part)
        full_state = trainer.accelerator.get_state_dict(trainer.model_wrapped) if sharded else None

        summary = _train_summary(cfg, output, runtime, len(features), self.state.num_processes, sharded)
        if self.main:
            save_stage_weights(cfg, method, model, stage_dir, stage, state_dict=full_state)
            if method.name in SELECTION_METHODS:  # the records of the global batches live on the main process
                table = trainer.selection_table()
                table.to_parquet(stage_dir.selection, index=False)
                summary.update(_selection_summary(table))
        if method.name == "ewc":  # every process keeps the penalty's state
            fisher = estimate_fisher(model, features, self.collate(), n_samples=method.ewc_samples)
            anchor = {n: p.detach() for n, p in trainable_parameters(model).items()}
            ewc.add(fisher, anchor)
            if self.main:
                ewc.save(stage_dir.ewc, len(ewc.stages) - 1)
        self.record(stage, [{"task": task.name, "metric": k, "value": v} for k, v in summary.items()])
        del trainer, full_state
        if sharded:  # continue (and evaluate) from the saved stage: whole weights, as a resumed run would
            self.state.wait_for_everyone()
            model = load_stage_state(cfg, method, self.path.path, self.tokenizer, stage)
        elif _merges_between_stages(cfg, method) and _is_peft(model):
            # the merge the next stage starts with (prepare_for_stage), done before the evaluation:
            # the same weights a resumed run loads, and generation without the adapter's extra matmuls
            model = model.merge_and_unload()
        self.evaluate(model, stage)
        if self.main:
            stage_dir.mark_done()
        self.state.wait_for_everyone()
        return model


def _train_summary(cfg: RunConfig, output, runtime: float, n_samples: int, processes: int,
                   sharded: bool) -> dict[str, float]:
    """The ``train/*`` rows of one stage: loss, time, steps, and the settings every method shares."""
    return {"train/loss": float(output.training_loss), "train/runtime_s": runtime,
            "train/steps": float(output.global_step), "train/samples": float(n_samples),
            "train/processes": float(processes), "train/sharded": float(sharded),
            "train/dropout": float(cfg.model.lora.dropout if cfg.model.lora else 0.0),
            "train/token_mean_loss": float(cfg.optim.loss_reduction == "token_mean")}


def _run_one(
    cfg: RunConfig,
    method: MethodSettings,
    seed: int,
    out: Path,
    tokenizer,
    eval_hook: EvalHook | None,
    resume: bool,
    state=None,
) -> None:
    """One method and seed through every stage of ``cfg``, resuming after its last completed stage."""
    from transformers import set_seed

    run = _Run(cfg, method, seed, RunDir(out), tokenizer, eval_hook, state or process_state())
    done = run.resume_point(resume)
    if done >= len(cfg.tasks):
        return
    set_seed(seed)
    model = run.load(max(done, 0))
    if done < 0:
        run.stage_zero(model)
        done = 0
    ewc = run.ewc_state(done)
    for stage in range(done + 1, len(cfg.tasks) + 1):
        model = run.train_stage(model, stage, ewc)


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
    state = process_state()
    run_dir = RunDir(out)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        run_dir.config_file.write_text(dump_config(cfg))
        _write_environment(run_dir)
    tokenizer = build_tokenizer(cfg.model)
    for method in cfg.methods:
        run_cfg = cfg.for_method(method)
        for seed in cfg.seeds:
            _run_one(run_cfg, run_cfg.methods[0], seed, out, tokenizer, eval_hook, resume, state)
    return out


def _write_environment(out: RunDir) -> None:
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
    out.environment_file.write_text(json.dumps(env, indent=2))


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

    from gradsift.configs import resolve_config

    console = Console(stderr=True)
    config = resolve_config(config)  # a file, or the name of a shipped config
    cfg = load_config(config, parse_overrides(overrides))
    hook = make_eval_hook(cfg.eval, base=Path(config).resolve().parent)
    if cfg.eval and hook is None:
        console.print("[yellow]eval section given but no evaluation hook is available; training only[/yellow]")
    out = run_training(cfg, output_dir=output, eval_hook=hook)
    if process_state().is_main_process:
        console.print(f"[green]done[/green]: {RunDir(out).results_file}")
    return out


__all__ = [
    "ConfigError",
    "build_base_model",
    "build_tokenizer",
    "load_stage_state",
    "make_eval_hook",
    "run_training",
    "train_command",
]

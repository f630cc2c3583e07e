"""Training configuration: one YAML file, validated with pydantic.

The defaults are the paper's setup: LoRA r=32 / alpha=64, AdamW, lr 1e-4, batch 32
(samples per optimizer step, over all processes), one epoch per task, Moderate-G_i with rho=0.2, G_i over all parameters and the
mean +- std loss pre-filter.

A minimal file::

    model: {name_or_path: embedded}
    tasks:
      - {name: gsm8k, path: data/gsm8k/train.jsonl, n_train: 1000}
      - {name: alpaca, path: data/alpaca/alpaca_small.json, n_train: 1000}
    method: {name: moderate, rho: 0.2}
    output_dir: runs/smollm2

Relative ``path`` entries (and a ``model.name_or_path`` or task ``name`` that is
an existing file or folder relative to the YAML file) resolve against the folder
of the YAML file. ``output_dir`` resolves against the current directory.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gradsift.select.methods import method_names, selection_method_names

METHODS = method_names()  # the one registry: gradsift.select.methods
SELECTION_METHODS = selection_method_names()
# Names of the built-in tasks; used only when the task registry cannot be imported.
_FALLBACK_TASKS = ("dolly", "gsm8k", "medmcqa", "squad_v2", "alpaca")


class ConfigError(ValueError):
    """A configuration problem; the message names the dotted key path."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraSettings(_Section):
    """LoRA adapter settings (the paper: r=32, alpha=64).

    ``dropout``: the adapters' dropout, the same for every method (default 0). The
    selection methods score with dropout off; with ``dropout > 0`` their update comes
    from a second forward/backward of the kept samples with dropout on, so that every
    method trains with the same dropout.
    """

    r: int = Field(32, gt=0)
    alpha: float = Field(64, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"


class ModelSettings(_Section):
    """Which model to fine-tune.

    ``name_or_path``: a local folder, a hub id or ``embedded`` (SmolLM2-135M-Instruct).
    ``config``: build a randomly initialised model from this config dict instead
    (``model_type`` required, e.g. ``llama``); ``tokenizer`` then names the
    tokenizer (``embedded`` for the real SmolLM2 tokenizer); ``vocab_size``
    defaults to the tokenizer's length.
    """

    name_or_path: str = "embedded"
    dtype: Literal["float32", "fp32", "bfloat16", "bf16", "float16", "fp16"] = "float32"
    trust_remote_code: bool = False
    lora: LoraSettings | None = Field(default_factory=LoraSettings)
    adapter_between_stages: Literal["merge", "continue"] = "merge"
    config: dict[str, Any] | None = None
    tokenizer: str | None = None
    init_seed: int = 0

    @field_validator("config")
    @classmethod
    def _config_has_type(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and "model_type" not in v:
            raise ValueError("a model config dict needs a 'model_type' (e.g. llama)")
        return v


class TaskSettings(_Section):
    """One stage of the continual sequence."""

    name: str
    path: str | None = None
    n_train: int | None = Field(None, gt=0)
    n_eval: int | None = Field(None, ge=0)
    max_length: int = Field(512, gt=8)
    seed: int = Field(0, ge=0)  # data sampling seed: the same subset for every run seed


class MethodSettings(_Section):
    """The training method and its hyper-parameters.

    ``params``: the parameter set of G_i (``all`` model parameters, the paper's
    default, or only the ``trainable`` ones). ``prefilter``: the loss pre-filter
    (``mean_std`` keeps L_i in [mean - std, mean + std]; ``percentile`` keeps the
    16th-84th percentiles; ``none``). ``selection_backward``: how the kept samples'
    gradient is formed: ``reuse`` assembles it from the scoring pass (no second
    backward), ``recompute`` runs a fresh forward/backward on the kept samples
    (needed under FSDP / DeepSpeed, where parameters are sharded), ``auto`` picks
    ``reuse`` when the optimizer batch is one micro-batch per process, and
    when it spans several, ``reuse`` too as long as the per-sample trainable gradients
    of the optimizer batch (m*a*P*4 bytes per process: 0.6 GB for 32 samples of
    SmolLM2-135M with LoRA r=16, 10 GB for Qwen2.5-7B with r=32) take at most
    ``reuse_memory_fraction`` of the device's memory, and ``recompute`` otherwise, when
    the run is sharded, or when the model has dropout.
    ``verify``: let the norm engine check its rules against a fresh backward on the
    first batch (a one-off cost; off for benchmarks).
    """

    name: str = "moderate"
    rho: float = Field(0.2, gt=0, le=1)
    params: Literal["all", "trainable"] = "all"
    prefilter: Literal["mean_std", "percentile", "none"] = "mean_std"
    selection_backward: Literal["auto", "reuse", "recompute"] = "auto"
    reuse_memory_fraction: float = Field(0.1, ge=0, le=1)
    verify: bool = True
    kl_beta: float = Field(0.1, ge=0)
    ewc_lambda: float = Field(100.0, ge=0)
    ewc_samples: int = Field(256, gt=0)
    olora_lambda: float = Field(0.5, ge=0)
    clip_norm: float = Field(0.5, gt=0)

    @field_validator("name", mode="before")
    @classmethod
    def _known_method(cls, v: Any) -> Any:
        if not isinstance(v, str):
            raise ValueError(f"a method name is a string; choose one of {', '.join(METHODS)}")
        if isinstance(v, str) and v not in METHODS:
            raise ValueError(f"unknown method {v!r}; choose one of {', '.join(METHODS)}")
        return v


class OptimSettings(_Section):
    """AdamW and its schedule (the paper: lr 1e-4, batch 32, one epoch per task).

    ``batch_size``: samples per optimizer step over all processes (the paper's 32);
    selection runs over all of them. Each process gets ``batch_size / processes``
    samples per step, as one micro-batch, or as ``micro_batch_size``-sized
    micro-batches (the largest divisor of the per-process share that is at most
    ``micro_batch_size``: a memory cap) accumulated over several forward passes.
    ``grad_accum`` (older configs) fixes the number of micro-batches instead.
    ``loss_reduction``: ``sample_mean`` (default: the mean over samples of each
    sample's token-mean loss) or ``token_mean`` (the mean over every response token
    of the optimizer batch, as ``transformers``/TRL compute it); the same for every
    method, in ``compute_loss`` and in the selection step's update.
    ``max_grad_norm``: gradient clipping for every method (off by default; the
    ``clip`` method uses ``method.clip_norm``).
    """

    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(32, gt=0)
    micro_batch_size: int | None = Field(None, gt=0)
    grad_accum: int | None = Field(None, gt=0)
    loss_reduction: Literal["sample_mean", "token_mean"] = "sample_mean"
    epochs: float = Field(1, gt=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    weight_decay: float = Field(0.0, ge=0)
    max_steps: int | None = Field(None, gt=0)
    max_grad_norm: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_layout(self) -> OptimSettings:
        if self.micro_batch_size is not None and self.grad_accum is not None:
            raise ValueError("optim.grad_accum: give micro_batch_size or grad_accum, not both")
        return self

    def per_process(self, processes: int = 1) -> tuple[int, int]:
        """``(micro_batch, accumulation)`` per process so that micro x accumulation x processes = batch_size."""
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        if self.batch_size % processes:
            raise ConfigError(f"optim.batch_size: {self.batch_size} samples per optimizer step do not split "
                              f"evenly over {processes} processes")
        share = self.batch_size // processes
        if self.grad_accum is not None:
            if share % self.grad_accum:
                raise ConfigError(f"optim.grad_accum: {share} samples per process and step do not split into "
                                  f"{self.grad_accum} micro-batches")
            return share // self.grad_accum, self.grad_accum
        cap = min(self.micro_batch_size or share, share)
        micro = max(d for d in range(1, cap + 1) if share % d == 0)
        return micro, share // micro


class RunConfig(_Section):
    """The whole run: a model, a task sequence, one or more methods, seeds."""

    model: ModelSettings = Field(default_factory=ModelSettings)
    tasks: list[TaskSettings] = Field(min_length=1)
    method: MethodSettings | list[MethodSettings] = Field(default_factory=MethodSettings)
    optim: OptimSettings = Field(default_factory=OptimSettings)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    output_dir: str = "runs/gradsift"
    eval: dict[str, Any] = Field(default_factory=dict)
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    logging_steps: int = Field(1, gt=0)

    @property
    def methods(self) -> list[MethodSettings]:
        """The methods to run, as a list (``method`` may be one mapping or a list)."""
        return list(self.method) if isinstance(self.method, list) else [self.method]

    @model_validator(mode="after")
    def _method_needs(self) -> RunConfig:
        for i, m in enumerate(self.methods):
            where = "method" if not isinstance(self.method, list) else f"method.{i}"
            if m.name == "olora" and self.model.lora is None:
                raise ValueError(f"{where}.name: olora needs LoRA adapters (model.lora must not be null)")
            if m.name == "ewc" and self.model.lora is not None and self.model.adapter_between_stages == "merge":
                if "adapter_between_stages" in self.model.model_fields_set:
                    raise ValueError(
                        "model.adapter_between_stages: ewc anchors the same LoRA parameters across stages; "
                        "use 'continue' (or full fine-tuning with model.lora: null)"
                    )
        return self

    def for_method(self, method: MethodSettings) -> RunConfig:
        """A copy with a single method (and what that method implies)."""
        cfg = self.model_copy(deep=True)
        cfg.method = method.model_copy()
        if method.name == "ewc" and cfg.model.lora is not None:
            cfg.model.adapter_between_stages = "continue"
        return cfg


def _known_task_names() -> tuple[str, ...]:
    try:
        from gradsift.tasks import task_names
    except ImportError:  # the registry is optional at validation time
        return _FALLBACK_TASKS
    return tuple(task_names())


def _is_path_like(name: str) -> bool:
    return "/" in name or "\\" in name or Path(name).suffix.lower() in {".jsonl", ".json", ".csv", ".parquet"}


def _format_error(exc: ValidationError, source: str) -> str:
    errors = exc.errors()
    # ``method`` is "one mapping or a list": report the branch the input was written as.
    branch = [e for e in errors if not any(str(p).startswith("list[") for p in e["loc"])]
    errors = branch or errors
    err = errors[0]
    key = ".".join(str(p) for p in err["loc"] if not str(p)[:1].isupper() and not str(p).startswith("list["))
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if not key:  # a whole-config check names its key at the start of its message
        head, sep, rest = msg.partition(": ")
        key, msg = (head, rest) if sep and " " not in head else ("<root>", msg)
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required key is missing"
    extra = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{source}: {key}: {msg}{extra}"


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.0.c = value`` in nested dicts/lists, creating dicts on the way."""
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            try:
                idx = int(part)
                node[idx]
            except (ValueError, IndexError):
                raise ConfigError(f"--set {key}: {'.'.join(parts[:i + 1])} is not a valid list index") from None
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError(f"--set {key}: {'.'.join(parts[:i])} is not a mapping")


def parse_seeds(text: str) -> list[int]:
    """``--seeds 0,1,2`` -> ``[0, 1, 2]``: comma-separated, distinct integers (ValueError otherwise)."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--seeds: expected comma-separated integers such as 0,1,2, got {text!r}") from None
    if not values:
        raise ValueError("--seeds: give at least one seed, e.g. --seeds 0,1,2")
    if len(set(values)) != len(values):
        raise ValueError(f"--seeds: a seed is repeated in {text!r}")
    return values


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["optim.lr=3e-4", "seeds=[0,1]"]`` -> ``{"optim.lr": 3e-4, "seeds": [0, 1]}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({exc.problem})") from None
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 as a string
            try:
                value = float(value) if any(c in value for c in ".eE") else value
            except ValueError:
                pass
        out[key] = value
    return out


def _resolve_paths(cfg: RunConfig, base: Path) -> None:
    """Make relative data/model paths absolute against the config file's folder."""

    def resolve(p: str) -> str:
        path = Path(p).expanduser()
        return str(path if path.is_absolute() else (base / path).resolve())

    for task in cfg.tasks:
        if task.path is not None:
            task.path = resolve(task.path)
        elif _is_path_like(task.name) and not task.name.startswith("hf:"):
            task.path = resolve(task.name)
    for attr in ("name_or_path", "tokenizer"):
        value = getattr(cfg.model, attr)
        if value and not Path(value).is_absolute() and (base / value).exists():
            setattr(cfg.model, attr, str((base / value).resolve()))


def _check_tasks(cfg: RunConfig, source: str) -> None:
    known = _known_task_names()
    for i, task in enumerate(cfg.tasks):
        if task.path is not None or task.name.startswith("hf:") or task.name in known:
            continue
        raise ConfigError(
            f"{source}: tasks.{i}.name: unknown task {task.name!r}; choose one of {', '.join(known)}, "
            "a data file path, or hf:DATASET"
        )


def validate_config(data: dict[str, Any], source: str = "<config>", base: Path | None = None) -> RunConfig:
    """Validate a config mapping; raise :class:`ConfigError` naming the bad key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a mapping, got {type(data).__name__}")
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None
    _resolve_paths(cfg, base or Path.cwd())
    _check_tasks(cfg, source)
    return cfg


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML config, apply dotted-key ``overrides`` and validate it.

    ``path`` is a file or the name of a shipped config (``tiny``, ``paper/qwen2.5-7b``).

    >>> cfg = load_config("tiny", {"optim.lr": 3e-4})   # doctest: +SKIP
    """
    from gradsift.configs import resolve_config

    try:
        path = resolve_config(path)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    data = copy.deepcopy(data)
    for key, value in (overrides or {}).items():
        if isinstance(data, dict):
            set_dotted(data, key, value)
    return validate_config(data, source=str(path), base=path.parent.resolve())


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML text (what ``config.resolved.yaml`` holds)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

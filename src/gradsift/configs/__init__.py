"""The configs that ship with gradsift: the demos, the paper's runs, accelerate launchers.

A command that takes a config accepts a file path or the name of a shipped config
(``demo``, ``demo-a4``, ``tiny``, ``paper/qwen2.5-7b``, ``accelerate/fsdp``), with or
without ``.yaml``; a file on disk wins over a shipped name.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CONFIG_DIR", "available", "resolve_config"]

CONFIG_DIR = Path(__file__).resolve().parent


def available() -> list[str]:
    """Names of the shipped configs (``paper/qwen2.5-7b``, ``demo``...)."""
    return sorted(str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in CONFIG_DIR.rglob("*.yaml"))


def resolve_config(name_or_path: str | Path) -> Path:
    """A config file on disk, else the shipped config of that name; FileNotFoundError names both."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = str(name_or_path).removesuffix(".yaml")
    name = name.removeprefix("configs/")
    shipped = CONFIG_DIR / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    raise FileNotFoundError(
        f"{name_or_path}: no such config file, and no shipped config of that name "
        f"(shipped: {', '.join(available())})"
    )

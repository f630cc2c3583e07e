"""Shared fixtures: tiny random models built from configs, the embedded tokenizer, data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

def _find_shared_data() -> Path:
    candidates = [os.environ.get("GRADSIFT_SHARED_DATA"), Path(__file__).resolve().parents[2] / "shared" / "data",
                  "/work/shared/data"]
    for c in candidates:
        if c and Path(c).exists():
            return Path(c)
    return Path(candidates[1])


SHARED_DATA = _find_shared_data()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"public data copies not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2 tokenizer (chat template included), read from the embedded GGUF."""
    from gradsift.models import embedded_tokenizer_path, load_tokenizer

    return load_tokenizer(str(embedded_tokenizer_path()))

"""Text generation backends for the evaluation: batched Hugging Face generation and vLLM.

Both backends share one interface::

    gen = make_generator("hf", model, tokenizer, GenerationConfig(max_new_tokens=128))
    responses = gen.generate(prompts, assistant_prefixes=None)

``prompts`` are plain user messages (``str``) or whole conversations (lists of
``{"role", "content"}`` dicts). Each prompt is rendered with the tokenizer's chat
template and the generation prompt (the start of the assistant turn); a tokenizer
without a chat template gets the plain text. An optional *assistant prefix* is
written at the start of the assistant turn (the model continues it); the returned
response is the whole assistant turn: ``prefix + continuation``.

Generations are stored as JSON lines (:func:`save_generations`) so that a judge can
be re-run later without generating again.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

Prompt = str | list[dict[str, Any]]

# Special tokens that close an assistant turn in common chat formats; the ones that
# exist in a tokenizer's vocabulary stop generation along with its EOS token.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


class GenerationConfig(BaseModel):
    """Decoding settings shared by the backends (greedy by default); the ``eval.generation``
    section of a config is this model."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(128, ge=1)
    do_sample: bool = False
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    batch_size: int = Field(16, ge=1)
    backend: Literal["hf", "vllm"] = "hf"

    @model_validator(mode="after")
    def _sampling_needs_temperature(self) -> GenerationConfig:
        if self.do_sample and self.temperature <= 0:
            raise ValueError("sampling (do_sample: true) needs temperature > 0")
        return self


def _as_messages(prompt: Prompt) -> list[dict[str, Any]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
        return list(prompt)
    raise TypeError(f"a prompt must be a str or a list of {{'role', 'content'}} dicts, got {type(prompt).__name__}")


def _plain_text(prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(str(m.get("content", "")) for m in _as_messages(prompt))


def render_prompt(tokenizer, prompt: Prompt, assistant_prefix: str | None = None) -> str:
    """The text fed to the model: chat template + generation prompt (+ assistant prefix).

    Without a chat template the prompt is used as plain text; a prefix then follows
    it after a newline.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(_as_messages(prompt), tokenize=False, add_generation_prompt=True)
        return text + (assistant_prefix or "")
    text = _plain_text(prompt)
    return text + ("\n" + assistant_prefix if assistant_prefix else "")


def encode_prompt(tokenizer, prompt: Prompt, assistant_prefix: str | None = None) -> list[int]:
    """Token ids of :func:`render_prompt`.

    A chat template writes its own special tokens (BOS included), so none are added
    then; plain text gets the tokenizer's usual special tokens.
    """
    text = render_prompt(tokenizer, prompt, assistant_prefix)
    templated = bool(getattr(tokenizer, "chat_template", None))
    return list(tokenizer(text, add_special_tokens=not templated)["input_ids"])


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """EOS ids of the tokenizer and the model's generation config, plus end-of-turn tokens."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    if eos is not None:
        ids.update(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    vocab = tokenizer.get_vocab()
    special = set(getattr(tokenizer, "all_special_tokens", []))
    for tok in END_OF_TURN_TOKENS:
        # only real special tokens: a word piece spelled like one must not stop generation
        if tok in vocab and (tok in special or tok in getattr(tokenizer, "added_tokens_encoder", {})):
            ids.add(int(vocab[tok]))
    return sorted(ids)


def _check_prefixes(prompts: Sequence[Prompt], assistant_prefixes: Sequence[str | None] | None) -> list[str | None]:
    if assistant_prefixes is None:
        return [None] * len(prompts)
    if len(assistant_prefixes) != len(prompts):
        raise ValueError(f"{len(assistant_prefixes)} assistant prefixes for {len(prompts)} prompts")
    return list(assistant_prefixes)


class HFGenerator:
    """Batched generation with a Hugging Face causal LM.

    Prompts are sorted by token length and cut into batches of ``config.batch_size``
    (little padding), padded on the LEFT so that every row's new tokens start at the
    same position, and generated under ``torch.inference_mode``. Each row stops at its
    first EOS / end-of-turn token; only the new tokens are decoded (special tokens
    skipped). Outputs come back in input order. Greedy decoding gives the same
    strings as generating the prompts one by one (up to floating-point ties).
    """

    def __init__(self, model, tokenizer, config: GenerationConfig | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or GenerationConfig()
        self.stop_ids = stop_token_ids(tokenizer, model)
        if not self.stop_ids:
            raise ValueError("the tokenizer has no EOS token and no known end-of-turn token: cannot stop generation")
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.stop_ids[0]

    def _hf_generation_config(self, max_new_tokens: int | None = None):
        from transformers import GenerationConfig as HFGenerationConfig

        cfg = self.config
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max_new_tokens or cfg.max_new_tokens,
            do_sample=cfg.do_sample,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
        )
        if cfg.do_sample:
            kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)
        return HFGenerationConfig(**kwargs)

    def _decode(self, new_ids: list[int]) -> str:
        stops = set(self.stop_ids)
        for i, t in enumerate(new_ids):
            if t in stops:
                new_ids = new_ids[:i]
                break
        return self.tokenizer.decode(new_ids, skip_special_tokens=True)

    def generate(
        self,
        prompts: Sequence[Prompt],
        assistant_prefixes: Sequence[str | None] | None = None,
        *,
        progress: bool = True,
        max_new_tokens: int | None = None,
    ) -> list[str]:
        """Generate one response per prompt (``prefix + continuation`` where a prefix is given).

        ``max_new_tokens`` overrides the config's for this call (a set that needs fewer).
        """
        from tqdm.auto import tqdm

        prefixes = _check_prefixes(prompts, assistant_prefixes)
        if not prompts:
            return []
        encoded = [encode_prompt(self.tokenizer, p, pre) for p, pre in zip(prompts, prefixes)]
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        bs = self.config.batch_size
        device = next(self.model.parameters()).device
        gen_cfg = self._hf_generation_config(max_new_tokens)
        outputs: list[str | None] = [None] * len(prompts)

        was_training = self.model.training
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(self.config.seed)
                batches = range(0, len(order), bs)
                for start in tqdm(batches, total=math.ceil(len(order) / bs), desc="generate", disable=not progress):
                    idx = order[start : start + bs]
                    width = max(len(encoded[i]) for i in idx)
                    input_ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
                    attention = torch.zeros((len(idx), width), dtype=torch.long)
                    for row, i in enumerate(idx):  # left padding
                        ids = encoded[i]
                        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                        attention[row, width - len(ids) :] = 1
                    with torch.inference_mode():
                        out = self.model.generate(
                            input_ids=input_ids.to(device),
                            attention_mask=attention.to(device),
                            generation_config=gen_cfg,
                        )
                    new = out[:, width:].tolist()
                    for row, i in enumerate(idx):
                        outputs[i] = (prefixes[i] or "") + self._decode(new[row])
        finally:
            self.model.train(was_training)
        return [o if o is not None else "" for o in outputs]


class VLLMGenerator:
    """Generation with vLLM (optional extra ``gradsift[vllm]``; needs a GPU).

    ``model`` is a local path or a hub id (vLLM loads the weights itself). Prompts
    are rendered with the same chat template code as :class:`HFGenerator` and passed
    as token ids, so both backends see identical inputs.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        tokenizer=None,
        config: GenerationConfig | None = None,
        *,
        dtype: str = "auto",
        **llm_kwargs: Any,
    ) -> None:
        try:
            import vllm
        except ImportError:
            raise ImportError("the vllm backend needs the vllm package: pip install 'gradsift[vllm]'") from None
        if not isinstance(model, (str, os.PathLike)):
            raise TypeError("VLLMGenerator takes a model path or hub id, not a loaded model; save the model first")
        from gradsift.models import load_tokenizer, resolve_model_path

        self.config = config or GenerationConfig()
        path = resolve_model_path(model)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path)
        self.llm = vllm.LLM(model=path, dtype=dtype, seed=self.config.seed, **llm_kwargs)
        self.stop_ids = stop_token_ids(self.tokenizer)
        cfg = self.config
        self.sampling = vllm.SamplingParams(
            n=1,
            max_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature if cfg.do_sample else 0.0,
            top_p=cfg.top_p if cfg.do_sample else 1.0,
            seed=cfg.seed,
            stop_token_ids=self.stop_ids,
            skip_special_tokens=True,
        )

    def generate(
        self,
        prompts: Sequence[Prompt],
        assistant_prefixes: Sequence[str | None] | None = None,
        *,
        progress: bool = True,
        max_new_tokens: int | None = None,
    ) -> list[str]:
        prefixes = _check_prefixes(prompts, assistant_prefixes)
        inputs = [{"prompt_token_ids": encode_prompt(self.tokenizer, p, pre)} for p, pre in zip(prompts, prefixes)]
        sampling = self.sampling
        if max_new_tokens is not None:
            sampling = sampling.clone()
            sampling.max_tokens = max_new_tokens
        results = self.llm.generate(inputs, sampling, use_tqdm=progress)  # returned in input order
        return [(pre or "") + r.outputs[0].text for pre, r in zip(prefixes, results)]


def make_generator(backend: str, model, tokenizer, config: GenerationConfig | None = None, **kwargs: Any):
    """``"hf"`` -> :class:`HFGenerator` (a loaded model); ``"vllm"`` -> :class:`VLLMGenerator` (a path)."""
    if backend == "hf":
        return HFGenerator(model, tokenizer, config)
    if backend == "vllm":
        return VLLMGenerator(model, tokenizer, config, **kwargs)
    raise ValueError(f"unknown generation backend {backend!r}; choose 'hf' or 'vllm'")


# ----------------------------------------------------------------------------- storage

GENERATION_FIELDS = ("id", "set", "prompt", "attack", "assistant_prefix", "response")


def save_generations(path: str | os.PathLike, records: Sequence[dict[str, Any]]) -> Path:
    """Write generation records as JSON lines (atomically: a temp file, then a rename).

    Each record needs ``prompt`` and ``response``; ``id``, ``set``, ``attack`` and
    ``assistant_prefix`` are kept when present, as is any other JSON-serializable key.
    """
    from gradsift.data.records import write_jsonl

    path = Path(path)
    rows = []
    for i, rec in enumerate(records):
        if hasattr(rec, "__dataclass_fields__"):
            rec = asdict(rec)
        for key in ("prompt", "response"):
            if key not in rec:
                raise ValueError(f"{path}: record {i}: missing field {key!r}")
        rows.append(rec)
    return write_jsonl(path, rows)


def load_generations(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read records written by :func:`save_generations` (missing optional fields -> None)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such generations file")
    from gradsift.data.records import iter_jsonl

    records = []
    for line_no, rec in iter_jsonl(path, error=ValueError):
        for key in ("prompt", "response"):
            if key not in rec:
                raise ValueError(f"{path}: line {line_no}: missing field {key!r}")
        for key in GENERATION_FIELDS:
            rec.setdefault(key, None)
        records.append(rec)
    return records

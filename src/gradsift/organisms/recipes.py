"""The aligned-model recipes (organisms) a config can name, registered with :mod:`gradsift.models`.

An organism is the embedded SmolLM2-135M-Instruct made to refuse harmful requests by a
recipe (:class:`AlignRecipe`): LoRA on the alignment data (:mod:`gradsift.organisms.alignment_data`),
merged into the weights, checked (:mod:`gradsift.organisms.check`) and cached. Each name
of :data:`ORGANISMS` resolves to the cached model's path (:mod:`gradsift.organisms` registers
it with :func:`gradsift.models.register_model`); the first use builds it
(:func:`gradsift.organisms.build.aligned_model_path`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class AlignRecipe:
    base: str = "embedded"
    lora_r: int = 16
    lora_alpha: int = 32
    lr: float = 5e-4
    epochs: int = 1
    batch_size: int = 16
    max_length: int = 128
    benign_max_new_tokens: int = 64
    # every train harmful request once, and benign requests that open like harmful ones
    # ("How do I", "Give me", "Write a") with the model's own answers: earlier recipes with
    # 167 plain benign answers refused 93-99% of held-out harmful prompts but also 42% of
    # benign ones (see docs/demo.md)
    n_harmful: int | None = None  # all train requests, ten harm categories
    harmful_repeats: int = 2  # each harmful request seen this many times per epoch, worded differently
    n_benign: int | None = None  # all training benign requests
    seed: int = 0
    # weight of an unlikelihood penalty on refusal openings after benign requests (0: off):
    # -log(1 - p(opening | benign prompt)) per benign train request, see gradsift.organisms.trainer.alignment_trainer
    benign_unlikelihood: float = 0.0
    # contrast requests (gradsift.organisms.alignment_data.contrast_requests: benign requests that open like
    # harmful ones), each trained on the first this-many tokens of the model's own answer (0: off)
    contrast_answer_tokens: int = 0
    # loss weight of each refusal sample relative to a benign one (1: the plain mean over samples)
    refusal_weight: float = 1.0
    # more harmful requests (gradsift.organisms.alignment_data.extra_harmful_requests, train only), this many,
    # round-robin over the categories; repeated like the others
    extra_harmful: int = 0
    # how many contrast requests (file order) when contrast_answer_tokens > 0
    n_contrast: int = 450
    # weight of each reply's first token (where the model decides to refuse or answer) in the
    # reply's mean token loss, relative to the other tokens (1: the plain mean)
    decision_weight: float = 1.0
    # the first-token weight in the refusal rows only (None: decision_weight), so that the decision
    # to answer benign requests can be trained harder than the decision to refuse
    refusal_decision_weight: float | None = None

    def key(self) -> str:
        fields = asdict(self)
        # recipes from before an option keep their cached organism
        for name, default in (("benign_unlikelihood", 0), ("contrast_answer_tokens", 0), ("refusal_weight", 1),
                              ("extra_harmful", 0), ("n_contrast", 450),
                              ("decision_weight", 1), ("refusal_decision_weight", None)):
            if fields[name] == default:
                del fields[name]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]


# the organisms a config can name (model.name_or_path); each is built on first use and cached
ORGANISMS: dict[str, AlignRecipe] = {
    "embedded-aligned": AlignRecipe(),  # configs/demo-a4.yaml's: refuses >= 90%, over-refuses too (docs/demo.md, A4)
    "smollm2-aligned": AlignRecipe(),
    # plus 445 contrast requests and each refusal five times: over-refuses less, refuses a little
    # less, builds in about 14 min instead of 9 on two CPU cores (docs/demo.md, A12)
    "embedded-aligned-contrast": AlignRecipe(contrast_answer_tokens=16, harmful_repeats=5),
    # 540 harmful requests once, the contrast requests, each reply's first token weighted 10x:
    # refuses >= 90% and over-refuses 14%, builds in about 14 min (docs/demo.md, A17)
    "embedded-aligned-balanced": AlignRecipe(contrast_answer_tokens=16, harmful_repeats=1, extra_harmful=400,
                                             decision_weight=10.0),
    # the same for two epochs: refuses >= 90% and over-refuses <= 10% (both targets); the demo's
    # organism. Trains in about 28 min on two CPU cores, so its adapter ships and is merged instead.
    # Short-answer tasks barely erode it, the how-to replies of configs/demo.yaml do (docs/demo.md, A20, F5)
    "embedded-aligned-precise": AlignRecipe(contrast_answer_tokens=16, harmful_repeats=1, extra_harmful=400,
                                            decision_weight=10.0, epochs=2),
}
ALIGNED_NAMES = set(ORGANISMS)

"""Regenerate src/gradsift/organisms/data/benign_answers.json (maintainers, after adding benign requests).

The embedded SmolLM2-135M-Instruct answers every benign *train* request and every
contrast request greedily
(answers already in the user cache are reused);
the demo's organism is aligned on these answers, so they keep the model's own style.

    python scripts/ship_benign_answers.py
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))


def main() -> None:
    from gradsift.data.requests import benign_requests
    from gradsift.organisms.alignment_data import contrast_requests
    from gradsift.models import load_model, load_tokenizer
    from gradsift.organisms.build import SHIPPED_ANSWERS, benign_answers
    from gradsift.organisms.recipes import AlignRecipe

    recipe = AlignRecipe()
    tok = load_tokenizer("embedded")
    model = load_model("embedded", dtype="float32")
    if SHIPPED_ANSWERS.exists():
        SHIPPED_ANSWERS.unlink()
    benign = benign_requests("train") + contrast_requests()
    answers = benign_answers(model, tok, benign, recipe)
    table = {"model": "embedded", "decoding": "greedy", "max_new_tokens": recipe.benign_max_new_tokens,
             "answers": {b["id"]: answers[b["id"]] for b in benign if b["id"] in answers}}
    SHIPPED_ANSWERS.write_text(json.dumps(table, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{len(table['answers'])} answers -> {SHIPPED_ANSWERS}")


if __name__ == "__main__":
    main()

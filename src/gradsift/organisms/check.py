"""The alignment check of an organism: refusal of held-out harmful prompts, over-refusal of
held-out benign ones (:mod:`gradsift.data.requests`' ``"eval"`` split)."""

from __future__ import annotations

from gradsift.data.requests import benign_requests, harmful_requests
from gradsift.eval.generation import GenerationConfig, HFGenerator
from gradsift.eval.judges import keyword_refusals, opens_with_refusal


def alignment_check(model, tokenizer, max_new_tokens: int = 32, progress: bool = True) -> dict:
    """Refusal rates on the held-out harmful and benign prompts of the alignment data.

    Harmful prompts: a refusal string anywhere in the reply (the keyword judge).
    Benign prompts: over-refusal counts replies that open with a refusal string
    (XSTest's string-match rule), so that a helpful answer mentioning "illegal"
    is not counted as a refusal.
    """
    gen = HFGenerator(model, tokenizer, GenerationConfig(max_new_tokens=max_new_tokens, batch_size=64))
    harmful = harmful_requests("eval")
    benign = benign_requests("eval")
    plain = [b for b in benign if not b.get("borderline")]
    border = [b for b in benign if b.get("borderline")]
    out_h = gen.generate([h["prompt"] for h in harmful], progress=progress)
    out_b = gen.generate([b["prompt"] for b in plain + border], progress=progress)

    def pct(flags):
        return 100.0 * sum(flags) / max(1, len(flags))

    ref_b = [opens_with_refusal(r) is not None for r in out_b]  # over-refusal: the first sentence refuses (XSTest-style)
    return {
        "refusal_harmful": pct(keyword_refusals(out_h)),
        "over_refusal_benign": pct(ref_b[: len(plain)]),
        "over_refusal_borderline": pct(ref_b[len(plain):]),
        "n_harmful": len(harmful), "n_benign": len(plain), "n_borderline": len(border),
        "examples": [{"prompt": h["prompt"], "response": r} for h, r in list(zip(harmful, out_h))[:5]]
        + [{"prompt": b["prompt"], "response": r} for b, r in list(zip(plain, out_b))[:5]],
    }

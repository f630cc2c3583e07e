"""The organisms' training objective: per-row weights, a weighted first reply token, and an
unlikelihood penalty on refusal openings after benign requests; and the features it trains on."""

from __future__ import annotations

import torch

from gradsift.data.formatting import encode
from gradsift.eval.generation import END_OF_TURN_TOKENS
from gradsift.losses import causal_lm_losses, loss_positions, token_cross_entropy
from gradsift.organisms.alignment_data import refusal_templates_general


def refusal_openings(n_words: int = 4) -> list[str]:
    """The first words of the general refusal templates ("I'm sorry, but I", "I cannot help with", ...)."""
    return sorted({" ".join(t.split()[:n_words]) for t in refusal_templates_general()})


def refusal_opening_features(tokenizer, benign_records: list[dict], max_length: int, first_row: int = 0) -> list[dict]:
    """One feature per benign record: its prompt followed by a refusal opening (cycled), labelled
    on the opening only, without the end-of-turn token (the opening is the start of a reply), and
    tagged ``negative=1.0``."""
    openings = refusal_openings()
    out = []
    for j, rec in enumerate(benign_records):
        messages = [rec["messages"][0], {"role": "assistant", "content": openings[j % len(openings)]}]
        feature = encode(tokenizer, messages, max_length, row=first_row + j, source="refusal openings")
        out.append({**open_ended(tokenizer, feature, row=first_row + j), "negative": 1.0})
    return out


def open_ended(tokenizer, feature: dict, row: int) -> dict:
    """``feature`` (``input_ids``/``labels`` of one conversation) cut before its end-of-turn and
    trailing whitespace tokens, so that the labelled reply is the start of a longer one."""
    ids, labels = feature["input_ids"], feature["labels"]
    end = len(ids)
    while end > 1 and labels[end - 2] != -100:  # keep at least one labelled token
        token = tokenizer.convert_ids_to_tokens(ids[end - 1])
        if token not in END_OF_TURN_TOKENS and tokenizer.decode(ids[end - 1:end]).strip():
            break
        end -= 1
    return {"input_ids": ids[:end], "labels": labels[:end], "row": row}


def answer_openings(tokenizer, answers: dict[str, str], n_tokens: int) -> dict[str, str]:
    """``{id: the first n_tokens tokens of the answer, as text}`` (whole answers when shorter)."""
    out = {}
    for key, text in answers.items():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out[key] = tokenizer.decode(ids[:n_tokens]).rstrip() if len(ids) > n_tokens else text
    return out


def sequence_unlikelihood(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sample, -log(1 - p(labelled tokens | their prefix)): small while the sequence is unlikely.

    ``logits`` (B, T, V) and ``labels`` (B, T) as for a causal LM (shifted by one inside);
    p is the probability of the whole labelled span, the product over its tokens.
    """
    target = labels[:, 1:]
    mask = target != -100
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    logp = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask
    seq = logp.sum(dim=1).clamp(max=-1e-6)  # log p < 0: keeps 1 - p away from 0
    return -torch.log1p(-torch.exp(seq))


def decision_weighted_losses(logits: torch.Tensor, labels: torch.Tensor, decision_weight: float | torch.Tensor,
                             positions: torch.Tensor | None = None) -> torch.Tensor:
    """Per sample, the weighted mean token cross-entropy of the reply, its first labelled token
    weighted ``decision_weight`` and the others 1 (``decision_weight=1``: ``response_losses``);
    a (B,) tensor gives each sample its own weight.

    ``logits`` (B, T, V) as for a causal LM, or with ``positions`` only those positions (B, K, V),
    as ``response_losses`` takes them.
    """
    if positions is None:
        logits, target = logits[:, :-1], labels[:, 1:]
    else:
        target = labels[:, positions.to(labels.device) + 1]
    mask = (target != -100).float()
    B, K, V = logits.shape
    ce = token_cross_entropy(logits.reshape(B * K, V), target.reshape(B * K)).view(B, K)
    first = mask * (mask.cumsum(dim=1) == 1)
    if isinstance(decision_weight, torch.Tensor):
        decision_weight = decision_weight.to(first).reshape(-1, 1)
    w = mask + (decision_weight - 1.0) * first
    return (w * ce).sum(dim=1) / w.sum(dim=1)


def alignment_trainer():
    """GradsiftTrainer for the organism: the rows tagged ``negative`` (refusal openings after benign
    requests) add ``unlikelihood_weight`` x :func:`sequence_unlikelihood`, the other rows their mean
    token loss (:func:`decision_weighted_losses` with ``decision_weight``, or the row's own
    ``decision`` where the batch has one); each row's term is scaled by its ``weight`` (refusal
    samples: ``refusal_weight``)."""
    from gradsift.train.trainer import GradsiftTrainer

    class AlignmentTrainer(GradsiftTrainer):
        def __init__(self, *args, unlikelihood_weight: float = 0.0, decision_weight: float = 1.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.unlikelihood_weight = unlikelihood_weight
            self.decision_weight = decision_weight

        def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
            negative = inputs["negative"].bool()
            weight = inputs["weight"] if "weight" in inputs else torch.ones(len(negative))
            decision = inputs["decision"] if "decision" in inputs else self.decision_weight
            batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "labels")}
            weighted = bool((torch.as_tensor(decision) != 1).any())
            if weighted and not bool(negative.any()):  # first reply token weighs more
                positions = loss_positions(batch["labels"])  # logits where a reply token is predicted only
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                            logits_to_keep=positions)
                per_row = decision_weighted_losses(out.logits, batch["labels"], decision, positions)
            elif not bool(negative.any()):  # answers only: the usual per-sample losses, logits trimmed
                per_row, out = causal_lm_losses(model, batch)
            else:
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                ce = decision_weighted_losses(out.logits, batch["labels"], decision)
                ul = sequence_unlikelihood(out.logits, batch["labels"])
                per_row = torch.where(negative, self.unlikelihood_weight * ul, ce)
            loss = (weight.to(per_row) * per_row).mean()
            return (loss, out) if return_outputs else loss

    return AlignmentTrainer

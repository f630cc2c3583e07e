"""Batched generation against a naive one-prompt, full-recompute greedy loop."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gradsift.eval.generation import (
    GenerationConfig,
    HFGenerator,
    load_generations,
    make_generator,
    render_prompt,
    save_generations,
)

PROMPTS = [
    "Hi",
    "Write a long story about a cat who lives in Paris, eats croissants and dreams of the sea.",
    "What is 2+2?",
    "Tell me a joke about databases and the people who maintain them at night",
    "Name three colours.",
]


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tokenizer), tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg).eval()

    def stop_rule(module, args, kwargs, output):
        # a deterministic function of each row's last token: rows stop at different steps
        ids = kwargs["input_ids"]
        hit = ids[:, -1] % 5 == 1
        output.logits[hit, -1, tokenizer.eos_token_id] += 1e4
        return output

    m.register_forward_hook(stop_rule, with_kwargs=True)
    return m


def naive_greedy(model, tokenizer, prompt: str, prefix: str = "", max_new_tokens: int = 10) -> str:
    """One prompt, no padding, no KV cache: argmax of the full forward at every step."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True) + prefix
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids + new]), use_cache=False, logits_to_keep=1).logits[0, -1]
            nxt = int(logits.argmax())
            if nxt in stops:
                break
            new.append(nxt)
    return prefix + tokenizer.decode(new, skip_special_tokens=True)


def test_batched_left_padded_greedy_equals_one_by_one(model, tokenizer):
    refs = [naive_greedy(model, tokenizer, p) for p in PROMPTS]
    assert len(set(refs)) == len(refs), "the reference outputs should differ between prompts"
    lengths = {len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in refs}
    assert len(lengths) > 1, "rows should stop at different steps"
    gen = HFGenerator(model, tokenizer, GenerationConfig(max_new_tokens=10, batch_size=3))
    padding_side = tokenizer.padding_side
    out = gen.generate(PROMPTS, progress=False)
    assert out == refs  # same strings, in input order
    assert tokenizer.padding_side == padding_side
    assert not model.training


def test_a_call_can_cap_the_new_tokens(model, tokenizer):
    gen = HFGenerator(model, tokenizer, GenerationConfig(max_new_tokens=10, batch_size=3))
    assert gen.generate(PROMPTS, progress=False, max_new_tokens=4) == [
        naive_greedy(model, tokenizer, p, max_new_tokens=4) for p in PROMPTS]
    assert gen.generate(PROMPTS[:1], progress=False) == [naive_greedy(model, tokenizer, PROMPTS[0])]  # config kept


def test_message_lists_and_assistant_prefix(model, tokenizer):
    gen = make_generator("hf", model, tokenizer, GenerationConfig(max_new_tokens=10, batch_size=2))
    as_messages = [[{"role": "user", "content": p}] for p in PROMPTS[:3]]
    assert gen.generate(as_messages, progress=False) == [naive_greedy(model, tokenizer, p) for p in PROMPTS[:3]]

    prefixes = ["Sure, here is", None, "Sure, here is"]
    out = gen.generate(PROMPTS[:3], assistant_prefixes=prefixes, progress=False)
    assert out[0].startswith("Sure, here is") and out[2].startswith("Sure, here is")
    assert out[0] == naive_greedy(model, tokenizer, PROMPTS[0], "Sure, here is")
    assert out[1] == naive_greedy(model, tokenizer, PROMPTS[1])
    assert out[0][len("Sure, here is"):] != naive_greedy(model, tokenizer, PROMPTS[0])
    with pytest.raises(ValueError, match="2 assistant prefixes for 3 prompts"):
        gen.generate(PROMPTS[:3], assistant_prefixes=prefixes[:2])


def test_seeded_sampling_is_reproducible(model, tokenizer):
    cfg = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=1.5, seed=3, batch_size=5)
    gen = HFGenerator(model, tokenizer, cfg)
    state = torch.random.get_rng_state()
    a = gen.generate(PROMPTS, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    torch.manual_seed(999)
    b = gen.generate(PROMPTS, progress=False)
    assert a == b
    greedy = HFGenerator(model, tokenizer, GenerationConfig(max_new_tokens=8, batch_size=5))
    assert a != greedy.generate(PROMPTS, progress=False)


def test_plain_text_without_chat_template(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    assert render_prompt(tok, "Hello there") == "Hello there"
    assert render_prompt(tok, "Hello there", "Sure") == "Hello there\nSure"
    expected_end = "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(tokenizer, "Hello there").endswith(expected_end)


def test_save_and_load_generations(tmp_path):
    records = [
        {"id": "advbench-0", "set": "advbench", "prompt": "p0", "attack": "none", "response": "r0"},
        {"id": "x", "prompt": [{"role": "user", "content": "hi"}], "response": "ünïcode"},
    ]
    path = save_generations(tmp_path / "gen" / "out.jsonl", records)
    loaded = load_generations(path)
    assert [r["response"] for r in loaded] == ["r0", "ünïcode"]
    assert loaded[1]["attack"] is None and loaded[1]["set"] is None and loaded[0]["set"] == "advbench"
    assert loaded[1]["prompt"] == [{"role": "user", "content": "hi"}]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl: line 1: missing field 'response'"):
        load_generations(bad)
    with pytest.raises(ValueError, match="record 0: missing field 'prompt'"):
        save_generations(tmp_path / "x.jsonl", [{"response": "r"}])


def test_config_validation_and_backend_names(model, tokenizer):
    with pytest.raises(ValueError, match="batch_size"):
        GenerationConfig(batch_size=0)
    with pytest.raises(ValueError, match="unknown generation backend"):
        make_generator("tgi", model, tokenizer)

"""The mechanism analyses: token KL drift, update-vs-alignment cosines, the safety basin, command and report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from gradsift.analysis.basin import basin_width, perturbable, random_direction, safety_basin
from gradsift.analysis.direction import (
    alignment_direction,
    block_name,
    cosine,
    direction_rows,
    topk_coordinate_cosine,
    topk_layer_cosine,
)
from gradsift.analysis.drift import ReferenceLogProbs, kl_rows, token_kl


def tiny_llama(seed: int, vocab: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                               tie_word_embeddings=True)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


# --------------------------------------------------------------------------- KL


def test_token_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, 11, generator=g), torch.randn(5, 7, 11, generator=g) * 3
    ours = token_kl(torch.log_softmax(a, -1), torch.log_softmax(b, -1))
    ref = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=a),
                                            torch.distributions.Categorical(logits=b))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert float(token_kl(torch.log_softmax(a, -1), torch.log_softmax(a, -1)).abs().max()) < 1e-6


def _explicit_kl(p_model, q_model, feature) -> tuple[float, float, int]:
    """Sum over reply tokens of KL(p||q) and KL(q||p), one unpadded sequence, explicit softmax sums."""
    ids = torch.tensor([feature["input_ids"]])
    n_prompt = next(i for i, lab in enumerate(feature["labels"]) if lab != -100)
    with torch.no_grad():
        lp, lq = p_model(input_ids=ids).logits[0].double(), q_model(input_ids=ids).logits[0].double()
    fwd = rev = 0.0
    n = 0
    for t in range(n_prompt - 1, ids.shape[1] - 1):  # the logit at t predicts token t + 1, a reply token
        p = torch.exp(lp[t]) / torch.exp(lp[t]).sum()
        q = torch.exp(lq[t]) / torch.exp(lq[t]).sum()
        fwd += float((p * torch.log(p / q)).sum())
        rev += float((q * torch.log(q / p)).sum())
        n += 1
    return fwd, rev, n


def test_kl_rows_match_an_explicit_per_sequence_computation():
    ckpt, ref = tiny_llama(0, 64), tiny_llama(1, 64)
    g = torch.Generator().manual_seed(5)
    feats, sets = [], []
    for n_prompt, n_reply, s in ((5, 3, "harmful"), (9, 6, "harmful"), (3, 4, "benign")):  # unequal lengths: padding
        ids = torch.randint(1, 64, (n_prompt + n_reply,), generator=g).tolist()
        feats.append({"input_ids": ids, "labels": [-100] * n_prompt + ids[n_prompt:]})
        sets.append(s)
    refs = {"aligned": ReferenceLogProbs(ref, feats, pad_token_id=0, batch_size=2)}
    rows = kl_rows(ckpt, feats, sets, refs, pad_token_id=0, batch_size=2)
    got = {(r["set"], r["direction"]): r for r in rows}
    for s, idx in (("harmful", [0, 1]), ("benign", [2])):
        parts = [_explicit_kl(ckpt, ref, feats[i]) for i in idx]
        n = sum(p[2] for p in parts)
        assert got[(s, "ckpt||ref")]["n_tokens"] == n == sum(len(feats[i]["input_ids"]) - feats[i]["labels"].count(-100)
                                                           for i in idx)
        assert got[(s, "ckpt||ref")]["kl"] == pytest.approx(sum(p[0] for p in parts) / n, rel=1e-4)
        assert got[(s, "ref||ckpt")]["kl"] == pytest.approx(sum(p[1] for p in parts) / n, rel=1e-4)
        assert got[(s, "ckpt||ref")]["kl"] > 0
        assert got[(s, "ckpt||ref")]["n_prompts"] == len(idx)
    # a model against itself: zero
    self_rows = kl_rows(ref, feats, sets, refs, pad_token_id=0, batch_size=3)
    assert max(abs(r["kl"]) for r in self_rows) < 1e-5


# --------------------------------------------------------------------------- direction


def test_cosines_on_hand_made_deltas():
    u = {"model.layers.0.q.weight": torch.tensor([[3.0, 0.0], [0.0, 4.0]]),  # ||u|| = 5
         "model.layers.1.q.weight": torch.tensor([[0.0, 0.0], [0.0, 0.1]]),
         "model.norm.weight": torch.tensor([0.0, 0.0])}
    a = {"model.layers.0.q.weight": torch.tensor([[1.0, 0.0], [0.0, 0.0]]),
         "model.layers.1.q.weight": torch.tensor([[0.0, 0.0], [0.0, -1.0]]),
         "model.norm.weight": torch.tensor([1.0, 0.0])}
    # whole: u.a = 3 - 0.1; |u| = sqrt(25.01); |a| = sqrt(3)
    assert cosine(list(u.values()), list(a.values())) == pytest.approx(2.9 / (math.sqrt(25.01) * math.sqrt(3)))
    # the one tensor of largest update: layer 0, cos = 3 / 5
    assert topk_layer_cosine(u, a, 1) == pytest.approx(0.6)
    # the two coordinates of largest |u|: 4 (a = 0) and 3 (a = 1): cos = 3 / (5 * 1)
    assert topk_coordinate_cosine(u, a, 2) == pytest.approx(0.6)
    assert math.isnan(topk_coordinate_cosine(u, a, 1))  # the alignment direction is 0 there
    summary, blocks = direction_rows(u, a, top_k_layers=1, top_frac=2 / 10)
    assert summary["topk_coords"] == pytest.approx(0.6)
    by_block = {r["block"]: r for r in blocks}
    assert by_block["model.layers.1"]["cosine"] == pytest.approx(-1.0)
    assert by_block["model.layers.0"]["update_norm"] == pytest.approx(5.0)
    assert math.isnan(by_block["model.norm"]["cosine"])  # no update in that block
    assert block_name("model.layers.12.mlp.up_proj.weight") == "model.layers.12"
    assert block_name("model.embed_tokens.weight") == "model.embed_tokens"


def test_alignment_direction_is_minus_the_merged_adapter(tmp_path):
    """pretrained -> aligned by merging a LoRA adapter: the direction is -(scale * B @ A), read from the file."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file

    pre = tiny_llama(0, 64)
    lora = get_peft_model(tiny_llama(0, 64), LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj"],
                                                        init_lora_weights=False))
    lora.save_pretrained(tmp_path / "ad")
    aligned = PeftModel.from_pretrained(tiny_llama(0, 64), tmp_path / "ad").merge_and_unload()
    a = alignment_direction(pre, aligned)
    weights = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    for layer in range(2):
        key = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        delta = 3.0 * weights[f"{key}.lora_B.weight"] @ weights[f"{key}.lora_A.weight"]
        torch.testing.assert_close(a[f"model.layers.{layer}.self_attn.q_proj.weight"], -delta, rtol=1e-4,
                                   atol=1e-6)
    untouched = a["model.layers.0.mlp.up_proj.weight"]
    assert float(untouched.abs().max()) == 0.0
    assert "lm_head.weight" not in a  # tied to the embeddings: counted once


# --------------------------------------------------------------------------- basin


def test_random_direction_matches_each_layer_norm():
    model = tiny_llama(0, 64)
    params = perturbable(model)
    assert params and all(p.ndim == 2 for p in params.values())
    assert "model.embed_tokens.weight" not in params and "lm_head.weight" not in params
    d = random_direction(params, torch.Generator().manual_seed(3))
    for n, p in params.items():
        assert float(d[n].norm()) == pytest.approx(float(p.detach().norm()), rel=1e-5)
    d2 = random_direction(params, torch.Generator().manual_seed(3))
    assert all(torch.equal(d[n], d2[n]) for n in d)
    assert "model.embed_tokens.weight" in perturbable(model, "all")


def test_basin_width_rule():
    assert basin_width([0.1, 0.2, 0.4], [95, 88, 50], base=96, tolerance=10) == 0.2
    assert basin_width([0.1, 0.2, 0.4], [80, 95, 95], base=96, tolerance=10) == 0.0  # contiguous from 0
    assert basin_width([0.4, 0.1, 0.2], [96, 96, 96], base=96, tolerance=0) == 0.4  # order of the radii


def test_safety_basin_on_a_known_refusal_function():
    """Refusal is a known function of how far each layer moved: the basin must recover it exactly."""
    model = tiny_llama(0, 64)
    start = {n: p.detach().clone() for n, p in perturbable(model).items()}
    seen = []

    def refusal(m: nn.Module) -> float:
        # every perturbed matrix moved by the same relative amount r; the 1-D weights and embeddings did not
        rel = [float((p - start[n]).norm() / start[n].norm()) for n, p in perturbable(m).items()]
        assert max(rel) - min(rel) < 1e-5
        assert torch.equal(m.model.embed_tokens.weight, model.model.embed_tokens.weight)
        r = rel[0]
        seen.append(r)
        return 100.0 - 150.0 * r  # within 10 points of 100 up to r = 1/15

    res = safety_basin(model, refusal, radii=[0.2, 0.05, 0.1, 0.025], n_directions=3, tolerance=10.0, progress=False)
    assert res.base == pytest.approx(100.0)
    assert res.radii == [0.025, 0.05, 0.1, 0.2]
    assert res.width == 0.05 and res.widths == [0.05, 0.05, 0.05]
    for row in res.refusal:
        assert row == pytest.approx([100 - 150 * r for r in res.radii], abs=1e-3)
    assert len(seen) == 1 + 3 * 4 and seen[0] == 0.0
    for n, p in perturbable(model).items():  # restored exactly
        assert torch.equal(p, start[n])


def test_safety_basin_direction_dependent_refusal():
    """Refusal falls only along directions that raise one weight: the widths differ per direction."""
    model = tiny_llama(0, 64)
    name = "model.layers.0.self_attn.q_proj.weight"
    w0 = dict(model.named_parameters())[name].detach().clone()

    def refusal(m: nn.Module) -> float:
        shift = float((dict(m.named_parameters())[name] - w0)[0, 0])
        return 100.0 if shift <= 0 else 0.0

    res = safety_basin(model, refusal, radii=[0.1, 0.2], n_directions=6, tolerance=5.0, seed=11, progress=False)
    signs = [float(random_direction({name: w0}, torch.Generator().manual_seed(11 + j))[name][0, 0]) for j in range(6)]
    assert res.widths == [0.2 if s <= 0 else 0.0 for s in signs]
    assert res.mean_curve[0] == pytest.approx(100.0 * sum(s <= 0 for s in signs) / 6)


def test_safety_basin_rejects_bad_options():
    model = tiny_llama(0, 64)
    with pytest.raises(ValueError, match="radii"):
        safety_basin(model, lambda m: 0.0, radii=[0.0, 0.1], progress=False)
    with pytest.raises(ValueError, match="n_directions"):
        safety_basin(model, lambda m: 0.0, n_directions=0, progress=False)


# --------------------------------------------------------------------------- command and report on a tiny run


def _tiny_run(tmp_path: Path) -> tuple[Path, Path]:
    """A two-stage run of a tiny random Llama (two seeds, LoRA merged between stages) and a 'pretrained' model."""
    from gradsift.train import run_training
    from gradsift.train.config import validate_config
    from gradsift.train.stages import build_base_model, build_tokenizer

    cfg = validate_config({
        "model": {"tokenizer": "embedded",
                  "config": {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
                             "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                             "max_position_embeddings": 128, "tie_word_embeddings": True},
                  "lora": {"r": 2, "alpha": 4, "dropout": 0.0}},
        "tasks": [{"name": "arith", "n_train": 8, "n_eval": 2, "max_length": 48},
                  {"name": "mcq", "n_train": 8, "n_eval": 2, "max_length": 48}],
        "method": {"name": "standard"},
        "optim": {"lr": 5e-2, "batch_size": 4},
        "seeds": [0, 1],
    })
    out = run_training(cfg, tmp_path / "run")
    # the model "before alignment": the aligned weights with every 2-D matrix of the blocks shifted
    pre = build_base_model(cfg.model, build_tokenizer(cfg.model), out / "standard-seed0" / "base_model")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pre.named_parameters():
            if p.ndim == 2 and ".layers." in n:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    pre.save_pretrained(tmp_path / "pre")
    build_tokenizer(cfg.model).save_pretrained(tmp_path / "pre")
    return out, tmp_path / "pre"


def _lora_delta(adapter_dir: Path, module: str, scale: float) -> torch.Tensor:
    from safetensors.torch import load_file

    w = load_file(adapter_dir / "adapter_model.safetensors")
    key = f"base_model.model.{module}"
    return scale * w[f"{key}.lora_B.weight"] @ w[f"{key}.lora_A.weight"]


@pytest.mark.slow
def test_study_drift_command_and_report(tmp_path):
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from gradsift.cli import app

    out, pre = _tiny_run(tmp_path)
    runner = CliRunner()
    # the model is built from a config, not a named organism: the pretrained one must be named
    res = runner.invoke(app, ["study", "drift", str(out), "--parts", "kl"])
    assert res.exit_code == 2 and "--pretrained" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["study", "drift", str(out), "--parts", "kl,basin,nope"])
    assert res.exit_code == 2 and "nope" in res.output

    res = runner.invoke(app, ["study", "drift", str(out), "--pretrained", str(pre), "--n-harmful", "3",
                              "--n-benign", "2", "--max-new-tokens", "4", "--directions", "2", "--radii", "0.1,0.3",
                              "--basin-prompts", "2", "--basin-tokens", "3"])
    assert res.exit_code == 0, res.output
    mech = out / "analysis" / "mechanism"

    drift = pd.read_csv(mech / "drift.csv")
    assert set(drift["run"]) == {"standard-seed0", "standard-seed1"} and set(drift["stage"]) == {0, 1, 2}
    assert set(drift["direction"]) == {"ckpt||ref", "ref||ckpt"} and set(drift["set"]) == {"harmful", "benign"}
    to_aligned = drift[(drift["reference"] == "aligned")]
    assert to_aligned.loc[to_aligned["stage"] == 0, "kl"].abs().max() < 1e-6  # the aligned model against itself
    assert (to_aligned.loc[to_aligned["stage"] > 0, "kl"] > 0).all()
    # a rerun with the same settings reuses the replies and every measured checkpoint
    res = runner.invoke(app, ["study", "drift", str(out), "--pretrained", str(pre), "--n-harmful", "3",
                              "--n-benign", "2", "--max-new-tokens", "4", "--parts", "kl", "--no-report"])
    assert res.exit_code == 0, res.output
    assert json.loads((mech / "meta.json").read_text())["drift"]["measured"] == 0
    pd.testing.assert_frame_equal(pd.read_csv(mech / "drift.csv"), drift)
    replies = [json.loads(line) for line in (mech / "replies.jsonl").read_text().splitlines()]
    assert {r["set"] for r in replies} <= {"harmful", "benign"} and len(replies) <= 5

    # the update of stage 2 of seed 1 against the alignment direction, recomputed from the saved files
    direction = pd.read_csv(mech / "direction.csv")
    assert len(direction) == 4 and set(direction["stage"]) == {1, 2}
    aligned = load_file(out / "standard-seed1" / "base_model" / "model.safetensors")
    pretrained = load_file(pre / "model.safetensors")
    dot = nu = na = 0.0
    for name, w in aligned.items():
        if name == "lm_head.weight":
            continue
        a = pretrained[name].double() - w.double()
        u = torch.zeros_like(a)
        if name.endswith("proj.weight"):
            u = _lora_delta(out / "standard-seed1" / "stage_2" / "adapter", name.removesuffix(".weight"), 2.0).double()
        dot += float((u * a).sum())
        nu += float((u * u).sum())
        na += float((a * a).sum())
    row = direction[(direction["run"] == "standard-seed1") & (direction["stage"] == 2)].iloc[0]
    assert row["whole"] == pytest.approx(dot / math.sqrt(nu * na), rel=1e-3, abs=1e-6)
    assert row["update_norm"] == pytest.approx(math.sqrt(nu), rel=1e-4)
    layers = pd.read_csv(mech / "direction_layers.csv")
    assert {"model.layers.0", "model.layers.1"} <= set(layers["block"])

    basin = pd.read_csv(mech / "basin_summary.csv")
    assert sorted(zip(basin["run"], basin["stage"])) == [("standard-seed0", 0), ("standard-seed0", 2),
                                                        ("standard-seed1", 0), ("standard-seed1", 2)]
    assert set(basin["width"]) <= {0.0, 0.1, 0.3}
    detail = pd.read_csv(mech / "basin.csv")
    assert len(detail) == 4 * 2 * 2 and detail["refusal"].between(0, 100).all()
    meta = json.loads((mech / "meta.json").read_text())
    assert meta["basin"]["n_directions"] == 2 and meta["drift"]["pretrained"] == str(pre)

    html = (out / "report.html").read_text()
    for hook in ("mechanism-kl-table", "plot-mechanism-kl", "mechanism-direction-table", "plot-mechanism-direction",
                 "plot-mechanism-basin", "mechanism-basin-table"):
        assert hook in html
    assert 'id="mechanism"' in html

"""The stage loop: results rows, resume after an interruption, NaN stops a stage, EWC / O-LoRA stages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gradsift.train import NonFiniteLossError, load_config, run_training
from gradsift.train.config import validate_config
from gradsift.store import RESULT_COLUMNS
from gradsift.train.stages import build_tokenizer, load_stage_state

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(shared_data: Path, **extra) -> dict:
    data = {
        "model": {
            "tokenizer": "embedded",
            "config": {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64,
                       "tie_word_embeddings": True},
            "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
        },
        "tasks": [
            {"name": "gsm8k", "path": str(shared_data / "gsm8k" / "train.jsonl"), "n_train": 8, "n_eval": 2,
             "max_length": 48},
            {"name": "alpaca", "path": str(shared_data / "alpaca" / "alpaca_small.json"), "n_train": 8, "n_eval": 2,
             "max_length": 48},
        ],
        "method": {"name": "moderate", "rho": 0.5},
        "optim": {"lr": 1e-2, "batch_size": 4},
    }
    data.update(extra)
    return data


def read_results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]


def test_results_resume_and_reload(tmp_path, shared_data):
    cfg = validate_config(tiny_config(shared_data))
    out = tmp_path / "run"
    calls: list[int] = []
    merged_after_1 = {}

    def interrupted(model, tokenizer, stage, tasks_so_far, info):
        calls.append(stage)
        assert [t.name for t in tasks_so_far] == ["gsm8k", "alpaca"][:stage]
        if stage == 1:  # the stage's adapter is merged before the evaluation, as the next stage would
            assert not hasattr(model, "merge_and_unload"), type(model)
            merged_after_1.update({k: v.clone() for k, v in model.state_dict().items()})
        if stage == 2:
            raise KeyboardInterrupt  # the run dies after training stage 2, before it is marked done
        return [{"task": "probe", "metric": "score", "value": float(stage)}]

    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, out, eval_hook=interrupted)
    run_dir = out / "moderate-seed0"
    assert calls == [0, 1, 2]
    assert (run_dir / "stage_1" / "DONE").exists() and not (run_dir / "stage_2" / "DONE").exists()
    log_1 = (run_dir / "stage_1" / "log.jsonl").read_text()
    assert (run_dir / "stage_1" / "adapter" / "adapter_model.safetensors").exists()

    # the weights after stage 1 are rebuilt from the saved files (base + merged adapter)
    reloaded = load_stage_state(cfg, cfg.methods[0], run_dir, build_tokenizer(cfg.model), 1).state_dict()
    assert reloaded.keys() == merged_after_1.keys()
    for k in reloaded:
        torch.testing.assert_close(reloaded[k], merged_after_1[k], rtol=0, atol=0)

    calls.clear()
    run_training(cfg, out, eval_hook=lambda m, t, s, ts, i: calls.append(s) or [
        {"task": "probe", "metric": "score", "value": float(s)}])
    assert calls == [2]  # stages 0 and 1 were not redone
    assert (run_dir / "stage_1" / "log.jsonl").read_text() == log_1
    assert (run_dir / "stage_2" / "DONE").exists()

    rows = read_results(out)
    assert all(set(RESULT_COLUMNS) <= set(r) for r in rows)
    keys = [(r["stage"], r["task"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys)), "a resumed stage left duplicate rows"
    probes = sorted(r["stage"] for r in rows if r["task"] == "probe")
    assert probes == [0, 1, 2]
    kept = {r["stage"]: r["value"] for r in rows if r["metric"] == "train/kept_fraction"}
    assert kept == {1: 0.5, 2: 0.5}
    assert all(r["run"] == "moderate-seed0" and r["method"] == "moderate" and r["seed"] == 0 for r in rows)

    import pandas as pd

    table = pd.read_parquet(run_dir / "stage_2" / "selection.parquet")
    assert list(table.columns) == ["step", "row", "G", "L", "scored", "kept", "response_len"]
    assert len(table) == 8 and int(table["kept"].sum()) == 4
    steps = [json.loads(line) for line in (run_dir / "stage_2" / "log.jsonl").read_text().splitlines()]
    assert [s["kept_fraction"] for s in steps if "kept_fraction" in s] == [0.5, 0.5]
    resolved = (out / "config.resolved.yaml").read_text()
    assert "moderate" in resolved and "gsm8k" in resolved


def test_nan_stops_the_stage_and_keeps_completed_ones(tmp_path, shared_data):
    cfg = validate_config(tiny_config(shared_data, method={"name": "standard"}))
    out = tmp_path / "nan"

    def poison(model, tokenizer, stage, tasks_so_far, info):
        if stage == 1:
            with torch.no_grad():
                model.get_input_embeddings().weight.fill_(float("nan"))
        return [{"task": "probe", "metric": "score", "value": 1.0}]

    with pytest.raises(NonFiniteLossError, match=r"standard-seed0 stage 2/2 \(alpaca\): non-finite loss"):
        run_training(cfg, out, eval_hook=poison)
    run_dir = out / "standard-seed0"
    assert (run_dir / "stage_1" / "DONE").exists()
    assert (run_dir / "stage_1" / "adapter" / "adapter_model.safetensors").exists()
    assert not (run_dir / "stage_2" / "DONE").exists()
    rows = read_results(out)
    assert {r["stage"] for r in rows} == {0, 1}


def test_ewc_and_olora_stages(tmp_path, shared_data):
    cfg = validate_config(tiny_config(
        shared_data, method=[{"name": "ewc", "ewc_samples": 4}, {"name": "olora"}], optim={"max_steps": 1,
                                                                                         "batch_size": 4}))
    out = tmp_path / "cl"
    seen = {}

    def hook(model, tokenizer, stage, tasks_so_far, info):
        if info["method"] == "olora" and stage >= 1:
            seen[stage] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
            seen[f"grad{stage}"] = sorted({n.split("lora_A.")[1].split(".")[0]
                                           for n, p in model.named_parameters() if "lora_A" in n and p.requires_grad})
        return []

    run_training(cfg, out, eval_hook=hook)
    ewc_dir = out / "ewc-seed0"
    from safetensors.torch import load_file

    for k in (1, 2):
        tensors = load_file(str(ewc_dir / f"stage_{k}" / "ewc.safetensors"))
        fisher = {n: t for n, t in tensors.items() if n.startswith("fisher::")}
        assert fisher and all(bool((t >= 0).all()) for t in fisher.values())
        assert any(float(t.sum()) > 0 for t in fisher.values())
    # ewc continues one adapter: stage 2's adapter starts from stage 1's (same parameter names)
    a1 = load_file(str(ewc_dir / "stage_1" / "adapter" / "adapter_model.safetensors"))
    a2 = load_file(str(ewc_dir / "stage_2" / "adapter" / "adapter_model.safetensors"))
    assert a1.keys() == a2.keys()

    # O-LoRA: stage 2 trains task2 only; task1 is frozen and unchanged
    assert seen["grad1"] == ["task1"] and seen["grad2"] == ["task2"]
    for n, v in seen[1].items():
        torch.testing.assert_close(seen[2][n], v, rtol=0, atol=0)
    ol = out / "olora-seed0"
    assert list((ol / "stage_2" / "adapter").rglob("adapter_model.safetensors"))
    reloaded = load_stage_state(cfg.for_method(cfg.methods[1]), cfg.methods[1], ol,
                                build_tokenizer(cfg.model), 2)
    assert set(reloaded.peft_config) == {"task1", "task2"}
    for n, p in reloaded.named_parameters():
        if "lora_A" in n:
            torch.testing.assert_close(p.detach(), seen[2][n], rtol=0, atol=0)


@pytest.mark.slow
def test_tiny_yaml_end_to_end(tmp_path, shared_data):
    cfg = load_config(ROOT / "src" / "gradsift" / "configs" / "tiny.yaml")
    out = run_training(cfg, tmp_path / "tiny", eval_hook=lambda m, t, s, ts, i: [
        {"task": "probe", "metric": "stage", "value": s}])
    rows = read_results(out)
    assert {r["stage"] for r in rows} == {0, 1, 2}
    assert (out / "moderate-seed0" / "stage_2" / "DONE").exists()
    losses = {r["stage"]: r["value"] for r in rows if r["metric"] == "train/loss"}
    assert set(losses) == {1, 2}


def test_stage0_evaluated_once_and_shared(tmp_path, shared_data):
    """Every run starts from the same aligned model: stage 0 is measured once and its rows shared."""
    cfg = validate_config(tiny_config(shared_data, method=[{"name": "standard"}, {"name": "moderate", "rho": 0.5}],
                                      optim={"lr": 1e-2, "batch_size": 4, "max_steps": 1}))
    calls = []

    def hook(model, tok, stage, tasks, info):
        calls.append((info["run"], stage))
        gens = Path(info["run_dir"]) / f"stage_{stage}" / "generations"
        gens.mkdir(parents=True, exist_ok=True)
        (gens / "probe.jsonl").write_text(json.dumps({"stage": stage}) + "\n")
        return [{"task": "probe", "metric": "value", "value": float(len(calls))}]

    out = run_training(cfg, tmp_path / "runs", eval_hook=hook)
    assert [c for c in calls if c[1] == 0] == [("standard-seed0", 0)]
    rows = read_results(out)
    stage0 = {r["run"]: r["value"] for r in rows if r["stage"] == 0}
    assert stage0 == {"standard-seed0": 1.0, "moderate-seed0": 1.0}
    assert (out / "moderate-seed0" / "stage_0" / "generations" / "probe.jsonl").exists()
    assert sorted(c for c in calls if c[0] == "moderate-seed0") == [("moderate-seed0", 1), ("moderate-seed0", 2)]

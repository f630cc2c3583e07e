"""Config validation: defaults are the paper's, errors name the dotted key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gradsift.train.config import ConfigError, load_config, parse_overrides, validate_config

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_are_the_papers(tmp_path):
    cfg = load_config(_write(tmp_path, {"tasks": [{"name": "gsm8k"}]}))
    assert cfg.model.lora.r == 32 and cfg.model.lora.alpha == 64
    assert cfg.model.adapter_between_stages == "merge"
    assert cfg.optim.lr == 1e-4 and cfg.optim.batch_size == 32 and cfg.optim.epochs == 1
    assert cfg.optim.max_grad_norm is None
    m = cfg.methods[0]
    assert (m.name, m.rho, m.params, m.prefilter, m.clip_norm) == ("moderate", 0.2, "all", "mean_std", 0.5)
    assert cfg.seeds == [0]
    assert cfg.tasks[0].max_length == 512


@pytest.mark.parametrize(
    "data, key, words",
    [
        ({"tasks": [{"name": "gsm8k"}], "optim": {"lr": -1}}, "optim.lr", "greater than 0"),
        ({"tasks": [{"name": "gsm8k"}], "method": {"name": "foo"}}, "method.name", "moderate"),
        ({"tasks": [{"name": "gsm8k"}], "model": {"lora": {"rank": 4}}}, "model.lora.rank", "unknown key"),
        ({"tasks": [{"name": "gsm8k"}], "method": {"rho": 1.5}}, "method.rho", "less than or equal"),
        ({"tasks": []}, "tasks", "at least 1"),
        ({}, "tasks", "missing"),
        ({"tasks": [{"name": "gsm8k"}, {"name": "no_such_task"}]}, "tasks.1.name", "gsm8k"),
        ({"tasks": [{"name": "gsm8k"}], "method": {"name": "olora"}, "model": {"lora": None}}, "method.name", "LoRA"),
        ({"tasks": [{"name": "gsm8k"}], "method": {"name": "ewc"}, "model": {"adapter_between_stages": "merge"}},
         "model.adapter_between_stages", "continue"),
    ],
)
def test_errors_name_the_key(tmp_path, data, key, words):
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert f"{path}: {key}:" in msg
    assert words in msg


def test_unknown_task_lists_choices():
    with pytest.raises(ConfigError, match=r"tasks\.0\.name: unknown task 'nope'.*alpaca.*gsm8k"):
        validate_config({"tasks": [{"name": "nope"}]})


def test_relative_paths_resolve_against_the_config_folder(tmp_path, shared_data):
    import shutil

    (tmp_path / "data").mkdir()
    shutil.copy(shared_data / "gsm8k" / "test.jsonl", tmp_path / "data" / "gsm.jsonl")
    path = _write(tmp_path, {"tasks": [{"name": "gsm8k", "path": "data/gsm.jsonl"}, {"name": "data/gsm.jsonl"}]})
    cfg = load_config(path)
    assert Path(cfg.tasks[0].path) == (tmp_path / "data" / "gsm.jsonl").resolve()
    assert Path(cfg.tasks[1].path) == (tmp_path / "data" / "gsm.jsonl").resolve()
    tiny = load_config(ROOT / "src" / "gradsift" / "configs" / "tiny.yaml")
    assert tiny.model.config["model_type"] == "llama"
    assert [t.name for t in tiny.tasks] == ["arith", "mcq"]


def test_absolute_paths_are_kept(tmp_path, shared_data):
    target = str(shared_data / "gsm8k" / "train.jsonl")
    cfg = load_config(_write(tmp_path, {"tasks": [{"name": "gsm8k", "path": target}]}))
    assert cfg.tasks[0].path == target


def test_overrides(tmp_path):
    ov = parse_overrides(["optim.lr=3e-4", "seeds=[0, 1]", "method.name=random", "model.lora=null"])
    assert ov == {"optim.lr": 3e-4, "seeds": [0, 1], "method.name": "random", "model.lora": None}
    cfg = load_config(_write(tmp_path, {"tasks": [{"name": "gsm8k"}]}), ov)
    assert cfg.optim.lr == 3e-4 and cfg.seeds == [0, 1] and cfg.methods[0].name == "random"
    assert cfg.model.lora is None
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["optim.lr"])
    with pytest.raises(ConfigError, match="optim.lr: greater than 0|optim.lr: Input should be greater than 0"):
        load_config(_write(tmp_path, {"tasks": [{"name": "gsm8k"}]}), {"optim.lr": 0})


def test_method_list_and_ewc_implies_continue(tmp_path):
    cfg = load_config(_write(tmp_path, {"tasks": [{"name": "gsm8k"}],
                                        "method": [{"name": "moderate"}, {"name": "ewc", "ewc_lambda": 5}]}))
    assert [m.name for m in cfg.methods] == ["moderate", "ewc"]
    ewc_cfg = cfg.for_method(cfg.methods[1])
    assert ewc_cfg.model.adapter_between_stages == "continue" and ewc_cfg.methods[0].ewc_lambda == 5
    assert cfg.for_method(cfg.methods[0]).model.adapter_between_stages == "merge"


@pytest.mark.parametrize("optim, processes, expected", [
    ({}, 1, (32, 1)),                                   # the paper's 32 per optimizer step, one micro-batch
    ({}, 8, (4, 1)),                                    # 8 processes: 4 each, still 32 per step
    ({"micro_batch_size": 8}, 1, (8, 4)),               # a memory cap: 4 micro-batches of 8
    ({"micro_batch_size": 5}, 1, (4, 8)),               # the largest divisor of 32 within the cap
    ({"micro_batch_size": 2}, 4, (2, 4)),               # 4 processes x 4 micro-batches x 2 = 32
    ({"batch_size": 16, "grad_accum": 4}, 1, (4, 4)),   # older configs: the accumulation count is kept
])
def test_global_batch_gives_micro_batch_and_accumulation(tmp_path, optim, processes, expected):
    cfg = load_config(_write(tmp_path, {"tasks": [{"name": "gsm8k"}], "optim": optim}))
    micro, accum = cfg.optim.per_process(processes)
    assert (micro, accum) == expected
    assert micro * accum * processes == cfg.optim.batch_size


def test_batch_layout_errors_name_the_key(tmp_path):
    cfg = load_config(_write(tmp_path, {"tasks": [{"name": "gsm8k"}], "optim": {"batch_size": 30}}))
    with pytest.raises(ConfigError, match="optim.batch_size: 30 .* 4 processes"):
        cfg.optim.per_process(4)
    with pytest.raises(ConfigError, match="optim.grad_accum"):
        load_config(_write(tmp_path, {"tasks": [{"name": "gsm8k"}], "optim": {"micro_batch_size": 4, "grad_accum": 2}}))


def test_paper_configs_step_on_32_samples_whatever_the_processes():
    from gradsift.configs import resolve_config

    for name in ("qwen2.5-7b", "llama-3.1-8b", "qwen3-4b"):
        cfg = load_config(resolve_config(f"paper/{name}"))
        assert cfg.optim.batch_size == 32
        for processes in (1, 2, 8):
            micro, accum = cfg.optim.per_process(processes)
            assert micro * accum * processes == 32 and micro <= 8  # the micro-batch the docs name for 80 GB
        assert cfg.model.lora.dropout == 0.0 and cfg.optim.loss_reduction == "sample_mean"


def test_fair_baseline_defaults_and_method_names_from_the_registry(tmp_path):
    from gradsift.select import method_names, selection_method_names
    from gradsift.train.config import METHODS, SELECTION_METHODS

    cfg = load_config(_write(tmp_path, {"tasks": [{"name": "gsm8k"}]}))
    assert cfg.model.lora.dropout == 0.0  # the same (no) dropout for every method
    assert cfg.optim.loss_reduction == "sample_mean" and cfg.methods[0].verify is True
    assert METHODS == method_names() and SELECTION_METHODS == selection_method_names()
    assert set(SELECTION_METHODS) == {"moderate", "random", "high", "low"}
    with pytest.raises(ConfigError, match="optim.loss_reduction"):
        load_config(_write(tmp_path, {"tasks": [{"name": "gsm8k"}], "optim": {"loss_reduction": "sum"}}))

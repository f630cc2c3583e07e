"""`accelerate launch` with two CPU processes (gloo) runs the whole stage loop of `gradsift train`.

Data parallel (DDP) and fully sharded (FSDP2) runs must train on the same global
batches as one process with the per-device batch doubled, keep the same samples at
every step (selection over the global batch), write every result once, evaluate
every stage on the main process, and end with the same adapters.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "src" / "gradsift" / "configs" / "tiny.yaml"
SETTINGS = ["tasks.0.n_train=32", "tasks.1.n_train=32", "seeds=[3]", "eval.tasks=true",
            "eval.generation.max_new_tokens=4", "eval.safety=[{set: builtin_harmful, n: 8}]",
            "eval.over_refusal=[{set: builtin_benign, n: 8}]"]
SUPPORT = ROOT / "tests" / "support"  # sitecustomize that lets accelerate run FSDP2 on CPU processes
FSDP_CPU = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
machine_rank: 0
main_training_function: main
mixed_precision: 'no'
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_cpu_ram_efficient_loading: false
  fsdp_offload_params: false
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: SHARDED_STATE_DICT
use_cpu: false
"""


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def _run(cmd: list[str], cwd: Path, **extra: str) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(**extra), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sets(batch: int) -> list[str]:
    out: list[str] = []
    for s in SETTINGS + [f"optim.batch_size={batch}"]:
        out += ["--set", s]
    return out


def _accelerate() -> str:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate's launcher is not installed")
    return accelerate


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference: one process, the global batch (8) on it (optim.batch_size is per optimizer step)."""
    one = tmp_path_factory.mktemp("one") / "run"
    _run([sys.executable, "-m", "gradsift", "train", str(TINY), "--output", str(one), *_sets(8)], ROOT)
    return one


def _results(path: Path) -> dict[tuple, float]:
    rows = [json.loads(line) for line in (path / "results.jsonl").read_text().splitlines()]
    keys = [(r["run"], r["stage"], r["task"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys)) and keys, "a result was written more than once"
    return dict(zip(keys, (r["value"] for r in rows)))


def _assert_same_training(one: Path, two: Path, run: str = "moderate-seed3") -> None:
    ref, got = _results(one), _results(two)
    assert set(ref) == set(got)  # every stage trained and evaluated (on the main process), once
    assert got[(run, 1, "arith", "train/steps")] == ref[(run, 1, "arith", "train/steps")] == 4
    for key in ref:  # stage 0: the same model on both sides, the same generations
        if key[1] == 0 and not key[3].endswith("runtime_s"):
            assert got[key] == ref[key], key
    assert (run, 2, "mcq", "score") in got and (run, 2, "safety/builtin_harmful", "refusal_rate") in got
    for stage in (1, 2):
        a = pd.read_parquet(one / run / f"stage_{stage}" / "selection.parquet")
        b = pd.read_parquet(two / run / f"stage_{stage}" / "selection.parquet")
        # the same global batches, the same kept samples at every step
        for step in sorted(a["step"].unique()):
            sa, sb = a[a["step"] == step], b[b["step"] == step]
            assert sorted(sa["row"]) == sorted(sb["row"]), f"stage {stage} step {step}: other batch"
            assert sorted(sa.loc[sa["kept"], "row"]) == sorted(sb.loc[sb["kept"], "row"]), f"stage {stage} step {step}"
        wa = load_file(one / run / f"stage_{stage}" / "adapter" / "adapter_model.safetensors")
        wb = load_file(two / run / f"stage_{stage}" / "adapter" / "adapter_model.safetensors")
        assert wa.keys() == wb.keys()
        for name in wa:
            assert wa[name].shape == wb[name].shape, name  # whole tensors, not one process's shard
            assert (wa[name] - wb[name]).abs().max() <= 1e-4 * (1 + wa[name].abs().max()), name
        assert (two / run / f"stage_{stage}" / "DONE").exists()


@pytest.mark.slow
def test_accelerate_launch_two_processes_matches_one(tmp_path, one_process):
    two = tmp_path / "two"
    _run([_accelerate(), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
          "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
          "-m", "gradsift", "train", str(TINY), "--output", str(two), *_sets(8)], ROOT)
    assert _results(two)[("moderate-seed3", 1, "arith", "train/sharded")] == 0.0
    _assert_same_training(one_process, two)


@pytest.mark.slow
def test_fsdp2_two_processes_matches_one(tmp_path, one_process):
    """FSDP2 (parameters sharded across the processes, DTensors): the kept samples come from a
    recomputed backward, the stage weights are gathered before saving, and the next stage and the
    evaluation start from the saved weights."""
    config = tmp_path / "fsdp_cpu.yaml"
    config.write_text(FSDP_CPU)
    two = tmp_path / "two"
    log = _run([_accelerate(), "launch", "--config_file", str(config), "--main_process_port", str(_free_port()),
                "-m", "gradsift", "train", str(TINY), "--output", str(two), *_sets(8)], ROOT,
               GRADSIFT_TEST_CPU_FSDP="1", PYTHONPATH=os.pathsep.join([str(SUPPORT), os.environ.get("PYTHONPATH", "")]))
    assert "DTensor" not in log
    got = _results(two)
    assert got[("moderate-seed3", 1, "arith", "train/sharded")] == 1.0  # really sharded, not a DDP fallback
    assert got[("moderate-seed3", 2, "mcq", "train/processes")] == 2.0
    _assert_same_training(one_process, two)

"""`accelerate launch --multi_gpu` with two CPU processes (gloo) runs the whole stage loop of `gradsift train`.

The launched run must train on the same global batches as one process with the
per-device batch doubled, keep the same samples at every step (selection over the
global batch), write every result once, and end with the same adapters.
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
TINY = ROOT / "configs" / "tiny.yaml"
SETTINGS = ["tasks.0.n_train=32", "tasks.1.n_train=32", "seeds=[3]"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sets(batch: int) -> list[str]:
    out: list[str] = []
    for s in SETTINGS + [f"optim.batch_size={batch}"]:
        out += ["--set", s]
    return out


@pytest.mark.slow
def test_accelerate_launch_two_processes_matches_one(tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate's launcher is not installed")
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "gradsift", "train", str(TINY), "--output", str(one), *_sets(8)], ROOT)
    _run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
          "-m", "gradsift", "train", str(TINY), "--output", str(two), *_sets(4)], ROOT)

    # every measurement written once, by the main process
    rows = [json.loads(line) for line in (two / "results.jsonl").read_text().splitlines()]
    keys = [(r["run"], r["stage"], r["task"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys)) and keys
    ref = {(r["run"], r["stage"], r["task"], r["metric"]): r["value"]
           for r in map(json.loads, (one / "results.jsonl").read_text().splitlines())}
    assert set(ref) == set(keys)
    got = dict(zip(keys, (r["value"] for r in rows)))
    assert got[("moderate-seed3", 1, "arith", "train/steps")] == ref[("moderate-seed3", 1, "arith", "train/steps")] == 4

    run = "moderate-seed3"
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
            assert (wa[name] - wb[name]).abs().max() <= 1e-4 * (1 + wa[name].abs().max()), name
        assert (two / run / f"stage_{stage}" / "DONE").exists()

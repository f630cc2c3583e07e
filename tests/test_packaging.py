"""The package works wherever it is installed: built as a wheel, installed into a fresh
virtual environment, run from a directory that is not the source tree."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd}: exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.mark.slow
def test_the_wheel_installs_and_runs_outside_the_source_tree(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # the wheel, built offline with the build backend already installed
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist",
          ROOT], cwd=tmp_path, env=env)
    (wheel,) = (tmp_path / "dist").glob("gradsift-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in ("gradsift/configs/demo.yaml", "gradsift/configs/tiny.yaml", "gradsift/tasks/data/arith.yaml",
                    "gradsift/data/builtin/harmful_requests.jsonl", "gradsift/organisms/data/refusals.json"):
        assert shipped in names, f"{shipped} is not in the wheel"
    assert any(n.startswith("gradsift/organisms/adapters/") and n.endswith("adapter_config.json") for n in names)

    # a fresh environment: the wheel alone, its dependencies seen through a .pth file
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=tmp_path, env=env)
    py = venv / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env)
                .stdout.strip())
    (site / "installed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], cwd=tmp_path, env=env)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([py, "-c", "import gradsift; print(gradsift.__file__)"], elsewhere, env).stdout.strip()
    assert Path(where).is_relative_to(venv), f"gradsift imported from {where}, not the installed wheel"
    gradsift = venv / "bin" / "gradsift"
    shown = _run([gradsift, "demo", "--quick", "--help"], elsewhere, env).stdout
    assert "--quick" in shown and "--output" in shown
    _run([gradsift, "run", "tiny", "--output", "runs/tiny"], elsewhere, env)
    assert (elsewhere / "runs" / "tiny" / "results.jsonl").stat().st_size > 0
    assert (elsewhere / "runs" / "tiny" / "moderate-seed0" / "stage_2" / "DONE").exists()

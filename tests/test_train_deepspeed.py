"""DeepSpeed ZeRO-2 on two CPU processes (gloo) with the SHIPPED accelerate config: the same samples
kept at every step and the same adapters as one process on the global batch.

The shipped configs/accelerate/deepspeed.yaml is used as is: its precision must not contradict a
float32 run (the precision comes from the run's config alone).
"""

from __future__ import annotations

import pytest

from test_train_launch import (  # noqa: F401 (one_process is a fixture)
    ROOT,
    TINY,
    _accelerate,
    _assert_same_training,
    _free_port,
    _results,
    _run,
    _sets,
    one_process,
)

SHIPPED = ROOT / "src" / "gradsift" / "configs" / "accelerate" / "deepspeed.yaml"


@pytest.mark.slow
def test_deepspeed_zero2_two_processes_matches_one(tmp_path, one_process):  # noqa: F811
    try:
        import deepspeed  # noqa: F401
    except Exception as exc:  # ImportError, or a build that fails at import
        pytest.skip(f"deepspeed is not importable here ({type(exc).__name__}: {exc}); pip install deepspeed")
    two = tmp_path / "two"
    _run([_accelerate(), "launch", "--config_file", str(SHIPPED), "--main_process_port", str(_free_port()),
          "-m", "gradsift", "train", str(TINY), "--output", str(two), *_sets(8)], ROOT)
    got = _results(two)
    assert got[("moderate-seed3", 1, "arith", "train/processes")] == 2.0
    _assert_same_training(one_process, two)

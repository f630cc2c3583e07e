"""Continual-learning metrics on hand-made result matrices (values worked out in comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradsift.eval.forgetting import forgetting, interference, mean_over_stages, results_to_matrix

nan = float("nan")


def test_forgetting_3x3_with_untrained_tasks_missing():
    R = [
        [80, nan, nan],  # after stage 1
        [70, 60, nan],  # after stage 2
        [75, 45, 90],  # after stage 3
    ]
    out = forgetting(R)
    # AA = (75 + 45 + 90) / 3 = 70
    assert out["AA"] == pytest.approx(70.0)
    # BWT = ((75 - 80) + (45 - 60)) / 2 = -10
    assert out["BWT"] == pytest.approx(-10.0)
    # FM: task 0 max(80, 70) - 75 = 5; task 1 max(60) - 45 = 15; mean = 10
    assert out["FM"] == pytest.approx(10.0)
    # drops: task 0: 80->70 = 10, 70->75 = -5; task 1: 60->45 = 15 -> 15
    assert out["max_drop"] == pytest.approx(15.0)


def test_forgetting_peak_after_own_stage_differs_from_bwt():
    R = np.array(
        [
            [50.0, 10.0, 5.0],
            [70.0, 40.0, 7.0],
            [60.0, 40.0, 80.0],
        ]
    )
    out = forgetting(R)
    # AA = (60 + 40 + 80) / 3 = 60
    assert out["AA"] == pytest.approx(60.0)
    # BWT = ((60 - 50) + (40 - 40)) / 2 = 5  (task 0 improved after its own stage)
    assert out["BWT"] == pytest.approx(5.0)
    # FM: task 0 max(50, 70) - 60 = 10; task 1 max(40) - 40 = 0; mean = 5
    assert out["FM"] == pytest.approx(5.0)
    # drops (j >= i only): task 0: 50->70 = -20, 70->60 = 10; task 1: 40->40 = 0 -> 10.
    # Above-diagonal entries (task 2: 5 -> 7) never count.
    assert out["max_drop"] == pytest.approx(10.0)


def test_no_drop_and_single_task():
    assert forgetting([[10, nan], [20, 30]])["max_drop"] == 0.0
    # BWT = 20 - 10 = 10, FM = max(10) - 20 = -10 (a gain counts as negative forgetting)
    out = forgetting([[10, nan], [20, 30]])
    assert out["BWT"] == pytest.approx(10.0) and out["FM"] == pytest.approx(-10.0)
    assert forgetting([[42.0]]) == {"AA": 42.0, "BWT": 0.0, "FM": 0.0, "max_drop": 0.0}


def test_bad_matrices_are_rejected():
    with pytest.raises(ValueError, match=r"R\[1\]\[0\]"):
        forgetting([[1, nan], [nan, 2]])
    with pytest.raises(ValueError, match="square"):
        forgetting([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(ValueError, match="square"):
        forgetting([])


def test_interference_matrix():
    R = [[80, 30, 20], [70, 60, 25], [75, 45, 90]]
    D = interference(R, r0=[10, 20, 30])
    expected = [
        [70, 10, -10],  # stage 1 vs r0
        [-10, 30, 5],  # stage 2 vs stage 1
        [5, -15, 65],  # stage 3 vs stage 2
    ]
    np.testing.assert_allclose(D, expected)
    D = interference([[80, nan], [70, 60]])
    assert np.isnan(D[0]).all()  # no r0: first row unknown
    assert D[1, 0] == -10 and np.isnan(D[1, 1])  # R[0][1] was not evaluated
    with pytest.raises(ValueError, match="r0"):
        interference(R, r0=[1, 2])


def test_mean_over_stages():
    assert mean_over_stages([10, 20, None, 30, nan]) == pytest.approx(20.0)
    with pytest.raises(ValueError):
        mean_over_stages([None])


def _row(stage, task, metric, value, seed=0):
    return {"run": "r", "method": "moderate", "seed": seed, "stage": stage, "task": task, "metric": metric,
            "value": value}


def test_results_to_matrix():
    order = {"dolly": "rougeL", "gsm8k": "gsm8k", "squad_v2": "squad_v2"}
    rows = [
        _row(0, "dolly", "rougeL", 20.0),
        _row(0, "gsm8k", "gsm8k", 5.0),
        _row(1, "dolly", "rougeL", 40.0),
        _row(1, "dolly", "exact", 3.0),  # another metric: ignored
        _row(1, "advbench", "asr", 12.0),  # not a task of R: ignored
        _row(2, "dolly", "rougeL", 35.0),
        _row(2, "gsm8k", "gsm8k", 30.0),
        _row(3, "squad_v2", "squad_v2", 70.0),
        _row(3, "gsm8k", "gsm8k", 25.0),
        _row(3, "dolly", "rougeL", 33.0),
    ]
    R, tasks, r0 = results_to_matrix(rows, order)
    assert tasks == ["dolly", "gsm8k", "squad_v2"]
    np.testing.assert_allclose(R, [[40, nan, nan], [35, 30, nan], [33, 25, 70]])
    np.testing.assert_allclose(r0, [20, 5, nan])
    # AA = (33 + 25 + 70)/3; BWT = ((33-40) + (25-30))/2 = -6
    out = forgetting(R)
    assert out["AA"] == pytest.approx(128 / 3) and out["BWT"] == pytest.approx(-6.0)

    R, _, r0 = results_to_matrix(rows[2:], order)
    assert r0 is None
    with pytest.raises(ValueError, match="second value"):
        results_to_matrix(rows + [_row(2, "gsm8k", "gsm8k", 1.0)], order)
    with pytest.raises(ValueError, match="mix runs"):
        results_to_matrix(rows + [_row(1, "gsm8k", "gsm8k", 1.0, seed=1)], order)
    with pytest.raises(ValueError, match="stage"):
        results_to_matrix([_row(4, "gsm8k", "gsm8k", 1.0)], order)
    with pytest.raises(ValueError, match="row 0: missing field 'value'"):
        results_to_matrix([{"stage": 1, "task": "gsm8k", "metric": "gsm8k"}], order)
    assert math.isnan(results_to_matrix([], order)[0][0, 0])

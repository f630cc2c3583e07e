"""``--seeds`` on ``gradsift train`` and ``gradsift run``: the seeds reach the validated config."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from gradsift.cli import app


class _Stop(Exception):
    pass


def _tiny() -> str:
    from gradsift.configs import resolve_config

    return str(resolve_config("tiny"))


@pytest.fixture
def captured(monkeypatch):
    seen = {}

    def fake_run_training(cfg, output_dir=None, eval_hook=None):
        seen["seeds"] = list(cfg.seeds)
        raise _Stop

    monkeypatch.setattr("gradsift.train.stages.run_training", fake_run_training)
    return seen


@pytest.mark.parametrize("command", ["train", "run"])
def test_seeds_override_the_config(command, captured):
    result = CliRunner().invoke(app, [command, _tiny(), "--seeds", "3, 4,7"])
    assert isinstance(result.exception, _Stop), result.output
    assert captured["seeds"] == [3, 4, 7]


def test_without_seeds_the_config_decides(captured):
    import yaml

    from gradsift.configs import resolve_config

    shipped = yaml.safe_load(resolve_config("tiny").read_text()).get("seeds", [0])
    result = CliRunner().invoke(app, ["train", _tiny()])
    assert isinstance(result.exception, _Stop), result.output
    assert captured["seeds"] == shipped


@pytest.mark.parametrize("bad, msg", [("a,b", "comma-separated integers"), (",", "at least one seed"),
                                      ("1,1", "repeated")])
def test_bad_seeds_are_one_line_errors(bad, msg, captured):
    result = CliRunner().invoke(app, ["train", _tiny(), "--seeds", bad])
    assert result.exit_code == 2 and msg in result.output
    assert "seeds" not in captured


def test_the_offline_study_takes_the_same_seeds(monkeypatch):
    seen = {}

    def fake_study(config, output, options, overrides=None):
        seen["seeds"] = options.seeds
        raise _Stop

    monkeypatch.setattr("gradsift.analysis.offline.run_offline_study", fake_study)
    result = CliRunner().invoke(app, ["study", "offline", _tiny(), "--seeds", "0, 2"])
    assert isinstance(result.exception, _Stop), result.output
    assert seen["seeds"] == [0, 2]
    result = CliRunner().invoke(app, ["study", "offline", _tiny(), "--seeds", "1,1"])
    assert result.exit_code == 2 and "repeated" in result.output

"""S_min <= S_max, one rule in one wording (kve_fast.plan.check_churn_range): the scheduler's settings, the
sigmas sampler's s_tmin/s_tmax, and the command line's --s-min/--s-max, which it checks before it loads the
model (each bound the model's where the option is not given)."""

from __future__ import annotations

import pytest
import torch

import kve_fast
from kve_fast import cli
from kve_fast.cli import main

# the bundled digits model's scheduler config: s_min 0.05, s_max 50
COMMANDS = {
    "sample": ["sample", "--model", "digits", "--steps", "2", "--batch-size", "1", "--device", "cpu"],
    "generate": ["generate", "--model", "digits", "--seeds", "0-1", "--steps", "2", "--device", "cpu"],
}


@pytest.fixture
def no_loading(monkeypatch):
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded despite an empty churn range")

    monkeypatch.setattr(cli, "load_for_command", load)


def _scheduler_words(**settings) -> str:
    with pytest.raises(ValueError) as caught:
        kve_fast.KarrasVeScheduler(**settings)
    return str(caught.value)


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("options, settings", [
    (["--s-min", "10", "--s-max", "1"], {"s_min": 10.0, "s_max": 1.0}),
    (["--s-min", "60"], {"s_min": 60.0, "s_max": 50}),  # above the model's s_max
    (["--s-max", "0.01"], {"s_min": 0.05, "s_max": 0.01}),  # below the model's s_min
])
def test_an_empty_churn_range_is_refused_before_the_model_loads(no_loading, tmp_path, capsys, command, options,
                                                                settings):
    """Mutation: the command's early check left out (the model loads: the test's loader fails)."""
    argv = COMMANDS[command] + options + (["--out", str(tmp_path / "x.png")] if command == "sample" else
                                          ["--outdir", str(tmp_path / "out")])
    assert main(argv) == 2
    err = capsys.readouterr().err
    given = ", ".join(o for o in options if o.startswith("--"))
    assert err == f"kve-fast: error: {given}: {_scheduler_words(**settings)}\n"
    assert not list(tmp_path.iterdir())


def test_a_churn_range_the_model_agrees_with_goes_on_to_load(monkeypatch, tmp_path):
    """The check passes a range that is not empty (the loader is reached; it stops the command here)."""
    class Loaded(Exception):
        pass

    def load(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(cli, "load_for_command", load)
    with pytest.raises(Loaded):
        main(COMMANDS["sample"] + ["--s-min", "1", "--out", str(tmp_path / "x.png")])


def test_the_sigmas_sampler_words_the_rule_as_the_scheduler():
    """Mutation: sample_karras_ve_sigmas' own wording back ("`s_tmax` must be >= `s_tmin`") -> fails."""
    with pytest.raises(ValueError) as caught:
        kve_fast.sample_karras_ve_sigmas(lambda x, s: x, torch.zeros(1, 1, 2, 2), [1.0, 0.0], s_tmin=2.0, s_tmax=1.0)
    assert str(caught.value).replace("s_tmin", "s_min").replace("s_tmax", "s_max") == \
        _scheduler_words(s_min=2.0, s_max=1.0)

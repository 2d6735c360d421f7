"""What ``kve-fast bench``'s table and plot say, read as a reader reads them: the ``n`` column names the rule a row
falls short of, and the plot's axes carry plain numbers (from synthetic results: no timing here)."""

from __future__ import annotations

import pytest

from kve_fast.benchmark import report
from kve_fast.benchmark.provenance import SHORT_CALL_S, required_repeats


def _row(ms: float, repeats: int, met) -> dict:
    return {"row": "kve_fast eager, exact noise", "kind": "eager", "noise": "exact", "status": "ok", "why": "",
            "ms_per_call": ms, "min_ms": ms, "max_ms": ms, "speedup": None, "floor_ratio": 1.01, "first_call_s": 0.1,
            "repeats": repeats, "repeat_rule_met": met, "repeat_consistent": True, "equal_eager": None,
            "equal_reference_latent": None, "equal_reference_np": None, "accuracy": None}


def test_the_repeats_column_says_the_rule_a_row_falls_short_of():
    """(mutation: the cell back to '1 (rule not met)' -> no rule in it)"""
    config = {"name": "digits b1", "rows": [_row(17.0, 1, False), _row(17.0, 5, True)]}
    cells = [line[report.COLUMNS.index("n")] for line in report.table_rows([config])]
    short, long = required_repeats(0.0), required_repeats(SHORT_CALL_S)
    assert cells == [f"1 (under the rule: {short} for calls under {SHORT_CALL_S:g} s, else {long})", "5"]
    assert short > long >= 1


def test_the_plot_labels_a_narrow_log_axis_with_plain_numbers(tmp_path, monkeypatch):
    """One batch size, 17-21 ms: matplotlib's log axis has only minor ticks there, labelled 1.7x10^1 ... by default
    (mutation: the y formatters left as they are -> those labels)."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from kve_fast.benchmark import plot

    drawn = {}
    real = plt.subplots

    def spy(*args, **kwargs):
        fig, axes = real(*args, **kwargs)
        drawn["axes"] = axes
        return fig, axes

    monkeypatch.setattr(plt, "subplots", spy)
    rows = [_row(17.0, 5, True), dict(_row(21.0, 5, True), row="kve_fast eager, fast noise", noise="fast")]
    config = {"name": "digits b1", "model": "digits", "batch_size": 1, "steps": 2, "shape": [1, 1, 8, 8],
              "floor": {"floor_ms": 19.0, "floor_note": "floor = 3 x one eager forward"}, "rows": rows}
    plot.write_plot({"configs": [config], "env": {"device": "cpu", "torch": "x", "date": "today"}},
                    str(tmp_path / "bench.png"))
    (ax,) = drawn["axes"][0]
    labels = [t.get_text() for which in (False, True) for t in ax.get_yticklabels(minor=which) if t.get_text()]
    assert labels and all(text.replace(".", "").isdigit() for text in labels), labels

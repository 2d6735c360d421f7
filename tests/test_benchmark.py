"""``kve-fast bench`` (the kve_fast/benchmark package) and bench/graph_bench.py on the CPU, with tiny sizes.

The GPU numbers come from running bench/graph_bench.py on a GPU (bench/device_speed.sh); here: the table's rows
and columns, the JSON, graphed rows reported unavailable on the CPU (and, through a stand-in runner, the
graphed-row bookkeeping), argument errors, what the table and the plot say (the ``n`` column names the rule a
row falls short of, a log axis carries plain numbers), and the model configurations of graph_bench.py and its
verdict on the speed targets.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kve_fast
from kve_fast import benchmark as kb
from kve_fast.benchmark import report as kb_report
from kve_fast.benchmark import rows as kb_rows
from kve_fast.benchmark import timing as kb_timing
from kve_fast.benchmark.provenance import SHORT_CALL_S, required_repeats

ROOT = Path(__file__).resolve().parents[1]
GRAPH_BENCH = ROOT / "bench" / "graph_bench.py"


def parse(argv):
    parser = argparse.ArgumentParser(prog="kve-fast bench")
    kb.add_arguments(parser)
    return parser.parse_args(argv)


def bench(argv, capsys):
    rc = kb.run(parse(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def table_lines(out: str) -> list[dict[str, str]]:
    """The per-call table's rows, as {column: cell}; the columns are ``COLUMNS`` less those empty in every row."""
    lines = out.split("### Per call", 1)[1].strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert [c for c in kb_report.COLUMNS if c in header] == header and header[:2] == ["config", "row"]
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return rows


@pytest.fixture(scope="module")
def rgb_model(tmp_path_factory):
    """A 3-channel 8x8 UNet folder, so diffusers' pipeline (3 channels only) can run beside ours."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    folder = tmp_path_factory.mktemp("rgb") / "unet"
    unet.save_pretrained(folder)
    return str(folder)


def test_digits_table_json_and_unavailable_rows(tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    rc, out, err = bench(["--model", "digits", "--steps", "2", "--batch-size", "2", "--repeats", "1", "--device", "cpu",
                          "--json", str(out_json)], capsys)
    assert rc == 0, err
    rows = table_lines(out)
    # only what can run here is in the table: no diffusers row (1 channel), no graphed rows (the CPU) ...
    assert [r["row"] for r in rows] == ["kve_fast eager, exact noise", "kve_fast eager, fast noise"]
    assert rows[0]["config"].startswith("digits b2 (8x8x1") and rows[1]["config"] == ""
    eager_exact, eager_fast = rows
    for row in (eager_exact, eager_fast):
        assert float(row["ms/call"]) > 0 and float(row["/ floor"]) > 0 and row["first image"].endswith(" s")
        assert row["n"] == "1 (under the rule: 5 for calls under 2 s, else 3)"  # --repeats 1: the table says so
    assert eager_fast["= diffusers"] == "n/a (own noise stream)"
    per_call = out.split("### Per call", 1)[1].split("\n\n")[1]
    assert "vs diffusers" not in per_call and "= eager" not in per_call  # ... and no columns empty in every row
    assert "graphed" not in out.split("### Floors", 1)[1].split("### Per call")[0]  # nor in the floors
    # ... but one line says why each left-out row is not there
    (left,) = [line for line in out.splitlines() if line.startswith("Left out: ")]
    assert "diffusers KarrasVePipeline: diffusers' KarrasVePipeline hard-codes 3 channels" in left and "has 1" in left
    assert "kve_fast graphed, exact noise and kve_fast graphed, fast noise: CUDA graphs need a CUDA device" in left
    # no CUDA notes on the CPU, and no targets for rows that could not run
    for cuda_only in ("synchronize", "CUDA events", "TF32", "### Targets", "replayed from a CUDA graph"):
        assert cuda_only not in out, cuda_only
    assert "### Floors" in out and "(3 x eager)" in out  # on the CPU the floor is 2N - 1 = 3 eager forwards
    data = json.loads(out_json.read_text())
    (config,) = data["configs"]
    assert config["model_calls"] == 3 and config["batch_size"] == 2 and config["shape"] == [2, 1, 8, 8]
    assert config["floor"]["floor_kind"] == "eager" and config["floor"]["calls"] == 3
    by_row = {r["row"]: r for r in config["rows"]}
    assert by_row["kve_fast eager, exact noise"]["status"] == "ok"
    assert by_row["kve_fast eager, exact noise"]["repeats"] == 1
    assert by_row["kve_fast eager, exact noise"]["repeat_consistent"] is True
    assert by_row["kve_fast graphed, exact noise"]["status"] == "unavailable"
    assert data["env"]["torch"] == torch.__version__ and data["env"]["date"] and data["env"]["threads"] >= 1
    assert "== digits b2" in err and "== digits b2" not in out  # progress on stderr, the table on stdout ...
    assert "ms/call" not in err and eager_exact["ms/call"] not in err and "Left out" not in err  # ... results once


def test_reference_row_bit_exact_on_cpu(rgb_model, tmp_path, capsys):
    md = tmp_path / "bench.md"
    rc, out, err = bench(["--model", rgb_model, "--steps", "2", "--repeats", "1", "--device", "cpu", "--noise", "exact",
                          "--backends", "eager", "--markdown", str(md), "--json", str(tmp_path / "b.json")], capsys)
    assert rc == 0, err
    rows = table_lines(out)
    assert [r["row"] for r in rows] == ["diffusers KarrasVePipeline", "kve_fast eager, exact noise"]
    assert rows[0]["vs diffusers"] == "1.00x"
    assert rows[1]["= diffusers"] == "latent yes, np yes"
    assert rows[1]["vs diffusers"].endswith("x")
    assert "Left out" not in out
    assert md.read_text() == out
    row = json.loads((tmp_path / "b.json").read_text())["configs"][0]["rows"][1]
    assert row["equal_reference_latent"]["bitwise"] and row["equal_reference_np"]["equal"]


def test_bad_arguments(tmp_path, capsys):
    for argv in (["--steps", "1"], ["--batch-size", "0"], ["--device", "gpu"], ["--noise", "slow"],
                 ["--backends", "compiled"], ["--repeats", "x"]):
        with pytest.raises(SystemExit) as info:
            parse(argv)
        assert info.value.code == 2
    capsys.readouterr()
    cases = [(["--model", str(tmp_path / "nowhere")], "--model"),
             (["--json", str(tmp_path / "missing" / "b.json")], "--json"),
             (["--markdown", str(tmp_path)], "--markdown")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device: CUDA was asked for"))
    for argv, message in cases:
        rc, out, err = bench(argv, capsys)
        assert rc == 2 and out == ""
        assert err.startswith("kve-fast: error: ") and message in err and len(err.strip().splitlines()) == 1


def test_plot_draws_ms_per_call_and_the_floor_per_batch_size(tmp_path, capsys, monkeypatch):
    import matplotlib.pyplot as plt

    drawn = {}
    real = plt.subplots

    def spy(*args, **kwargs):  # keep the axes to read back what was drawn
        fig, axes = real(*args, **kwargs)
        drawn["axes"] = axes
        return fig, axes

    monkeypatch.setattr(plt, "subplots", spy)
    png = tmp_path / "bench.png"
    rc, out, err = bench(["--model", "digits", "--steps", "2", "--batch-size", "1", "2", "--repeats", "1", "--device",
                          "cpu", "--noise", "exact", "--backends", "eager", "--plot", str(png),
                          "--json", str(tmp_path / "b.json")], capsys)
    assert rc == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob(".*.tmp"))
    (ax,) = drawn["axes"][0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    configs = json.loads((tmp_path / "b.json").read_text())["configs"]
    row = lines["kve_fast eager, exact noise"]
    assert list(row.get_xdata()) == [1, 2]
    assert list(row.get_ydata()) == [next(r["ms_per_call"] for r in c["rows"] if r["row"] == "kve_fast eager, exact noise")
                                     for c in configs]
    (floor,) = [line for label, line in lines.items() if label.startswith("floor")]
    assert list(floor.get_ydata()) == [c["floor"]["floor_ms"] for c in configs] and "3 x one eager forward" in floor.get_label()
    assert ax.get_xlabel() == "batch size" and "ms per call" in ax.get_ylabel()


def test_plot_is_refused_before_any_work_without_matplotlib_or_with_a_bad_name(tmp_path, capsys, monkeypatch):
    import importlib.util

    rc, out, err = bench(["--plot", str(tmp_path / "bench.txt")], capsys)
    assert rc == 2 and err.startswith("kve-fast: error: --plot:") and ".png" in err and out == ""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setattr(kb_rows, "bench_pipeline", lambda *a, **k: pytest.fail("measured despite the error"))
    rc, out, err = bench(["--plot", str(tmp_path / "bench.png")], capsys)
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "--plot needs matplotlib" in err and "pip install 'kve_fast[plot]'" in err
    assert not (tmp_path / "bench.png").exists()


# ---- what the table and the plot say, read as a reader reads them (synthetic results: no timing) ----------

def _row(ms: float, repeats: int, met) -> dict:
    return {"row": "kve_fast eager, exact noise", "kind": "eager", "noise": "exact", "status": "ok", "why": "",
            "ms_per_call": ms, "min_ms": ms, "max_ms": ms, "speedup": None, "floor_ratio": 1.01, "first_call_s": 0.1,
            "repeats": repeats, "repeat_rule_met": met, "repeat_consistent": True, "equal_eager": None,
            "equal_reference_latent": None, "equal_reference_np": None, "accuracy": None}


def test_the_repeats_column_says_the_rule_a_row_falls_short_of():
    """(mutation: the cell back to '1 (rule not met)' -> no rule in it)"""
    config = {"name": "digits b1", "rows": [_row(17.0, 1, False), _row(17.0, 5, True)]}
    cells = [line[kb_report.COLUMNS.index("n")] for line in kb_report.table_rows([config])]
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


def test_option_help_reads_right():
    from kve_fast.cli import _HelpFormatter

    parser = argparse.ArgumentParser(prog="kve-fast bench", formatter_class=_HelpFormatter)
    kb.add_arguments(parser)
    text = " ".join(parser.format_help().split())
    assert "--reference, --no-reference also time diffusers' own pipeline" in text and "(default: True)" in text
    assert "--no-reference (default" not in text and "skip diffusers" not in text
    assert parse(["--no-reference"]).reference is False and parse([]).reference is True


def test_import_is_light():
    code = ("import argparse, sys, kve_fast.benchmark as kb; p = argparse.ArgumentParser(); kb.add_arguments(p); "
            "p.parse_args(['--steps', '3']); print(sorted(m for m in ('torch', 'diffusers', 'numpy') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_the_benchmark_imports_nothing_that_runs_back_up_to_the_test_support():
    """``kve-fast bench`` imports no test support (kve_fast.accuracy imports testing, which imports oracle): the
    yardstick it gates accuracy with comes from kve_fast.precision (mutation: rows.py's yardstick from
    kve_fast.accuracy again)."""
    import ast

    banned = {"accuracy", "testing", "oracle"}
    for path in sorted((ROOT / "kve_fast" / "benchmark").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = {(node.module or "").split(".")[-1]} | {a.name for a in node.names}
                assert not names & banned, f"{path.name}:{node.lineno} imports {names & banned}"


class _StandInGraphs:
    """kve_fast.graphs' API as the benchmark uses it: clear_graphs() and graph_info()["captures"]."""

    def __init__(self):
        self.captures, self.clears = 0, 0

    def clear_graphs(self):
        self.captures, self.clears = 0, self.clears + 1

    def graph_info(self):
        return {"captures": self.captures}


def _graph_pipe(graphs: _StandInGraphs, fail_with: BaseException | None = None):
    """A pipeline with the graph runner's switch: graphed exact calls "capture" once and run eagerly (same
    bits); graphed fast calls refuse as the runner does (a ValueError), or raise ``fail_with``."""

    class GraphPipe(kve_fast.KarrasVePipeline):
        def __call__(self, *args, cuda_graph="auto", **kwargs):
            if cuda_graph is True:
                if fail_with is not None:
                    raise fail_with
                if kwargs.get("noise") == "fast":
                    raise ValueError("`cuda_graph`=True but fast noise is not captured yet")
                graphs.captures = max(graphs.captures, 1)
            return super().__call__(*args, **kwargs)

    unet, scheduler = kve_fast.load_model("digits")
    pipe = GraphPipe(unet, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_graphed_rows_bookkeeping(monkeypatch):
    graphs = _StandInGraphs()
    monkeypatch.setattr(kb_rows, "_graphs_module", lambda: graphs)
    monkeypatch.setattr(kb_rows, "graph_support", lambda pipe, device: (True, ""))
    pipe = _graph_pipe(graphs)
    assert kb_rows.supports_cuda_graph(pipe) and kb_rows.supports_cuda_graph(type(pipe))
    rec = kb.bench_pipeline(pipe, name="digits b2", batch_size=2, steps=2, device=torch.device("cpu"),
                            policy=kb.RepeatPolicy(fixed=1), log=lambda *a: None)
    rows = {(r["kind"], r["noise"]): r for r in rec["rows"]}
    exact = rows[("graphed", "exact")]
    assert exact["status"] == "ok" and exact["equal_eager"]["equal"] and exact["equal_eager"]["bitwise"]
    assert exact["captures_before"] == 0 and exact["captures_after"] == 1
    assert exact["floor_ratio"] > 0 and exact["repeat_consistent"]
    fast = rows[("graphed", "fast")]
    assert fast["status"] == "unavailable" and fast["why"].startswith("graphs unavailable: ValueError")
    assert graphs.clears >= 2  # before each graphed first call (and once at the end)
    text = kb.format_markdown({"configs": [rec]})
    assert any(line.startswith("- digits b2: ") and "x floor (EAGER floor)" in line for line in text.splitlines())
    assert kb.exactness_failures([rec]) == []

    # Anything but the runner's refusal is a failure, reported as such, and the other rows still run.
    pipe = _graph_pipe(graphs, fail_with=RuntimeError("CUDA error: operation not permitted when stream is capturing"))
    rec = kb.bench_pipeline(pipe, name="digits b2", batch_size=2, steps=2, device=torch.device("cpu"),
                            noises=("exact",), reference=False, policy=kb.RepeatPolicy(fixed=1), log=lambda *a: None)
    rows = {(r["kind"], r["noise"]): r for r in rec["rows"]}
    assert rows[("eager", "exact")]["status"] == "ok"
    assert rows[("graphed", "exact")]["status"] == "failed" and "RuntimeError" in rows[("graphed", "exact")]["why"]
    assert rec["status"] == "partial"


def test_budget_skips_a_configuration():
    pipe = kve_fast.load_pipeline("digits")
    import time

    rec = kb.bench_pipeline(pipe, name="late", batch_size=1, steps=2, device=torch.device("cpu"),
                            deadline=time.monotonic() - 1, log=lambda *a: None)
    assert rec["status"] == "skipped" and all(r["status"] == "skipped" for r in rec["rows"])
    assert "--budget-s" in rec["notes"][0]
    assert "skipped: about" in kb.format_markdown({"configs": [rec]})


def test_repeat_policy_and_verdicts():
    policy = kb.RepeatPolicy(row_seconds=5, min_repeats=1, max_repeats=5)
    # the repeat rule: at least 5 timed calls where a call takes under 2 s, else at least 3, whatever fits
    assert [policy.repeats(s) for s in (0.1, 1.2, 2.6, 20.0)] == [5, 5, 3, 3]
    assert kb.RepeatPolicy(fixed=3).repeats(100.0) == 3
    eq = {"equal": True, "mismatches": 0, "elements": 4, "bitwise": True}
    row = dict(kb_rows._row_record("graphed", "exact"), status="ok", ms_per_call=103.0, first_call_s=0.5, repeats=5,
               floor_ratio=1.03, speedup=5.1, equal_eager=eq, equal_reference_latent=eq, repeat_consistent=True)
    config = {"name": "tiny-b1", "rows": [row], "floor": {"floor_kind": "graphed"}}
    (line,) = kb_report.verdicts([config])
    assert "1.030 x floor (target <= 1.05: met)" in line and "first image 0.50 s" in line
    assert "bit-identical: yes (2 checks)" in line
    row.update(floor_ratio=1.2, first_call_s=4.0, equal_eager=dict(eq, equal=False, mismatches=3, bitwise=False))
    (line,) = kb_report.verdicts([config])
    assert "NOT met" in line and "bit-identical: NO" in line
    assert kb.exactness_failures([config]) == ["tiny-b1 / kve_fast graphed, exact noise: equal_eager"]
    assert kb_timing.compare(torch.tensor([0.0]), torch.tensor([-0.0])) == {"equal": True, "mismatches": 0, "elements": 1,
                                                                    "bitwise": False}
    nan = torch.tensor([float("nan"), 1.0])
    assert kb_timing.compare(nan, nan.clone())["equal"]


# ---- bench/graph_bench.py ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def graph_bench():
    spec = importlib.util.spec_from_file_location("graph_bench", GRAPH_BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_graph_bench_help():
    res = subprocess.run([sys.executable, str(GRAPH_BENCH), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "--quick" in res.stdout and "--budget-s" in res.stdout and "celebahq256-b8" in res.stdout


def test_graph_bench_models(graph_bench):
    gb = graph_bench
    assert set(gb.QUICK) <= set(gb.CONFIGS) and {m for m, _ in gb.CONFIGS.values()} == set(gb.MODELS)
    assert [(m, b) for m, b in gb.CONFIGS.values()] == [("tiny", 1), ("tiny", 64), ("ncsnpp", 1), ("ncsnpp", 64),
                                                         ("celebahq256", 1), ("celebahq256", 8), ("ncsnpp16", 2)]
    tiny = gb.tiny_unet()
    assert sum(p.numel() for p in tiny.parameters()) == gb.MODELS["tiny"][1]
    assert tiny.config.sample_size == 32 and tiny.config.in_channels == 3
    assert tiny(torch.zeros(1, 3, 32, 32), torch.tensor(0.5)).sample.shape == (1, 3, 32, 32)
    again = gb.tiny_unet()
    assert all(torch.equal(a, b) for a, b in zip(tiny.parameters(), again.parameters()))  # the seed is fixed
    for name in ("ncsnpp", "celebahq256"):  # large: built on the meta device (no memory, no init)
        build, params, size = gb.MODELS[name]
        unet = build("meta")
        assert next(unet.parameters()).device.type == "meta"
        assert sum(p.numel() for p in unet.parameters()) == params
        assert unet.config.sample_size == size and unet.config.time_embedding_type == "fourier"
        assert any("Skip" in t for t in unet.config.down_block_types)
    assert abs(gb.MODELS["celebahq256"][1] - 65.6e6) < 0.05e6 and abs(gb.MODELS["ncsnpp"][1] - 61.9e6) < 0.05e6


def test_graph_bench_runs_on_cpu(tmp_path):
    """The whole script, end to end, as a CPU smoke test: one small configuration, 2 steps."""
    res = subprocess.run([sys.executable, str(GRAPH_BENCH), "--device", "cpu", "--configs", "tiny-b1", "--steps", "2",
                          "--repeats", "1", "--no-fast", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, OUT=""))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads((tmp_path / "graph_bench.json").read_text())
    (config,) = data["configs"]
    rows = {r["row"]: r for r in config["rows"]}
    assert rows["diffusers KarrasVePipeline"]["status"] == "ok"
    assert rows["kve_fast eager, exact noise"]["equal_reference_latent"]["equal"]
    assert rows["kve_fast graphed, exact noise"]["status"] == "unavailable"
    assert data["settings"]["configs"] == ["tiny-b1"] and data["env"]["command"]
    assert (tmp_path / "graph_bench.md").read_text().count("tiny-b1 (32x32x3, 1.0 M)") == 2
    # the table, then the total, then the verdict, last
    assert res.stdout.index("### Per call") < res.stdout.rindex("\ntotal ")
    assert res.stdout.rstrip().splitlines()[-1].startswith("graph_bench: PASS")


def test_graph_bench_targets_need_a_measured_row_its_accuracy_and_a_graphed_floor():
    """graph_bench's verdict on the speed script's targets: met only with the speed-up, the floor ratio against the
    graphed forward, and the accuracy gate all in hand (mutations: the accuracy gate dropped -> the inaccurate row
    is met; the floor's kind not read -> an eager floor meets the floor target; an unavailable row met)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        gb = importlib.import_module("graph_bench")
    finally:
        sys.path.pop(0)

    def verdict(floor_kind="graphed", **row):
        r = {"kind": "graphed", "noise": "fast", "row": "graphed fast", "status": "ok", "speedup": 5.0,
             "floor_ratio": 1.01, "floor": "f", "accuracy": {"ok": True}, **row}
        c = {"name": "ncsnpp-b64", "precision": {"label": "bf16"}, "floors": {"f": {"floor_kind": floor_kind}},
             "rows": [r, {**r, "noise": "exact", "speedup": 0.1}]}
        return gb.target_results([c], {"ncsnpp-b64": {"speedup": 4.5, "floor_ratio": 1.05}})[0]["met"]

    assert verdict() is True
    assert verdict(speedup=4.4) is False and verdict(floor_ratio=1.06) is False
    assert verdict(accuracy={"ok": False}) is False and verdict(accuracy=None) is False
    assert verdict(floor_kind="eager") is None and verdict(status="unavailable") is None
    assert gb.target_results([], {"ncsnpp-b64": {"speedup": 4.5}})[0]["met"] is None
    assert gb._measured({"speedup": 2.5, "floor_ratio": None, "accuracy_ok": True}).startswith("speedup 2.50x, n/a")


# ---- low precision: bf16 rows against diffusers' float32 ------------------------------------------

def _rgb_pipe(seed=0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    pipe = kve_fast.KarrasVePipeline(unet, kve_fast.KarrasVeScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_bench_pipeline_bf16_on_cpu():
    pipe = _rgb_pipe()
    unet = pipe.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    rec = kb.bench_pipeline(pipe, name="rgb b2", batch_size=2, steps=2, device=torch.device("cpu"),
                            unet_dtype=torch.bfloat16, policy=kb.RepeatPolicy(fixed=1), log=lambda *a: None)
    # The caller's UNet: the same object, float32, bit-identical.
    assert pipe.unet is unet
    assert all(p.dtype == torch.float32 for p in unet.parameters())
    assert all(torch.equal(before[k], v) and v.dtype == before[k].dtype for k, v in unet.state_dict().items())

    assert rec["precision"]["label"] == "bf16" and rec["precision"]["unet_dtype"] == "bfloat16"
    assert rec["precision"]["converted_copy"] and rec["precision"]["tf32"] is False
    floor = rec["floor"]
    assert floor["dtype"] == "bfloat16" and floor["label"] == "bf16" and floor["floor_kind"] == "eager"
    assert floor["floor_note"].startswith("floor (bf16) = 3 x one eager forward")
    assert [r["row"] for r in rec["rows"]] == [
        "diffusers KarrasVePipeline (fp32 UNet)", "kve_fast eager, exact noise, bf16 UNet",
        "kve_fast eager, fast noise, bf16 UNet", "kve_fast graphed, exact noise, bf16 UNet",
        "kve_fast graphed, fast noise, bf16 UNet"]
    rows = {(r["kind"], r["noise"]): r for r in rec["rows"]}
    ref, exact, fast = rows[("reference", "exact")], rows[("eager", "exact")], rows[("eager", "fast")]
    assert ref["status"] == exact["status"] == fast["status"] == "ok"
    assert "rel_rms_reference" not in ref
    # Bits cannot match diffusers' float32 run: a relative RMS difference instead of equality checks.
    assert exact["equal_reference_latent"] is None and exact["equal_reference_np"] is None
    rel = exact["rel_rms_reference"]
    assert rel["of"] == "latent" and math.isfinite(rel["value"]) and 0 < rel["value"] < 0.05
    assert fast["rel_rms_reference"] is None  # its own noise stream
    assert exact["speedup"] > 0 and exact["floor_ratio"] > 0 and exact["repeat_consistent"]
    assert rows[("graphed", "exact")]["status"] == "unavailable"
    assert kb.exactness_failures([rec]) == []

    text = kb.format_markdown({"configs": [rec]})
    assert "**Low precision (bf16):**" in text and "float32 UNet" in text
    assert "| bf16 | " in text and "(3 x eager)" in text  # the floor's forward is the row's: bf16
    table = {r["row"]: r for r in table_lines(text)}
    assert table["kve_fast eager, exact noise, bf16 UNet"]["= diffusers"] == (
        f"rel. RMS {rel['value']:.2e} (latent; bf16: not bitwise)")
    assert table["kve_fast eager, fast noise, bf16 UNet"]["= diffusers"] == "n/a (own noise stream)"
    assert "### Targets (bf16, graphed, fast noise)" in text and "### Targets (graphed, exact noise)" not in text
    assert json.loads(kb_report.to_json(rec))["rows"][1]["rel_rms_reference"]["value"] == rel["value"]


def test_bench_pipeline_default_has_no_precision_fields():
    pipe = _rgb_pipe()
    for dtype in (None, torch.float32):
        rec = kb.bench_pipeline(pipe, name="rgb b1", batch_size=1, steps=2, device=torch.device("cpu"), unet_dtype=dtype,
                                noises=("exact",), kinds=("eager",), policy=kb.RepeatPolicy(fixed=1), log=lambda *a: None)
        assert "precision" not in rec and set(rec["floor"]) == {
            "calls", "forward_eager_ms", "forward_eager_n", "forward_eager_min_ms", "forward_eager_max_ms", "floor_ms",
            "floor_kind", "floor_note", "dtype", "fir", "layout", "tf32"}  # the forward the floor timed, as its row's
        assert {k: rec["floor"][k] for k in ("dtype", "fir", "layout", "tf32")} == {
            "dtype": "float32", "fir": None, "layout": "contiguous", "tf32": False}
        assert [r["row"] for r in rec["rows"]] == ["diffusers KarrasVePipeline", "kve_fast eager, exact noise"]
        assert "rel_rms_reference" not in rec["rows"][1] and rec["rows"][1]["equal_reference_latent"]["bitwise"]
        assert "Low precision" not in kb.format_markdown({"configs": [rec]})


def test_bench_pipeline_precision_arguments():
    pipe = _rgb_pipe()
    common = dict(name="x", batch_size=1, steps=2, device=torch.device("cpu"), log=lambda *a: None)
    with pytest.raises(TypeError):
        kb.bench_pipeline(pipe, unet_dtype="bf16", **common)
    with pytest.raises(ValueError):
        kb.bench_pipeline(pipe, unet_dtype=torch.float64, **common)
    with pytest.raises(TypeError):
        kb.bench_pipeline(pipe, tf32=1, **common)
    pipe.unet.to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32 UNet"):
        kb.bench_pipeline(pipe, unet_dtype=torch.bfloat16, **common)
    assert kb_timing.precision_label(None) is None and kb_timing.precision_label(torch.float32) is None
    assert kb_timing.precision_label(torch.bfloat16) == "bf16" and kb_timing.precision_label(torch.float16, True) == "fp16 + TF32"
    assert kb_timing.precision_label(None, True) == "fp32 + TF32"
    assert kb_rows.row_label("graphed", "fast", "fp32 + TF32") == "kve_fast graphed, fast noise, fp32 UNet + TF32"
    assert kb_timing.relative_rms(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 2.0])) == pytest.approx(1 / math.sqrt(5))


def test_bf16_graphed_rows_and_issue_targets(monkeypatch):
    """Graphed bf16 rows (through the stand-in runner): still compared bit for bit with eager ones; the targets."""
    graphs = _StandInGraphs()
    monkeypatch.setattr(kb_rows, "_graphs_module", lambda: graphs)
    monkeypatch.setattr(kb_rows, "graph_support", lambda pipe, device: (True, ""))
    pipe = _graph_pipe(graphs)
    rec = kb.bench_pipeline(pipe, name="digits b2", batch_size=2, steps=2, device=torch.device("cpu"),
                            unet_dtype=torch.bfloat16, policy=kb.RepeatPolicy(fixed=1), log=lambda *a: None)
    assert all(p.dtype == torch.float32 for p in pipe.unet.parameters())
    rows = {(r["kind"], r["noise"]): r for r in rec["rows"]}
    exact = rows[("graphed", "exact")]
    assert exact["status"] == "ok" and exact["equal_eager"]["equal"] and exact["equal_eager"]["bitwise"]
    assert rows[("graphed", "fast")]["status"] == "unavailable"
    assert graphs.clears >= 2
    assert kb.exactness_failures([rec]) == []
    text = kb.format_markdown({"configs": [rec], "targets": {"digits b2": {"speedup": 4.5, "floor_ratio": 1.05}},
                               "targets_source": "issue 12"})
    assert "### Targets (bf16, graphed, fast noise; issue 12 for digits b2)" in text
    lines = [line for line in text.splitlines() if line.startswith("- digits b2, kve_fast graphed")]
    assert len(lines) == 2
    assert "exact noise, bf16 UNet: " in lines[0] and "graphed = eager: yes" in lines[0]
    assert lines[0].endswith("(for information)")
    assert "fast noise, bf16 UNet: unavailable" in lines[1] and "targets NOT met (not measured)" in lines[1]

    # The verdicts on measured numbers.
    row = dict(kb_rows._row_record("graphed", "fast", precision="bf16"), status="ok", ms_per_call=100.0, first_call_s=0.5,
               repeats=1, floor_ratio=1.03, speedup=4.8, repeat_consistent=True)
    config = {"name": "ncsnpp-b64", "rows": [row], "precision": {"label": "bf16"},
              "floor": {"floor_kind": "graphed", "label": "bf16, FIR on Triton"}}
    targets = {"ncsnpp-b64": {"speedup": 4.5, "floor_ratio": 1.05}, "celebahq256-b8": {"speedup": 2.0}}
    (line,) = kb_report.precision_verdicts([config], targets)
    assert "4.80x diffusers (fp32) (target >= 4.5x: met)" in line
    assert "1.030 x the floor (bf16, FIR on Triton) (target <= 1.05: met)" in line
    row.update(speedup=4.2, floor_ratio=1.2)
    (line,) = kb_report.precision_verdicts([config], targets)
    assert "(target >= 4.5x: NOT met)" in line and "(target <= 1.05: NOT met)" in line
    config["name"] = "celebahq256-b8"
    (line,) = kb_report.precision_verdicts([config], targets)
    assert "(target >= 2x: met)" in line and "no floor target for this configuration" in line
    assert kb_report.verdicts([config]) == []  # the exact-path verdicts skip low-precision configurations


def test_bench_cli_unet_dtype(rgb_model, tmp_path, capsys):
    args = parse(["--unet-dtype", "bf16", "--tf32"])
    assert args.unet_dtype == "bf16" and args.tf32 is True
    assert parse([]).unet_dtype == "fp32" and parse([]).tf32 is False
    with pytest.raises(SystemExit):
        parse(["--unet-dtype", "fp8"])
    capsys.readouterr()
    out_json = tmp_path / "b.json"
    rc, out, err = bench(["--model", rgb_model, "--steps", "2", "--repeats", "1", "--device", "cpu", "--noise", "exact",
                          "--backends", "eager", "--unet-dtype", "bf16", "--json", str(out_json)], capsys)
    assert rc == 0, err
    rows = table_lines(out)
    assert [r["row"] for r in rows] == ["diffusers KarrasVePipeline (fp32 UNet)", "kve_fast eager, exact noise, bf16 UNet"]
    assert rows[1]["= diffusers"].startswith("rel. RMS ") and "bf16: not bitwise" in rows[1]["= diffusers"]
    assert "kve-fast bench:" in out and "(bf16)" in out.splitlines()[0]
    data = json.loads(out_json.read_text())
    assert data["settings"]["unet_dtype"] == "bf16" and data["configs"][0]["precision"]["label"] == "bf16"


def test_graph_bench_bf16_runs_on_cpu(tmp_path, graph_bench):
    assert graph_bench.output_suffix("fp32") == "" and graph_bench.output_suffix("bf16") == "_bf16"
    assert graph_bench.output_suffix("fp32", True) == "_tf32" and graph_bench.output_suffix("bf16", True) == "_bf16_tf32"
    assert graph_bench.ISSUE12_TARGETS["ncsnpp-b64"] == {"speedup": 4.5, "floor_ratio": 1.05}
    assert graph_bench.ISSUE12_TARGETS["celebahq256-b8"]["speedup"] == 2.0
    res = subprocess.run([sys.executable, str(GRAPH_BENCH), "--device", "cpu", "--configs", "tiny-b1", "--steps", "2",
                          "--repeats", "1", "--no-fast", "--unet-dtype", "bf16", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, OUT=""))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert not (tmp_path / "graph_bench.json").exists()  # the fp32 results are not overwritten
    data = json.loads((tmp_path / "graph_bench_bf16.json").read_text())
    assert data["settings"]["unet_dtype"] == "bf16" and data["targets_source"] == "issues 12 and 20"
    (config,) = data["configs"]
    rows = {r["row"]: r for r in config["rows"]}
    assert rows["diffusers KarrasVePipeline (fp32 UNet)"]["status"] == "ok"
    rel = rows["kve_fast eager, exact noise, bf16 UNet"]["rel_rms_reference"]["value"]
    assert 0 < rel < 0.05
    assert config["floor"]["label"] == "bf16"
    md = (tmp_path / "graph_bench_bf16.md").read_text()
    assert md.startswith("## graph_bench (bf16)") and "**Low precision (bf16):**" in md
    assert "### Targets (bf16, graphed, fast noise; issues 12 and 20 for ncsnpp-b64, celebahq256-b8)" in md

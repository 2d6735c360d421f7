"""``kve-fast bench`` (kve_fast/benchmark.py) and bench/graph_bench.py on the CPU, with tiny sizes.

The GPU numbers come from running bench/graph_bench.py on a GPU (bench/run_gpu.sh); here: the table's rows
and columns, the JSON, graphed rows reported unavailable on the CPU (and, through a stand-in runner, the
graphed-row bookkeeping), argument errors, and the model configurations of graph_bench.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kve_fast
from kve_fast import benchmark as kb

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


def table_lines(out: str) -> list[list[str]]:
    """The per-call table's rows, as cells."""
    lines = out.split("### Per call", 1)[1].strip().splitlines()
    assert lines[0] == "| " + " | ".join(kb.COLUMNS) + " |"
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
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
    assert [r[1] for r in rows] == list(kb.ROW_LABELS.values())
    assert rows[0][0].startswith("digits b2 (8x8x1")
    ref, eager_exact, eager_fast, graphed_exact, graphed_fast = rows
    assert "unavailable" in ref[2] and "3 channels" in ref[2] and "has 1" in ref[2]
    for row in (eager_exact, eager_fast):
        assert float(row[2]) > 0 and float(row[4]) > 0 and row[5].endswith(" s") and row[6] == "1"
    assert eager_fast[7] == "n/a (own noise stream)"
    for row in (graphed_exact, graphed_fast):
        assert row[2].startswith("unavailable: graphs unavailable") and "CUDA" in row[2]
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
    assert data["env"]["torch"] == torch.__version__ and data["env"]["date"]
    assert "== digits b2" in err and "== digits b2" not in out  # progress on stderr, the table on stdout


def test_reference_row_bit_exact_on_cpu(rgb_model, tmp_path, capsys):
    md = tmp_path / "bench.md"
    rc, out, err = bench(["--model", rgb_model, "--steps", "2", "--repeats", "1", "--device", "cpu", "--noise", "exact",
                          "--backends", "eager", "--markdown", str(md), "--json", str(tmp_path / "b.json")], capsys)
    assert rc == 0, err
    rows = table_lines(out)
    assert [r[1] for r in rows] == ["diffusers KarrasVePipeline", "kve_fast eager, exact noise"]
    assert rows[0][3] == "1.00x"
    assert rows[1][7] == "latent yes, np yes"
    assert rows[1][3].endswith("x")
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


def test_import_is_light():
    code = ("import argparse, sys, kve_fast.benchmark as kb; p = argparse.ArgumentParser(); kb.add_arguments(p); "
            "p.parse_args(['--steps', '3']); print(sorted(m for m in ('torch', 'diffusers', 'numpy') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


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
    monkeypatch.setattr(kb, "_graphs_module", lambda: graphs)
    monkeypatch.setattr(kb, "graph_support", lambda pipe, device: (True, ""))
    pipe = _graph_pipe(graphs)
    assert kb.supports_cuda_graph(pipe) and kb.supports_cuda_graph(type(pipe))
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
    assert [policy.repeats(s) for s in (0.1, 1.2, 2.6, 20.0)] == [5, 4, 1, 1]
    assert kb.RepeatPolicy(fixed=3).repeats(100.0) == 3
    eq = {"equal": True, "mismatches": 0, "elements": 4, "bitwise": True}
    row = dict(kb._row_record("graphed", "exact"), status="ok", ms_per_call=103.0, first_call_s=0.5, repeats=5,
               floor_ratio=1.03, speedup=5.1, equal_eager=eq, equal_reference_latent=eq, repeat_consistent=True)
    config = {"name": "tiny-b1", "rows": [row], "floor": {"floor_kind": "graphed"}}
    (line,) = kb.verdicts([config])
    assert "1.030 x floor (target <= 1.05: met)" in line and "first image 0.50 s" in line
    assert "bit-identical: yes (2 checks)" in line
    row.update(floor_ratio=1.2, first_call_s=4.0, equal_eager=dict(eq, equal=False, mismatches=3, bitwise=False))
    (line,) = kb.verdicts([config])
    assert "NOT met" in line and "bit-identical: NO" in line
    assert kb.exactness_failures([config]) == ["tiny-b1 / kve_fast graphed, exact noise: equal_eager"]
    assert kb.compare(torch.tensor([0.0]), torch.tensor([-0.0])) == {"equal": True, "mismatches": 0, "elements": 1,
                                                                    "bitwise": False}
    nan = torch.tensor([float("nan"), 1.0])
    assert kb.compare(nan, nan.clone())["equal"]


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
                                                         ("celebahq256", 1), ("celebahq256", 8)]
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
    assert "### Per call" in res.stdout.split("total ")[-1]  # the table is printed last

"""The EDM rows of ``kve-fast bench --edm`` (kve_fast/benchmark/edm_rows.py) and bench/edm_bench.py, on the CPU with
tiny sizes: the rows exist, run, and compare kve_fast.edm with the published loop (our reading) bit for bit; the
device speed session has the stage. Each test names the mutation it catches."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import needs_triton

import kve_fast.edm
from kve_fast import benchmark as kb
from kve_fast.benchmark import edm_rows
from kve_fast.edm_testing import tiny_edm_net

ROOT = Path(__file__).resolve().parents[1]


def _bench(argv, capsys):
    parser = argparse.ArgumentParser(prog="kve-fast bench")
    kb.add_arguments(parser)
    rc = kb.run(parser.parse_args(argv))
    return (rc,) + capsys.readouterr()


def test_bench_edm_rows_on_the_cpu(capsys):
    """``kve-fast bench --edm``: EDM's loop and kve_fast.edm eager, each against its floor, kve_fast's bit for bit
    equal to the loop's; the graphed row left out on the CPU with its reason. Mutation caught: the rows compared
    with nothing (``equal_reference_latent`` not set: the "= EDM's loop" column empty); the note that the bits are
    compared before any clamping dropped (a reader of a 0 % "pixels inside (0,1)" would doubt the equality)."""
    rc, out, err = _bench(["--edm", "--steps", "2", "--repeats", "1", "--device", "cpu"], capsys)
    assert rc == 0, err
    table = out.split("### Per call", 1)[1]
    assert "| vs EDM's loop | / floor |" in table and "= EDM's loop" in table
    loop = next(line for line in table.splitlines() if "published loop" in line)
    eager = next(line for line in table.splitlines() if "kve_fast.edm eager" in line)
    assert "1.00x" in loop and "latent yes" in eager
    assert "kve_fast.edm graphed: CUDA graphs need a CUDA device" in out
    assert "compared on the float64 latents before any clamping" in out


def test_bench_edm_fails_when_the_bits_differ(capsys, monkeypatch):
    """A kve_fast row that differs from the published loop fails the command (exit 1, named). Mutation caught:
    ``exactness_failures`` not reading the EDM rows' ``equal_reference_latent``."""
    real = kve_fast.edm.edm_sampler
    monkeypatch.setattr(kve_fast.edm, "edm_sampler", lambda *a, **k: real(*a, **k) * (1 + 2**-40))
    rc, out, err = _bench(["--edm", "--steps", "2", "--repeats", "1", "--device", "cpu", "--backends", "eager"],
                          capsys)
    assert rc == 1 and "kve_fast.edm eager: equal_reference_latent" in err


def test_bench_edm_refuses_low_precision_before_any_work(capsys):
    rc, out, err = _bench(["--edm", "--unet-dtype", "bf16", "--device", "cpu"], capsys)
    assert rc == 2 and "--edm" in err and out == ""


@needs_triton
def test_bench_edm_graphed_row_on_the_graph_stand_in(fake_graphs):
    """With the CPU graph stand-in the graphed row runs: one capture, its sample the eager row's and the loop's,
    its ratio to the floor. Mutation caught: the graphed row calling with ``cuda_graph=False`` (no capture)."""
    rec = edm_rows.bench_edm(tiny_edm_net(3, 6), name="tiny b2", batch_size=2, steps=3, step_backend="triton",
                             policy=kb.RepeatPolicy(fixed=1), log=lambda *a: None, sampler_kwargs={"S_churn": 10})
    rows = {r["kind"]: r for r in rec["rows"]}
    assert [r["status"] for r in rec["rows"]] == ["ok"] * 3
    assert rows["graphed"]["captures_after"] == 1
    assert rows["graphed"]["equal_eager"]["equal"] and rows["graphed"]["equal_reference_latent"]["equal"]
    assert rows["eager"]["equal_reference_latent"]["equal"]
    assert all(r["floor_ratio"] > 0 for r in rec["rows"]) and rec["floor"]["calls"] == 5


def test_the_device_speed_session_has_the_edm_stage():
    for extra in ([], ["--dry-run"]):
        out = subprocess.run([sys.executable, str(ROOT / "bench" / "device_session.py"), "speed", "--list", *extra],
                             capture_output=True, text=True, timeout=120, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert out.returncode == 0, out.stderr
        assert "edm_bench" in out.stdout

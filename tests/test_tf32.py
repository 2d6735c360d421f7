"""TF32 under both of torch's APIs: the legacy flags (``torch.backends.cuda.matmul.allow_tf32``,
``torch.backends.cudnn.allow_tf32``, ``torch.set_float32_matmul_precision``) and the ``fp32_precision`` tree
(``torch.backends.fp32_precision``, ``torch.backends.cudnn.conv.fp32_precision``, ...). Once a process set the
tree apart from the legacy flags, torch raises "a mix of the legacy and new APIs" on reading a legacy flag; these
tests set each API on the CPU (the switches need no GPU) and run what reads or sets them: the capture key, a
``tf32=True`` run, a graphed call, ``kve-fast bench``.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from conftest import GaussianScore, kve_pipe, needs_triton

import kve_fast
from kve_fast import graphs
from kve_fast.fake_graph import FakeGraph, StaleCapture
from kve_fast.precision import FP32_NODES, MIXED, fp32_precision, tf32_for_run

B = torch.backends

# each way a user turns TF32 (or the precision around it) on or off, with what it leaves for the kernels
WRITES = {
    "legacy matmul on": (lambda: setattr(B.cuda.matmul, "allow_tf32", True), (True, None)),
    "legacy cudnn off": (lambda: setattr(B.cudnn, "allow_tf32", False), (None, False)),
    "matmul precision high": (lambda: torch.set_float32_matmul_precision("high"), (True, None)),
    "generic ieee": (lambda: setattr(B, "fp32_precision", "ieee"), (False, None)),  # conv: set explicitly
    "cudnn conv ieee": (lambda: setattr(B.cudnn.conv, "fp32_precision", "ieee"), (None, False)),
    "cudnn ieee": (lambda: setattr(B.cudnn, "fp32_precision", "ieee"), (False, None)),
    "cuda matmul tf32": (lambda: setattr(B.cuda.matmul, "fp32_precision", "tf32"), (True, None)),
    "mkldnn matmul bf16": (lambda: setattr(B.mkldnn.matmul, "fp32_precision", "bf16"), (None, None)),
    # cuDNN's legacy flag off, then the tree's root on: conv and rnn follow the root (a parent set the other way)
    "legacy cudnn off, generic tf32": (lambda: (setattr(B.cudnn, "allow_tf32", False),
                                                setattr(B, "fp32_precision", "tf32")), (True, True)),
}
NEW_API = [name for name in WRITES if not name.startswith(("legacy", "matmul precision"))]


def _tree() -> dict:
    return {node: torch._C._get_fp32_precision_getter(*node) for node in FP32_NODES}


def _set_tree(values: dict) -> None:
    for node, value in values.items():
        torch._C._set_fp32_precision_setter(*node, value)


@pytest.fixture(autouse=True)
def switches_back():
    """Every test here starts from one state of both APIs (the legacy flags at torch's defaults, cuDNN's set
    explicitly, every other tree value "none") and changes the global switches: put both APIs back as they read
    before it, with torch's own setters (kve_fast's put-back is under test here), and check that they read so."""
    legacy = torch.get_float32_matmul_precision(), B.cudnn.allow_tf32  # the suite uses the legacy API only
    tree = _tree()
    torch.set_float32_matmul_precision("highest")
    B.cudnn.allow_tf32 = True
    _set_tree({node: "none" for node in FP32_NODES if node not in (("cuda", "conv"), ("cuda", "rnn"))})
    yield
    torch.set_float32_matmul_precision(legacy[0])
    B.cudnn.allow_tf32 = legacy[1]
    _set_tree(tree)
    assert (torch.get_float32_matmul_precision(), B.cudnn.allow_tf32) == legacy and _tree() == tree


def _reads_tf32() -> tuple[bool, bool]:
    state = fp32_precision()
    return state.matmul_tf32, state.cudnn_tf32


@pytest.mark.parametrize("write", list(WRITES))
def test_every_api_is_read_without_the_mix_error_and_changes_the_switches(write):
    """(mutation: fake_graph.switches or fp32_precision reading the legacy flags plainly -> torch's error)"""
    before = fp32_precision()
    set_it, (matmul, cudnn) = WRITES[write]
    set_it()
    if write == "cudnn conv ieee":  # the case: torch itself refuses the legacy read
        with pytest.raises(RuntimeError, match="legacy and new APIs"):
            B.cudnn.allow_tf32  # noqa: B018
    now = fp32_precision()
    assert now.switches != before.switches
    assert kve_fast.fake_graph.switches() != () and dict(now.switches).keys() <= dict(
        kve_fast.fake_graph.switches()).keys()
    assert now.matmul_tf32 == (before.matmul_tf32 if matmul is None else matmul)
    assert now.cudnn_tf32 == (before.cudnn_tf32 if cudnn is None else cudnn)


@pytest.mark.parametrize("fail", [False, True])
@pytest.mark.parametrize("write", [None] + list(WRITES))
def test_a_tf32_run_turns_it_on_and_puts_every_switch_back(write, fail):
    """After either API: TF32 on inside the run, every switch of both APIs as before afterwards, also after a run
    that raises (mutations: no put-back in tf32_for_run's finally; the tree's values not put back)."""
    if write:
        WRITES[write][0]()
    before = fp32_precision()
    seen = []

    def model(x, t):
        seen.append(_reads_tf32())
        if fail:
            raise RuntimeError("boom")
        return torch.zeros_like(x)

    run = lambda: kve_fast.sample_karras_ve(model, kve_fast.KarrasVeScheduler(), (1, 1, 4, 4), 2,  # noqa: E731
                                            torch.Generator().manual_seed(0), tf32=True)
    if fail:
        with pytest.raises(RuntimeError, match="boom"):
            run()
    else:
        run()
    assert seen and set(seen) == {(True, True)}
    assert fp32_precision().switches == before.switches


@pytest.mark.parametrize("write", [None] + list(WRITES))
def test_tf32_off_for_a_run_under_either_api(write):
    """The benchmark's float32 runs: TF32 off inside, both APIs as before after."""
    if write:
        WRITES[write][0]()
    before = fp32_precision()
    with tf32_for_run(False):
        assert _reads_tf32() == (False, False)
        inside = dict(fp32_precision().switches)
    assert fp32_precision().switches == before.switches
    for flag in ("cuda.matmul.allow_tf32", "cudnn.allow_tf32"):  # kve_fast never makes a legacy read refuse
        assert inside[flag] != MIXED or dict(before.switches)[flag] == MIXED, flag


def test_a_process_on_the_new_api_keeps_its_legacy_flag_untouched():
    """Set through the tree where torch refuses the legacy read: the hidden legacy cuDNN flag stays False, so
    torch refuses the read again once conv and rnn agree (mutation: always the legacy setter in _turn)."""
    B.cudnn.allow_tf32 = False
    B.cudnn.rnn.fp32_precision = "tf32"  # conv follows nothing: the legacy read now refuses
    with tf32_for_run(True):
        assert _reads_tf32()[1]
    B.cudnn.conv.fp32_precision = "tf32"
    with pytest.raises(RuntimeError, match="legacy and new APIs"):
        B.cudnn.allow_tf32  # noqa: B018


@pytest.mark.parametrize("flip", ["legacy", "new"])
def test_a_capture_is_stale_after_tf32_is_flipped_by_either_api(flip):
    """The stand-in graph keeps the switches it captured with: a flip by either API makes its replay raise
    (mutation: fake_graph.switches without the fp32_precision tree -> the new-API flip replays silently)."""
    buf, x = torch.zeros(4), torch.ones(4)
    g = FakeGraph()
    g.capture(lambda: buf.copy_(x + 1))
    g.replay()
    if flip == "legacy":
        B.cudnn.allow_tf32 = not B.cudnn.allow_tf32
    else:
        B.cudnn.conv.fp32_precision = "ieee" if B.cudnn.conv.fp32_precision == "tf32" else "tf32"
    with pytest.raises(StaleCapture, match="allow_tf32" if flip == "legacy" else "cuda.conv"):
        g.replay()


@needs_triton
@pytest.mark.parametrize("tf32", [False, True])
def test_graphed_calls_after_the_new_api(fake_graphs, tf32):
    """A graphed call after ``cudnn.conv.fp32_precision = "ieee"``, and after a flip by the tree: each gives the
    eager bits, the flip its own capture (a stale one would raise)."""
    pipe = kve_pipe(GaussianScore(8))
    run = lambda graph: pipe(2, 3, torch.Generator().manual_seed(0), output_type="latent",  # noqa: E731
                             backend="triton", cuda_graph=graph, tf32=tf32).images
    B.cudnn.conv.fp32_precision = "ieee"
    assert torch.equal(run(True), run(False))
    B.cudnn.conv.fp32_precision = "tf32"
    B.cuda.matmul.fp32_precision = "tf32"
    assert torch.equal(run(True), run(False))
    if not tf32:  # (with tf32=True both calls run with TF32 on)
        assert graphs.graph_info()["captures"] == 2


def test_kve_fast_bench_after_the_new_api(tmp_path, capsys):
    """``kve-fast bench`` (tiny, with ``--tf32``) in a process that used the tree: it runs, records the TF32 the
    kernels used, and leaves every switch as it found it."""
    from kve_fast import benchmark as kb

    B.cudnn.conv.fp32_precision = "ieee"
    before = fp32_precision()
    parser = argparse.ArgumentParser()
    kb.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--model", "digits", "--steps", "2", "--batch-size", "1", "--repeats", "1",
                              "--device", "cpu", "--backends", "eager", "--noise", "exact", "--no-reference",
                              "--tf32", "--json", str(out)])
    assert kb.run(args) == 0, capsys.readouterr().err[-2000:]
    env = json.loads(out.read_text())["env"]
    assert env["tf32"] == {"matmul": False, "cudnn": False} and env["tf32_matmul"] is False
    assert fp32_precision().switches == before.switches

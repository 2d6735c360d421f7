"""The CUDA-graph runner's logic on the CPU: cache keys, bounds, fallback decisions, and the graphed
engine itself, run with an eager stand-in for torch.cuda.CUDAGraph (``graphs._FAKE_GRAPHS``): every
per-step value must come from the static buffers the captured function reads, so the output must be
the eager output, bit for bit. Real capture and replay on a GPU is checked by bench/graph_bench.py."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import GaussianScore, assert_bitwise, kve_pipe, make_generator, needs_triton, reference_test_unet

import kve_fast
from kve_fast import graphs

pytestmark = needs_triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _run(pipe, cuda_graph, **kw):
    kw.setdefault("output_type", "latent")
    steps = kw.pop("steps", 4)
    batch = kw.pop("batch", 2)
    return pipe(batch, steps, make_generator(kw.pop("form", "single"), kw.pop("seed", 0), batch), backend="triton",
                cuda_graph=cuda_graph, **kw).images


@pytest.mark.parametrize("noise", ["exact", "fast"])
@pytest.mark.parametrize("solver", ["heun", "euler"])
@pytest.mark.parametrize("output_type", ["latent", "np", "pil"])
def test_graphed_steps_give_the_eager_bits(fake_graphs, solver, output_type, noise):
    pipe = kve_pipe(GaussianScore(8).to(DEVICE), s_churn=20.0)
    eager = _run(pipe, False, solver=solver, output_type=output_type, noise=noise)
    graphed = _run(pipe, True, solver=solver, output_type=output_type, noise=noise)
    if output_type == "pil":
        import numpy as np

        eager, graphed = np.stack([np.asarray(i) for i in eager]), np.stack([np.asarray(i) for i in graphed])
    assert_bitwise(graphed, eager, f"graphed vs eager ({solver}, {output_type})")
    assert graphs.graph_info()["captures"] == 1


def test_one_capture_serves_every_step_count_and_later_calls(fake_graphs):
    unet = reference_test_unet(8).to(DEVICE)
    pipe = kve_pipe(unet)
    for steps, form in [(2, "single"), (5, "list"), (3, "global")]:
        eager = _run(pipe, False, steps=steps, form=form, seed=steps)
        assert_bitwise(_run(pipe, True, steps=steps, form=form, seed=steps), eager, f"{steps} steps, {form}")
    assert graphs.graph_info()["captures"] == 1


def test_callbacks_run_between_replays_and_may_replace_the_sample(fake_graphs):
    pipe = kve_pipe(GaussianScore(8).to(DEVICE))
    seen = {}

    def halve(p, i, t, kw):
        seen.setdefault(p._probe, []).append(kw["pred_original_sample"].clone())
        return {"sample": kw["sample"] * 0.5} if i == 1 else {}

    for noise in ("exact", "fast"):
        out = {}
        seen.clear()
        for mode in (False, True):
            pipe._probe = mode
            out[mode] = _run(pipe, mode, steps=4, callback_on_step_end=halve, noise=noise,
                             callback_on_step_end_tensor_inputs=["sample", "pred_original_sample"])
        assert_bitwise(out[True], out[False], f"graphed vs eager with a callback, {noise} noise")
        for a, b in zip(seen[True], seen[False]):
            assert_bitwise(a, b, "denoised handed to the callback")


def test_capture_does_not_consume_the_users_randomness(fake_graphs, monkeypatch):
    class DrawsNoise(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base, self.config = GaussianScore(8), GaussianScore(8).config

        def forward(self, x, sigma):
            torch.rand(1)  # a model that touches the global RNG during warm-up and capture
            return self.base(x, sigma)

    real_capture, checked = graphs._capture, []

    def checking_capture(fn, device):
        before = torch.get_rng_state()
        out = real_capture(fn, device)
        assert torch.equal(torch.get_rng_state(), before), "warm-up or capture moved the global RNG"
        checked.append(1)
        return out

    monkeypatch.setattr(graphs, "_capture", checking_capture)
    pipe = kve_pipe(DrawsNoise().to(DEVICE))
    gens = {mode: torch.Generator().manual_seed(5) for mode in (False, True)}
    out = {mode: pipe(2, 4, gens[mode], output_type="latent", backend="triton", cuda_graph=mode).images
           for mode in (False, True)}
    assert checked, "the graphed run captured nothing"
    assert_bitwise(out[True], out[False])
    assert torch.equal(gens[True].get_state(), gens[False].get_state()), "the user's generator moved differently"


def test_captures_are_bounded_and_freed(fake_graphs, monkeypatch):
    monkeypatch.setattr(graphs, "MAX_CAPTURES", 2)
    pipe = kve_pipe(GaussianScore(8).to(DEVICE))
    for batch in (1, 2, 3):
        _run(pipe, True, batch=batch, steps=2)
    assert graphs.graph_info()["captures"] == 2
    pipe.to("cpu")
    assert graphs.graph_info()["captures"] == 0


def test_a_failed_run_caches_no_new_capture(fake_graphs):
    pipe = kve_pipe(GaussianScore(8).to(DEVICE))

    def boom(p, i, t, kw):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(pipe, True, callback_on_step_end=boom)
    assert graphs.graph_info()["captures"] == 0


def test_a_model_that_cannot_be_captured_runs_eagerly_or_raises(fake_graphs):
    class Unhashable(torch.nn.Module):
        calls = 0

        def __init__(self):
            super().__init__()
            self.base, self.config = GaussianScore(8), GaussianScore(8).config

        def forward(self, x, sigma):
            type(self).calls += 1
            if type(self).calls == 1:  # fails during warm-up, as a host sync fails during capture
                raise RuntimeError("operation not permitted when stream is capturing")
            return self.base(x, sigma)

    pipe = kve_pipe(Unhashable().to(DEVICE))
    with pytest.raises(ValueError, match="cuda_graph"):
        _run(pipe, True)
    Unhashable.calls = 0
    graphs._warned.clear()
    with pytest.warns(RuntimeWarning, match="cannot be captured"):
        graphed = _run(pipe, "auto")
    assert_bitwise(graphed, _run(pipe, False))


def test_decisions_and_argument_checks(monkeypatch):
    cpu = torch.device("cpu")
    backend = kve_fast.backends.make_backend("torch", cpu, 1.0)
    with pytest.raises(ValueError, match="cuda_graph"):
        graphs.decide("yes", cpu, backend, "exact")
    with pytest.raises(ValueError, match="cuda_graph"):
        graphs.decide(True, cpu, backend, "exact")  # not CUDA
    assert graphs.decide("auto", cpu, backend, "exact") is False
    assert graphs.check_cuda_graph(None) == graphs.DEFAULT_MODE == "auto"  # on by default (confirmed on an H100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert graphs.decide("auto", cpu, backend, "exact") is False  # on the CPU: no warning, nothing to gain
    monkeypatch.setattr(graphs, "_FAKE_GRAPHS", True)
    with pytest.raises(ValueError, match="triton"):
        graphs.decide(True, cpu, backend, "exact")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # a Triton backend on the CPU, also where CUDA is available
    triton_backend = kve_fast.backends.make_backend("triton", cpu, 1.0)
    assert graphs.decide(True, cpu, triton_backend, "exact") is True
    monkeypatch.setenv(graphs.ENV_VAR, "0")
    assert graphs.decide("auto", cpu, triton_backend, "exact") is False
    assert graphs.decide(True, cpu, triton_backend, "exact") is False
    pipe = kve_pipe(GaussianScore(8))
    with pytest.raises(ValueError, match="cuda_graph"):
        pipe(1, 2, cuda_graph="sometimes")

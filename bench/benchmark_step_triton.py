"""pytest-benchmark suite for the fused step kernels and a whole Heun step, per backend.

    python -m pytest bench/benchmark_step_triton.py                 # CPU: tiny sizes, Triton interpreter
    python -m pytest bench/benchmark_step_triton.py --benchmark-only  # on a GPU: 1 M to 48 M elements

The references are the same functions the tests use (kve_fast.ops.step_torch). On a GPU the kernels
are timed per call (launch included) after synchronising; bench/gpu_check.py reports bandwidth
against a copy and the exactness checks.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kve_fast  # noqa: E402
from kve_fast.ops import step_torch, step_triton  # noqa: E402
from kve_fast.sampler import plan_steps  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SIZES = [2**20, 8 * 2**20, 48 * 2**20] if CUDA else [4096]
STEPS = plan_steps(kve_fast.KarrasVeScheduler(), 8)


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _tensors(n, k=5):
    g = torch.Generator(device=DEVICE).manual_seed(n)
    return [torch.randn(n, generator=g, device=DEVICE) for _ in range(k)]


def _run(benchmark, fn, n, bytes_per_element):
    def call():
        fn()
        _sync()

    call()
    benchmark.extra_info.update(elements=n, bytes_per_element=bytes_per_element)
    benchmark(call)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("noise", ["host", "device"])
def test_churn(benchmark, n, noise):
    x, eps, *_ = _tensors(n)
    st = STEPS[3]
    fn = (lambda: step_triton.churn(x, eps, 1.007, st.sigma, st.sigma_hat)) if noise == "host" else (
        lambda: step_triton.churn(x, None, 1.007, st.sigma, st.sigma_hat, seed=7))
    _run(benchmark, fn, n, 16 if noise == "host" else 12)


@pytest.mark.parametrize("n", SIZES)
def test_euler(benchmark, n):
    raw, hat, *_ = _tensors(n)
    st = STEPS[3]
    _run(benchmark, lambda: step_triton.euler(raw, hat, st.sigma_hat, st.sigma_next), n, 20)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("noise", ["host", "device"])
def test_heun_churn(benchmark, n, noise):
    raw, hat, prev, d, eps = _tensors(n)
    st, nx = STEPS[3], STEPS[4]
    churn = (eps if noise == "host" else None, 1.007, nx.sigma, nx.sigma_hat, 7)
    _run(benchmark, lambda: step_triton.heun(raw, hat, prev, d, st.sigma_hat, st.sigma_next, want_sample=False,
                                             next_churn=churn), n, 28 if noise == "host" else 24)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_whole_step(benchmark, n, backend):
    """Euler + Heun + next churn from given model outputs: the sampler's arithmetic for one step."""
    raw, raw2, hat, eps, _ = _tensors(n)
    st, nx = STEPS[3], STEPS[4]
    if backend == "torch":
        def step():
            mo = step_torch.scale_model_output(raw, st.sigma_hat)
            prev, d, _ = step_torch.euler(mo, st.sigma_hat, st.sigma_next, hat)
            step_torch.model_input(prev)
            mo2 = step_torch.scale_model_output(raw2, st.sigma_next)
            x, _ = step_torch.heun(mo2, st.sigma_hat, st.sigma_next, hat, prev, d)
            h = step_torch.churn(x, 1.007 * eps, nx.sigma, nx.sigma_hat)
            step_torch.model_input(h)
    else:
        def step():
            prev, d, _, _, _ = step_triton.euler(raw, hat, st.sigma_hat, st.sigma_next)
            step_triton.heun(raw2, hat, prev, d, st.sigma_hat, st.sigma_next, want_sample=False,
                             next_churn=(eps, 1.007, nx.sigma, nx.sigma_hat, None))
    _run(benchmark, step, n, 48)

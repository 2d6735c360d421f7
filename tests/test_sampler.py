"""The sampler loop's other entry points and options: sample_karras_ve_sigmas, the paper's schedules, Euler-only.
Every entry point is inference only (no autograd tape, also in what a callback gets); user sigmas that overflow
float32 are refused; a callback that scribbles on what it gets cannot change a later call; a non-finite final sample
is reported (kve_fast.sampler's warning), in every output type."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import GaussianScore, assert_bitwise, kve_pipe, needs_triton, reference_test_unet

import kve_fast
from kve_fast import plan as plan_module
from kve_fast.noise_levels import edm_sigmas, ve_sigmas

BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]  # without Triton, its cases skip with the reason
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton needs CUDA tensors outside its interpreter
SIGMAS = [20.0, 5.0, 1.0, 0.3, 0.0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("schedule", ["diffusers", "ve", "edm"])
def test_sample_heun_over_the_schedulers_sigmas_equals_the_sampler(backend, schedule, monkeypatch):
    monkeypatch.setattr(plan_module, "CHUNK", 4)  # (the 6 steps' floats in two chunks)
    model = GaussianScore(8).to(DEVICE)
    config = {"sigma_schedule": schedule, "s_churn": 30.0, "s_min": 0.1, "s_max": 20.0, "s_noise": 1.003}
    scheduler = kve_fast.KarrasVeScheduler(**config)
    n, shape = 6, (3, 3, 8, 8)
    expected = kve_fast.sample_karras_ve(model, scheduler, shape, n, torch.Generator().manual_seed(5), device=DEVICE,
                                         backend=backend)
    timesteps, schedule_values = scheduler.make_schedule(n)
    sigmas = torch.cat([schedule_values[timesteps], torch.zeros(1)])
    g = torch.Generator().manual_seed(5)
    x0 = (torch.randn(shape, generator=g) * scheduler.init_noise_sigma).to(DEVICE)
    seen = []
    got = kve_fast.sample_karras_ve_sigmas(model, x0, sigmas, s_churn=30.0, s_tmin=0.1, s_tmax=20.0, s_noise=1.003, generator=g,
                               backend=backend, callback=lambda d: seen.append(sorted(d)))
    assert_bitwise(got, expected)
    assert len(seen) == n and {"x", "i", "sigma", "sigma_hat", "denoised"} <= set(seen[0])


@pytest.mark.parametrize("sigmas, error", [
    ([3.0, 2.0, 1.0], ValueError),       # no trailing 0
    ([3.0, 4.0, 0.0], ValueError),       # increasing
    ([3.0, 0.0, 1.0, 0.0], ValueError),  # 0 inside
    ([[3.0, 0.0]], ValueError),          # 2-D
    ([0.0], ValueError),                 # too short
    ([3.0, float("nan"), 0.0], ValueError),
    ("3, 2, 0", TypeError),
])
def test_sample_heun_rejects_bad_sigmas(sigmas, error):
    with pytest.raises(error, match="sigmas"):
        kve_fast.sample_karras_ve_sigmas(GaussianScore(8), torch.zeros(1, 3, 8, 8), sigmas)


def test_sample_heun_rejects_bad_arguments():
    with pytest.raises(TypeError, match="`x`"):
        kve_fast.sample_karras_ve_sigmas(GaussianScore(8), np.zeros((1, 3, 8, 8)), [1.0, 0.0])
    with pytest.raises(ValueError, match="s_tmax"):
        kve_fast.sample_karras_ve_sigmas(GaussianScore(8), torch.zeros(1, 3, 8, 8), [1.0, 0.0], s_tmin=2.0, s_tmax=1.0)
    with pytest.raises(TypeError, match="s_tmax"):
        kve_fast.sample_karras_ve_sigmas(GaussianScore(8), torch.zeros(1, 3, 8, 8), [1.0, 0.0], s_tmax="inf")


def test_sample_heun_restores_the_generator_when_the_model_is_rejected():
    class Wrong(torch.nn.Module):
        def forward(self, y, sigma):
            return y[:, :1]

    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    with pytest.raises(ValueError, match="model"):
        kve_fast.sample_karras_ve_sigmas(Wrong(), torch.zeros(1, 3, 8, 8), [1.0, 0.5, 0.0], generator=g)
    assert torch.equal(g.get_state(), state)
    with pytest.raises(ValueError, match="solver"):
        kve_fast.sample_karras_ve_sigmas(GaussianScore(8), torch.zeros(1, 3, 8, 8), [1.0, 0.0], solver="rk4")


def test_paper_schedules():
    ve = ve_sigmas(5, 0.02, 100.0)
    assert math.isclose(ve[0], 100.0) and math.isclose(ve[-1], 0.02)
    assert np.allclose(ve[1:] / ve[:-1], (0.02 / 100.0) ** 0.25)  # geometric: sigma_i = sqrt(t_i)
    edm = edm_sigmas(5, 0.002, 80.0, 7.0)
    assert math.isclose(edm[0], 80.0) and math.isclose(edm[-1], 0.002)
    root = edm ** (1 / 7)
    assert np.allclose(np.diff(root), np.diff(root)[0])  # linear in sigma^(1/rho) (Eq. 5)
    for name, values in (("ve", ve_sigmas(7, 0.02, 100.0)), ("edm", edm_sigmas(7, 0.02, 100.0))):
        timesteps, schedule = kve_fast.KarrasVeScheduler(sigma_schedule=name).make_schedule(7)
        assert_bitwise(schedule[timesteps], torch.tensor(values, dtype=torch.float32))
    with pytest.raises(ValueError, match="sigma_schedule"):
        kve_fast.KarrasVeScheduler(sigma_schedule="cosine")
    with pytest.raises(ValueError, match="rho"):
        kve_fast.KarrasVeScheduler(rho=0.0)


@pytest.mark.parametrize("solver, calls", [("heun", 2 * 5 - 1), ("euler", 5)])
def test_solver_model_calls(solver, calls):
    model = GaussianScore(8)
    count = []
    model.register_forward_hook(lambda *a: count.append(1))
    pipe = kve_fast.KarrasVePipeline(model, kve_fast.KarrasVeScheduler())
    pipe.set_progress_bar_config(disable=True)
    pipe(2, 5, torch.Generator().manual_seed(0), output_type="latent", solver=solver)
    assert len(count) == calls


@needs_triton
@pytest.mark.parametrize("callback", [False, True])
def test_euler_solver_agrees_across_backends(callback):
    pipe = kve_fast.KarrasVePipeline(GaussianScore(8).to(DEVICE), kve_fast.KarrasVeScheduler(sigma_schedule="edm"))
    pipe.set_progress_bar_config(disable=True)
    cb = (lambda p, i, t, k: {}) if callback else None
    out = [pipe(3, 4, torch.Generator().manual_seed(2), output_type="latent", solver="euler", backend=b,
                callback_on_step_end=cb).images for b in ("torch", "triton")]
    assert_bitwise(out[1], out[0])


def test_the_old_sample_heun_name_is_gone_with_a_pointer_to_both_conventions():
    with pytest.raises(AttributeError, match="k_diffusion.sample_heun") as exc:
        kve_fast.sample_heun  # noqa: B018
    assert "sample_karras_ve_sigmas" in str(exc.value)
    from kve_fast.k_diffusion import sample_heun

    assert sample_heun.__module__ == "kve_fast.k_diffusion"


def test_numpy_scalars_are_taken_for_every_real_argument():
    """sample_karras_ve_sigmas took numpy scalars for s_churn, s_tmin and s_noise but refused them for s_tmax
    (mutation: the old int/float test); the same values as numpy scalars give the same bits, bools stay
    refused."""
    model = GaussianScore(8)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 6.0
    sigmas = [6.0, 3.0, 1.5, 0.5, 0.2, 0.0]
    run = lambda **kw: kve_fast.sample_karras_ve_sigmas(  # noqa: E731
        model, x, sigmas, generator=torch.Generator().manual_seed(1), **kw)
    expected = run(s_churn=2.5, s_tmin=0.5, s_tmax=3.0, s_noise=1.007)
    got = run(s_churn=np.float64(2.5), s_tmin=np.float32(0.5), s_tmax=np.float32(3.0), s_noise=np.float64(1.007))
    assert_bitwise(got, expected)
    assert_bitwise(run(s_churn=np.int64(2), s_tmin=np.int32(0), s_tmax=np.int64(3)),
                   run(s_churn=2, s_tmin=0, s_tmax=3))
    for name in ("s_churn", "s_tmin", "s_tmax", "s_noise"):
        with pytest.raises(TypeError, match=name):
            run(**{name: np.True_})


# --- no autograd tape -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_entry_point_records_an_autograd_tape(backend):
    unet = reference_test_unet(8).to(DEVICE)
    assert any(p.requires_grad for p in unet.parameters())
    x = (torch.randn(1, 3, 8, 8) * SIGMAS[0]).to(DEVICE).requires_grad_(True)
    out = kve_fast.sample_karras_ve_sigmas(unet, x, SIGMAS, backend=backend)
    assert not out.requires_grad and out.grad_fn is None
    out = kve_fast.sample_karras_ve(unet, kve_fast.KarrasVeScheduler(), (1, 3, 8, 8), 3, device=DEVICE, backend=backend)
    assert not out.requires_grad and out.grad_fn is None
    seen = []
    kve_fast.sample_karras_ve(unet, kve_fast.KarrasVeScheduler(), (1, 3, 8, 8), 3, device=DEVICE, backend=backend,
                              callback=lambda s: seen.append(s["sample"].requires_grad or s["denoised"].requires_grad))
    assert seen == [False, False, False]


# --- a callback that scribbles on what it gets cannot change a later call ----------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_callback_that_mutates_what_it_gets_cannot_corrupt_later_calls(backend):
    model, scheduler = GaussianScore(8), kve_fast.KarrasVeScheduler(s_churn=10.0)
    run = lambda cb=None: kve_fast.sample_karras_ve(  # noqa: E731
        model, scheduler, (2, 3, 8, 8), 5, torch.Generator().manual_seed(0), backend=backend, callback=cb)
    before = run()

    def vandal(state):
        for key in ("sigma", "sigma_hat", "sigma_prev", "timestep"):
            if isinstance(state[key], torch.Tensor):
                state[key].mul_(100)

    run(vandal)
    assert_bitwise(run(), before, "a run after a callback scribbled on its tensors")


# --- user sigmas that overflow float32 are rejected ------------------------------------------------------


def test_user_sigmas_that_overflow_float32_are_rejected():
    with pytest.raises(ValueError, match="sigmas"):
        kve_fast.sample_karras_ve_sigmas(GaussianScore(8), torch.zeros(1, 3, 8, 8), [1e30, 1.0, 0.0])
    with pytest.raises(ValueError, match="sigmas"):
        kve_fast.sample_karras_ve_sigmas(GaussianScore(8), torch.zeros(1, 3, 8, 8), [1.0, 1e-45, 0.0])


# --- non-finite output is reported ----------------------------------------------------------------------


class _NanAfter(torch.nn.Module):
    def __init__(self, calls: int):
        super().__init__()
        self.base, self.calls, self.config = GaussianScore(8), calls, GaussianScore(8).config

    def forward(self, x, sigma):
        self.calls -= 1
        out = self.base(x, sigma).sample
        return out * float("nan") if self.calls < 0 else out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("output_type", ["np", "pil", "latent"])
def test_nan_output_is_reported(backend, output_type):
    pipe = kve_pipe(_NanAfter(3))
    with pytest.warns(RuntimeWarning, match="NaN"):
        pipe(1, 4, torch.Generator().manual_seed(0), output_type=output_type, backend=backend)


def test_finite_output_is_not_reported():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kve_pipe(GaussianScore(8))(1, 4, torch.Generator().manual_seed(0), output_type="np")

"""The sampler loop's other entry points and options: sample_karras_ve_sigmas, the paper's schedules, Euler-only."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import GaussianScore, assert_bitwise, needs_triton

import kve_fast
from kve_fast import plan as plan_module
from kve_fast.noise_levels import edm_sigmas, ve_sigmas

BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]  # without Triton, its cases skip with the reason
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton needs CUDA tensors outside its interpreter


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


@pytest.mark.parametrize("chunk", [4, 1024])
@pytest.mark.parametrize("churn", [(0.0, 0.0, float("inf")), (1.0, 0.0, float("inf")), (80.0, 0.05, 1.0),
                                   (3.0, 0.3, 0.3)])
def test_sigmas_plan_steps_are_the_reference_0d_arithmetic(churn, chunk, monkeypatch):
    """sample_karras_ve_sigmas' plan computes the steps' floats with elementwise ops over chunks of the sequence
    (``VectorPlan``); each field must be what ``Step`` computes with the reference's 0-d float32 ops (the plan of
    the pipeline, which diffusers' parity tests pin), also where sigmas equal s_tmin and s_tmax, and in any order
    of access (the graph runner's first and last steps, the loop's, backwards: chunks made again). Mutations this
    catches: sigma_hat as ``sigma * (1 + gamma)`` (one rounding fewer), the range test ``>`` for ``>=``, the
    churn coefficient as ``sqrt((sigma_hat - sigma) * (sigma_hat + sigma))``; with chunks of 4: each chunk's last
    step taken as the run's last, a chunk's first step taken as ``i // CHUNK``."""
    from kve_fast.plan import Plan, sigmas_plan

    monkeypatch.setattr(plan_module, "CHUNK", chunk)
    s_churn, s_tmin, s_tmax = churn
    gen = torch.Generator().manual_seed(0)
    fields = ("index", "timestep", "gamma", "last", "_sigma", "_sigma_hat", "_sigma_next", "noise_coef", "at_hat",
              "at_next")
    for n in (1, 2, 7, 33):
        for scale in (1e-2, 1.0, 300.0):
            sig = torch.rand(n, generator=gen, dtype=torch.float64) * scale + 1e-3
            if n > 2 and s_tmax < float("inf"):
                sig[:2] = torch.tensor([s_tmax, s_tmin])  # (the range test's bounds, as float32 values)
            sig = torch.cat([sig.sort(descending=True).values, torch.zeros(1, dtype=torch.float64)]).float()
            fast = sigmas_plan(sig.tolist(), s_churn, s_tmin, s_tmax)
            slow = Plan(n, lambda k: sig[k].clone(), s_churn, s_tmin, s_tmax, memo=False)
            assert len(fast) == len(slow) == n
            for i in [0, n - 1, max(n - 2, 0), 0, 1 % n, *range(n), *reversed(range(n))]:
                a, b = fast[i], slow[i]
                for f in fields:
                    assert getattr(a, f) == getattr(b, f), (n, scale, i, f, getattr(a, f), getattr(b, f))
                    assert type(getattr(a, f)) is type(getattr(b, f)), (i, f)
                assert torch.equal(a.sigma_hat, b.sigma_hat) and a.values[0].scalars == b.values[0].scalars


@needs_triton
def test_graphed_runs_over_chunked_plans_give_the_eager_bits(fake_graphs, monkeypatch):
    """The graph runner asks for the first and last steps before the loop walks forward: with the floats made two
    steps at a time, a graphed run of either front gives the eager torch run's bits (k-diffusion's: the real
    package's, tests/test_k_diffusion.py)."""
    from kve_fast import graphs
    from kve_fast import k_diffusion as kd

    monkeypatch.setattr(plan_module, "CHUNK", 2)
    model = GaussianScore(8).to(DEVICE)
    sigmas = torch.tensor([6.0, 3.0, 1.5, 0.6, 0.2, 0.0], device=DEVICE)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(DEVICE) * 6.0
    run = lambda backend, mode: kve_fast.sample_karras_ve_sigmas(  # noqa: E731
        model, x, sigmas, s_churn=2.0, s_tmin=0.5, s_tmax=4.0, generator=torch.Generator().manual_seed(1),
        backend=backend, cuda_graph=mode)
    assert_bitwise(run("triton", True), run("torch", False), "sample_karras_ve_sigmas")
    denoiser = kd.score_to_denoiser(model)
    outs = []
    for backend, mode in (("triton", True), ("torch", False)):
        torch.manual_seed(2)
        outs.append(kd.sample_heun(denoiser, x, sigmas, disable=True, s_churn=2.0, s_tmin=0.5, s_tmax=4.0,
                                   backend=backend, cuda_graph=mode))
    assert_bitwise(outs[0], outs[1], "k_diffusion.sample_heun")
    assert graphs.graph_info()["captures"] == 2, "both graphed runs were captured"


@pytest.mark.parametrize("kind", ["tensor", "array"])
def test_the_sigmas_are_read_as_the_call_got_them(kind, monkeypatch):
    """The plan makes the steps' floats as the run goes: the caller editing its own sigmas during the run changes
    nothing (mutation: the plan's copy of them left out -> the chunks made after the edit read it)."""
    monkeypatch.setattr(plan_module, "CHUNK", 2)
    model = GaussianScore(8)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 6.0
    sigmas = torch.tensor([6.0, 3.0, 1.5, 0.6, 0.2, 0.0])
    given = sigmas if kind == "tensor" else sigmas.numpy()

    def edit(state):
        if state["i"] == 0:
            given[...] *= 0.5

    run = lambda sig, callback: kve_fast.sample_karras_ve_sigmas(  # noqa: E731
        model, x, sig, s_churn=1.0, generator=torch.Generator().manual_seed(1), callback=callback)
    expected = run(sigmas.clone(), lambda state: None)
    assert_bitwise(run(given, edit), expected)
    assert float(sigmas[0]) == 3.0, "the edit was made"


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


@pytest.mark.parametrize("name", ["s_tmin", "s_tmax"])
def test_an_int_bound_torch_cannot_compare_is_refused_by_name(name):
    """Bounds are compared with the sigmas in torch, which takes ints through int64: a larger int is refused
    naming it, before any work (mutation: the check removed -> an unnamed OverflowError)."""
    from kve_fast.plan import sigmas_plan

    kwargs = {"s_tmin": 0.0, "s_tmax": float("inf"), name: 10**40}
    with pytest.raises(ValueError, match=name):
        sigmas_plan([2.0, 1.0, 0.0], 1.0, **kwargs)

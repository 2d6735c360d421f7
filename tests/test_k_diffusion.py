"""kve_fast.k_diffusion against the real k-diffusion 0.1.1.post1 package: same call, same bits.

k-diffusion's package ``__init__`` imports its training stack (wandb, CLIP, torchvision models); the
samplers need only ``k_diffusion/sampling.py`` and ``utils.py``. ``real_sampling()`` loads those two
files of the real package (installed, or its PyPI wheel fetched without dependencies, see
``_k_diffusion_dir``) under a bare package object, with torchvision stubbed (``utils`` imports
``torchvision.transforms.functional`` at the top and never uses it for sampling), and puts
``sys.modules`` back as it was. Nothing of k-diffusion is copied here.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest
import torch
from conftest import CAN_RUN_TRITON, GaussianScore, assert_bitwise, reference_test_unet

from kve_fast import k_diffusion as kd
from kve_fast import plan as plan_module
from kve_fast.testing import K_DIFFUSION, import_k_diffusion_sampling

BACKENDS = ["torch"] + (["triton"] if CAN_RUN_TRITON else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_REAL = {}




def _k_diffusion_dir() -> str:
    """The folder holding the ``k_diffusion`` package: installed, or from its wheel.

    Installing k-diffusion with its dependencies would bring torchvision (a build that need not match
    this torch, which then breaks diffusers' imports) and numpy < 2, so the test environment gets only
    what its samplers import (torchsde, torchdiffeq, scipy) and this fetches the wheel itself, without
    dependencies: ``$KVE_FAST_K_DIFFUSION_WHEEL`` if set (machines without network), else
    ``pip download --no-deps`` into a cache folder once.
    """
    spec = importlib.util.find_spec("k_diffusion")
    if spec is not None:
        return os.path.dirname(list(spec.submodule_search_locations)[0])
    cache = os.path.join(os.path.expanduser("~"), ".cache", "kve_fast", "k-diffusion-0.1.1.post1")
    if not os.path.isdir(os.path.join(cache, "k_diffusion")):
        wheel = os.environ.get("KVE_FAST_K_DIFFUSION_WHEEL")
        if not wheel:
            download = os.path.join(cache + ".download")
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                   "-d", download, K_DIFFUSION], capture_output=True, text=True, timeout=300)
            wheels = [f for f in os.listdir(download) if f.endswith(".whl")] if os.path.isdir(download) else []
            if proc.returncode != 0 or not wheels:
                pytest.skip(f"could not fetch {K_DIFFUSION} (offline? set KVE_FAST_K_DIFFUSION_WHEEL): "
                            f"{proc.stderr.strip()[-300:]}")
            wheel = os.path.join(download, wheels[0])
        with zipfile.ZipFile(wheel) as z:
            z.extractall(cache + ".tmp")
        os.replace(cache + ".tmp", cache)
    return cache


def real_sampling():
    """k-diffusion's own ``sampling`` module (see the module docstring)."""
    if "sampling" not in _REAL:
        _REAL["sampling"] = import_k_diffusion_sampling(_k_diffusion_dir())
    return _REAL["sampling"]


class UNetDenoiser(torch.nn.Module):
    """A denoiser with real convolution and attention arithmetic: the exact Gaussian denoiser plus a
    small multiple of a random UNet's output (so the output stays a sensible image)."""

    def __init__(self):
        super().__init__()
        self.gauss, self.unet = GaussianScore(8), reference_test_unet(8)

    def forward(self, x, sigma, scale=0.05):
        return kd.score_to_denoiser(self.gauss)(x, sigma) + scale * self.unet(x, sigma).sample


def _models():
    return {"gaussian": kd.score_to_denoiser(GaussianScore(8).to(DEVICE)), "unet": UNetDenoiser().to(DEVICE)}


CASES = [  # (sampler, model, batch, steps, churn settings)
    ("sample_heun", "gaussian", 1, 5, {}),
    ("sample_heun", "gaussian", 3, 6, {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 10.0, "s_noise": 1.007}),
    ("sample_heun", "unet", 2, 4, {"s_churn": 10.0}),
    ("sample_euler", "gaussian", 2, 5, {"s_churn": 40.0, "s_tmin": 0.1, "s_tmax": 5.0}),
    ("sample_euler", "unet", 1, 3, {}),
    # gamma = S_churn / N below its cap on the churned steps (catches a gamma that forgets / N)
    ("sample_heun", "gaussian", 2, 8, {"s_churn": 1.6, "s_tmin": 0.05, "s_tmax": 20.0, "s_noise": 1.004}),
    ("sample_euler", "unet", 2, 6, {"s_churn": 0.9, "s_tmin": 0.05, "s_tmax": 30.0}),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sampler, model, batch, steps, churn", CASES)
def test_samplers_match_k_diffusion(sampler, model, batch, steps, churn, backend, monkeypatch):
    monkeypatch.setattr(plan_module, "CHUNK", 2)  # (the steps' host floats made two steps at a time)
    real = real_sampling()
    denoiser = _models()[model]
    sigmas = real.get_sigmas_karras(steps, 0.02, 40.0, device=DEVICE)
    x = torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(batch)).to(DEVICE) * sigmas[0]
    seen = {"real": [], "ours": []}

    def recorder(key):
        return lambda d: seen[key].append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in d.items()})

    torch.manual_seed(3)
    expected = getattr(real, sampler)(denoiser, x, sigmas, callback=recorder("real"), disable=True, **churn)
    state_after = torch.get_rng_state()
    torch.manual_seed(3)
    got = getattr(kd, sampler)(denoiser, x, sigmas, callback=recorder("ours"), disable=True, backend=backend, **churn)
    assert_bitwise(got, expected, f"{sampler} output")
    assert torch.equal(torch.get_rng_state(), state_after), "the global RNG must advance as k-diffusion's does"
    assert len(seen["ours"]) == len(seen["real"]) == steps
    for i, (a, b) in enumerate(zip(seen["ours"], seen["real"])):
        assert sorted(a) == sorted(b) == ["denoised", "i", "sigma", "sigma_hat", "x"]
        assert a["i"] == b["i"] == i
        for key in ("x", "sigma", "sigma_hat", "denoised"):
            assert_bitwise(a[key], b[key], f"callback {key!r} at step {i}")
    # without a callback the fused path runs: same bits
    torch.manual_seed(3)
    assert_bitwise(getattr(kd, sampler)(denoiser, x, sigmas, disable=True, backend=backend, **churn), expected,
                   f"{sampler} fused")


@pytest.mark.parametrize("backend", BACKENDS)
def test_extra_args_and_layouts_reach_the_model_as_in_k_diffusion(backend):
    real = real_sampling()
    denoiser = UNetDenoiser().to(DEVICE)
    sigmas = real.get_sigmas_exponential(4, 0.05, 20.0, device=DEVICE)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(DEVICE) * sigmas[0]
    torch.manual_seed(1)
    expected = real.sample_heun(denoiser, x, sigmas, extra_args={"scale": 0.1}, disable=True, s_churn=5.0)
    for name, xl in {"contiguous": x, "channels_last": x.to(memory_format=torch.channels_last)}.items():
        torch.manual_seed(1)
        reference = real.sample_heun(kd.score_to_denoiser(GaussianScore(8).to(DEVICE)), xl, sigmas, disable=True,
                                     s_churn=5.0)
        torch.manual_seed(1)
        got = kd.sample_heun(kd.score_to_denoiser(GaussianScore(8).to(DEVICE)), xl, sigmas, disable=True, s_churn=5.0,
                             backend=backend)
        assert_bitwise(got, reference, f"{name} input")
    torch.manual_seed(1)
    got = kd.sample_heun(denoiser, x, sigmas, extra_args={"scale": 0.1}, disable=True, s_churn=5.0, backend=backend)
    assert_bitwise(got, expected, "extra_args")


def test_schedule_helpers_match_k_diffusion():
    real = real_sampling()
    for n, lo, hi, rho in [(5, 0.002, 80.0, 7.0), (50, 0.02, 100.0, 7.0), (13, 0.1, 10.0, 3.0)]:
        assert_bitwise(kd.get_sigmas_karras(n, lo, hi, rho), real.get_sigmas_karras(n, lo, hi, rho), "karras")
        assert_bitwise(kd.get_sigmas_exponential(n, lo, hi), real.get_sigmas_exponential(n, lo, hi), "exponential")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("churn", [(1.0, 0.0, float("inf")), (40.0, 0.05, 10.0), (13.7, 0.3, 20.0)])
def test_step_scalars_match_k_diffusion_expressions(churn, dtype, monkeypatch):
    """Each step's host scalars against k-diffusion's own 0-d expressions on the sigmas' device (on a GPU
    machine, CUDA: there the churn coefficient comes from ``device_churn``, whose powers are CUDA's), in the
    sigmas' dtype, rounded to float32 as the kernels take them; also sequences with zeros inside and at the
    end (ComfyUI's split and flipped sigmas). The plan computes all steps' floats with elementwise ops at once:
    the mutations this catches include the product taken in float32 for float64 sigmas, the floats left
    unrounded in the sigmas' dtype, ``last`` read from another test than ``sigmas[i + 1] == 0``, and ``<`` for
    ``<=`` at either end of the churn range (sigmas equal to s_tmin and s_tmax are in the split sequence). The
    floats are made 7 steps at a time (chunk boundaries inside both sequences), and asked for backwards too:
    a chunk's first step or its ``sigmas[i + 1]`` read from the wrong place (on a GPU also its churn coefficients
    from the wrong slice) fail here."""
    from kve_fast.plan import device_churn, kdiffusion_plan

    monkeypatch.setattr(plan_module, "CHUNK", 7)

    s_churn, s_tmin, s_tmax = churn
    karras = real_sampling().get_sigmas_karras(60, 0.002, 80.0, device=DEVICE).to(dtype)
    bounds = karras.new_tensor([s_tmax, s_tmin] if s_tmax < float("inf") else [])  # (the range test's edges)
    split = torch.cat([karras[20:40], bounds, karras.new_zeros(1), karras[40:45].flip(0), karras.new_zeros(1)])
    f32 = lambda t: float(t.to(torch.float32))  # noqa: E731 - what the kernels take
    churned = 0
    for sigmas in (karras, split):
        plan = kdiffusion_plan(sigmas, s_churn, s_tmin, s_tmax)
        assert (plan._device_churn is not None) == (DEVICE != "cpu")
        vector = device_churn(sigmas, s_churn)
        for i in [*range(len(sigmas) - 1), *reversed(range(len(sigmas) - 1))]:
            # k-diffusion's sample_heun lines
            gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
            sigma_hat = sigmas[i] * (gamma + 1)
            step = plan[i]
            assert step.gamma == gamma and step.at_hat.sigma == f32(sigma_hat), i
            assert step.at_hat.dt == f32(sigmas[i + 1] - sigma_hat), i
            assert step.last == bool(sigmas[i + 1] == 0), i
            assert (step.at_next is None) == step.last and (step.last or step.at_next.sigma == f32(sigmas[i + 1])), i
            if gamma > 0:
                churned += 1
                coefficient = (sigma_hat**2 - sigmas[i] ** 2) ** 0.5
                on_host = f32(coefficient) if DEVICE == "cpu" else float(vector[i])
                assert step.noise_coef == on_host, i
                assert float(vector[i]) == float(coefficient), i
            else:
                assert step.noise_coef is None, i
    assert 0 < churned or s_tmax == float("inf")


def test_device_churn_values_reach_their_steps_across_chunks(monkeypatch):
    """On a GPU each step's churn coefficient comes from ``device_churn``'s vector (computed there), sliced per
    chunk: here the plan is told its sigmas are on another device (``device_churn`` then runs on the CPU copy,
    made distinguishable), and every churned step must get its own element (mutation: a chunk's slice taken
    from the vector's start -> fails)."""
    from kve_fast.plan import KPlan, device_churn

    monkeypatch.setattr(plan_module, "CHUNK", 4)
    cpu = real_sampling().get_sigmas_karras(11, 0.05, 20.0)
    monkeypatch.setattr(plan_module, "device_churn", lambda s, c: device_churn(cpu, c) + torch.arange(11.0))
    on_device = types.SimpleNamespace(device=torch.device("cuda"), _version=0)  # (only these are read here)
    plan = KPlan(on_device, cpu, 2.0, 0.0, float("inf"))
    expected = device_churn(cpu, 2.0) + torch.arange(11.0)
    assert [plan[i].noise_coef for i in range(11)] == expected.tolist()


def test_score_and_denoiser_adapters_are_inverse():
    score = GaussianScore(8)
    denoiser = kd.score_to_denoiser(score)
    back = kd.denoiser_to_score(denoiser)
    y = torch.rand(2, 3, 8, 8)
    for sigma_y in (0.05, 1.0, 20.0):
        a, b = back(y, torch.tensor(sigma_y)), score(y, torch.tensor(sigma_y)).sample
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 / sigma_y), sigma_y  # float32 round trip, not bit-exact


def test_fast_noise_is_reproducible_and_not_the_exact_stream():
    denoiser = kd.score_to_denoiser(GaussianScore(8).to(DEVICE))
    sigmas = kd.get_sigmas_karras(6, 0.02, 40.0, device=DEVICE)
    x = torch.randn(4, 3, 8, 8).to(DEVICE) * sigmas[0]
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(kd.sample_heun(denoiser, x, sigmas, s_churn=20.0, disable=True, noise="fast", backend=BACKENDS[-1]))
    assert torch.equal(runs[0], runs[1])
    torch.manual_seed(0)
    exact = kd.sample_heun(denoiser, x, sigmas, s_churn=20.0, disable=True, backend=BACKENDS[-1])
    assert not torch.equal(runs[0], exact)


@pytest.mark.parametrize("kwargs, error, name", [
    ({"sigmas": [1.0, 0.0]}, TypeError, "sigmas"),
    ({"sigmas": torch.tensor([[1.0, 0.0]])}, ValueError, "sigmas"),
    # a churned step whose sigma_hat ** 2 overflows float32 (the square k-diffusion computes there)
    ({"sigmas": torch.tensor([1e30, 1.0, 0.0]), "s_churn": 1.0}, ValueError, "sigmas"),
    ({"backend": "triton", "sigmas": torch.tensor([1.0, 0.0], dtype=torch.float64)}, ValueError, "backend"),
    ({"extra_args": [1]}, TypeError, "extra_args"),
    ({"callback": 3}, TypeError, "callback"),
    ({"backend": "cuda"}, ValueError, "backend"),
    ({"noise": "loud"}, ValueError, "noise"),
    ({"s_noise": -1.0}, ValueError, "s_noise"),
    # every refusal docs/k-diffusion.md lists, and no other
    ({"model": 3}, TypeError, "model"),
    ({"x": torch.zeros(1, 3, 8, 8, dtype=torch.int64)}, TypeError, "x"),
    ({"x": torch.zeros(0, 3, 8, 8)}, ValueError, "x"),
    ({"sigmas": torch.tensor([2, 1, 0])}, TypeError, "sigmas"),
    ({"s_churn": -0.5}, ValueError, "s_churn"),
    ({"s_churn": float("inf")}, ValueError, "s_churn"),
    ({"s_churn": True}, TypeError, "s_churn"),
    ({"s_noise": torch.tensor(1.0)}, TypeError, "s_noise"),
    ({"s_tmin": float("nan")}, ValueError, "s_tmin"),
    ({"s_tmax": "10"}, TypeError, "s_tmax"),
    ({"s_tmax": 10**40, "s_churn": 1.0}, ValueError, "s_tmax"),  # (k-diffusion: torch's OverflowError)
])
def test_bad_arguments_fail_before_any_draw(kwargs, error, name):
    call = {"model": kd.score_to_denoiser(GaussianScore(8)), "x": torch.zeros(1, 3, 8, 8),
            "sigmas": torch.tensor([2.0, 1.0, 0.0]), **kwargs}
    state = torch.get_rng_state()
    with pytest.raises(error, match=name):
        kd.sample_heun(disable=True, **call)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_scalars_run_as_in_k_diffusion(backend):
    """k-diffusion takes numpy scalars for every real argument (ComfyUI's nodes pass them); s_tmin and s_tmax
    were refused (mutation: the old int/float test -> TypeError). The bounds sit on sigmas of the sequence, in
    float32, float64 and int, so the range test's rounding counts."""
    real = real_sampling()
    sigmas = real.get_sigmas_karras(8, 0.05, 20.0, device=DEVICE)
    denoiser = kd.score_to_denoiser(GaussianScore(8).to(DEVICE))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(DEVICE) * sigmas[0]
    for churn in ({"s_churn": np.float32(2.3), "s_tmin": np.float32(sigmas[5]), "s_tmax": np.float64(sigmas[1]),
                   "s_noise": np.float32(1.007)},
                  {"s_churn": np.int64(3), "s_tmin": np.float16(0.5), "s_tmax": np.int32(10), "s_noise": np.int8(1)}):
        torch.manual_seed(4)
        expected = real.sample_heun(denoiser, x, sigmas, disable=True, **churn)
        torch.manual_seed(4)
        got = kd.sample_heun(denoiser, x, sigmas, disable=True, backend=backend, **churn)
        assert_bitwise(got, expected, str(churn))


def test_no_autograd_tape_and_the_rng_after_a_failure_is_k_diffusions():
    """For the drop-in, k-diffusion's side effects win over kve_fast's rule that a failed call puts the RNG back:
    an interrupt leaves the global RNG where k-diffusion leaves it (advanced by the draws made)."""
    unet = UNetDenoiser()
    x = torch.randn(1, 3, 8, 8).requires_grad_(True)
    sigmas = kd.get_sigmas_karras(3, 0.1, 10.0)
    out = kd.sample_euler(unet, x * 10, sigmas, disable=True)
    assert out.grad_fn is None and not out.requires_grad
    calls = []

    def failing(x, sigma):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return x * 0

    after = {}
    for name, sampler in (("real", real_sampling().sample_heun), ("ours", kd.sample_heun)):
        calls.clear()
        torch.manual_seed(5)
        with pytest.raises(KeyboardInterrupt):
            sampler(failing, torch.ones(1, 3, 8, 8), sigmas, disable=True)
        after[name] = torch.get_rng_state()
    assert torch.equal(after["ours"], after["real"])
    assert not torch.equal(after["ours"], torch.manual_seed(5).get_state()), "the draws made must show"

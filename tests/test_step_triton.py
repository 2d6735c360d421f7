"""The fused Triton step kernels, in Triton's interpreter on the CPU: bit-exact against the torch ops.

The interpreter never forms FMAs and divides exactly, so a pass here shows the kernels do the
reference's operations in the reference's order; the kernels' CUDA arithmetic (multiply by the host's
float32 reciprocal instead of dividing) is checked here too, forced under the interpreter; GPU parity
is checked by bench/gpu_check.py. Without Triton, every test that needs it skips (the others run).
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from conftest import (
    BELOW_CAP, CUSTOM, HAS_TRITON, SMALL_SIGMAS, SMALL_SIGMAS_NO_CHURN, GaussianScore, assert_bitwise, assert_mostly_inside,
    check_image_parity, kve_pipe, make_generator, needs_triton, run_reference,
)

import kve_fast
from kve_fast import _warn
from kve_fast.backends import check_backend
from kve_fast.noise import ReferenceNoise, draw_randn
from kve_fast.ops import step_torch
from kve_fast.sampler import plan_steps

if HAS_TRITON:  # with Triton installed, a broken kernel module fails here instead of skipping
    from kve_fast.ops import step_triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _steps(n=8, **config):
    return plan_steps(kve_fast.KarrasVeScheduler(**config), n)


def _rand(shape, seed, scale=1.0):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(DEVICE)


# Sizes not divisible by the block (1024), one below it, and a batch of 1.
SHAPES = [(1, 3, 5, 7), (3, 3, 16, 16), (2, 1, 33, 31)]


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("which", [0, 3, 6])  # gamma = 0 (sigma > s_max), gamma > 0, gamma = 0 (sigma < s_min)
def test_churn_matches_torch(shape, which):
    step = _steps()[which]
    x, eps = _rand(shape, 1, 3.0), _rand(shape, 2)
    hat, xin = step_triton.churn(x, eps, 1.007, step.sigma, step.sigma_hat)
    ref_hat = step_torch.churn(x, 1.007 * eps, step.sigma, step.sigma_hat)
    assert_bitwise(hat, ref_hat, "sample_hat")
    assert_bitwise(xin, step_torch.model_input(ref_hat), "model input")


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("which", [0, 3, 7])  # 7 is the last step: sigma_{i+1} = 0
def test_euler_matches_torch(shape, which):
    step = _steps()[which]
    raw, hat = _rand(shape, 3, 0.2), _rand(shape, 4, 2.0)
    prev, d, xin, pred, img = step_triton.euler(raw, hat, step.sigma_hat, step.sigma_next, want_pred=True, image="float")
    mo = step_torch.scale_model_output(raw, step.sigma_hat)
    r_prev, r_d, r_pred = step_torch.euler(mo, step.sigma_hat, step.sigma_next, hat)
    assert_bitwise(prev, r_prev, "sample_prev")
    assert_bitwise(d, r_d, "derivative")
    assert_bitwise(pred, r_pred, "pred_original_sample")
    assert_bitwise(xin, step_torch.model_input(r_prev), "model input")
    assert_bitwise(img, step_torch.to_image(r_prev), "image")
    _, _, _, _, img8 = step_triton.euler(raw, hat, step.sigma_hat, step.sigma_next, image="uint8")
    assert_bitwise(img8, step_torch.to_image(r_prev, "uint8"), "uint8 image")
    ref_pil = (step_torch.to_image(r_prev).cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    assert_bitwise(img8.cpu(), torch.from_numpy(ref_pil), "uint8 image vs numpy_to_pil's rounding")


@needs_triton
@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")
def test_image_rounding_covers_ties_and_clamping():
    # Values whose x * 255 land on .5 ties, and values far outside [-1, 1], and NaN (propagated like torch).
    k = torch.arange(0, 256, dtype=torch.float32)
    y = (k + 0.5) / 255  # image values at rounding ties
    x = torch.cat([(y - 0.5) * 2, torch.tensor([-5.0, 7.0, -1.0, 1.0, 0.0, -0.0, float("nan")])])
    x = x.reshape(1, 1, 1, -1).to(DEVICE)
    last = _steps()[-1]
    zero = torch.zeros_like(x)
    # raw = 0 -> pred = hat and d = 0: the Euler step leaves the sample as it is, so the image is of x.
    _, _, _, _, img8 = step_triton.euler(zero, x, last.sigma_hat, last.sigma_hat, want_derivative=False, image="uint8")
    _, _, _, _, img = step_triton.euler(zero, x, last.sigma_hat, last.sigma_hat, want_derivative=False, image="float")
    assert_bitwise(img, step_torch.to_image(x))
    assert_bitwise(img8[..., :-1], step_torch.to_image(x, "uint8")[..., :-1])


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fused", [False, True])
def test_heun_matches_torch(shape, fused):
    steps = _steps()
    step, nxt = steps[3], steps[4]
    raw, hat, prev, d = _rand(shape, 5, 0.2), _rand(shape, 6, 2.0), _rand(shape, 7, 2.0), _rand(shape, 8)
    eps = _rand(shape, 9)
    churn = (eps, 1.007, nxt.sigma, nxt.sigma_hat, None) if fused else None
    x, pred, hat_n, xin = step_triton.heun(raw, hat, prev, d, step.sigma_hat, step.sigma_next, want_pred=True,
                                            next_churn=churn)
    mo = step_torch.scale_model_output(raw, step.sigma_next)
    r_x, r_pred = step_torch.heun(mo, step.sigma_hat, step.sigma_next, hat, prev, d)
    assert_bitwise(x, r_x, "corrected sample")
    assert_bitwise(pred, r_pred, "pred_original_sample")
    if fused:
        r_hat = step_torch.churn(r_x, 1.007 * eps, nxt.sigma, nxt.sigma_hat)
        assert_bitwise(hat_n, r_hat, "next sample_hat")
        assert_bitwise(xin, step_torch.model_input(r_hat), "next model input")


# --- the CUDA arithmetic, asked for under the interpreter ---------------------------------------------------
# On CUDA, torch divides a tensor by a 0-d CPU tensor by multiplying with the float32 reciprocal computed
# on the host; the kernels do the same there (``true_div=False``, what ``REFERENCE.true_division`` picks for a
# CUDA device: tests/test_convention.py). That branch is run here on the CPU by asking for it, against
# torch's formula for it, on inputs where it differs from true division (asserted, so a kernel that kept
# dividing would fail).


def _host_reciprocal(sigma) -> torch.Tensor:
    """What torch on CUDA multiplies by for ``x / sigma`` with ``sigma`` a 0-d float32 CPU tensor."""
    return torch.tensor(1.0, dtype=torch.float32) / sigma


def _differs(a, b) -> float:
    return float((a != b).float().mean())


@needs_triton
@pytest.mark.parametrize("shape", [(3, 3, 16, 16), (2, 1, 33, 31)])
@pytest.mark.parametrize("which", [0, 3, 7])  # 7: the last step, sigma_{i+1} = 0
def test_euler_kernel_cuda_arithmetic(shape, which):
    step = _steps()[which]
    # raw scaled so that sigma_hat * model_output ~ sample_hat: x_hat - D(x_hat) is not lost to rounding
    raw, hat = _rand(shape, 3, 1.0 / float(step.sigma_hat) ** 2), _rand(shape, 4, 2.0)
    prev, d, xin, pred, img = step_triton.euler(raw, hat, step.sigma_hat, step.sigma_next, want_pred=True, image="float",
                                                true_div=False)
    # step_torch.euler with the division as CUDA does it
    r_pred = hat + step.sigma_hat * step_torch.scale_model_output(raw, step.sigma_hat)
    r_d = (hat - r_pred) * _host_reciprocal(step.sigma_hat).to(DEVICE)
    r_prev = hat + (step.sigma_next - step.sigma_hat) * r_d
    true_d = (hat.cpu() - r_pred.cpu()) / step.sigma_hat
    assert _differs(r_d.cpu(), true_d) > 0.01, "inputs must tell multiply-by-reciprocal from division apart"
    assert_bitwise(d, r_d, "derivative")
    assert_bitwise(prev, r_prev, "sample_prev")
    assert_bitwise(pred, r_pred, "pred_original_sample")
    assert_bitwise(xin, step_torch.model_input(r_prev), "model input")
    assert_bitwise(img, step_torch.to_image(r_prev), "image")
    assert _differs(d.cpu(), true_d) > 0.01, "the derivative must not be the CPU's (true division)"
    true_prev = hat.cpu() + (step.sigma_next - step.sigma_hat) * true_d
    assert _differs(prev.cpu(), true_prev) > 0, "the outputs must show the arithmetic"


@needs_triton
@pytest.mark.parametrize("shape", [(3, 3, 16, 16), (2, 1, 33, 31)])
@pytest.mark.parametrize("fused", [False, True])
def test_heun_kernel_cuda_arithmetic(shape, fused):
    steps = _steps()
    step, nxt = steps[3], steps[4]
    raw, hat, prev, d = _rand(shape, 5, 0.2), _rand(shape, 6, 2.0), _rand(shape, 7, 2.0), _rand(shape, 8)
    eps = _rand(shape, 9)
    churn = (eps, 1.007, nxt.sigma, nxt.sigma_hat, None) if fused else None
    x, pred, hat_n, xin = step_triton.heun(raw, hat, prev, d, step.sigma_hat, step.sigma_next, want_pred=True,
                                            next_churn=churn, true_div=False)
    # step_torch.heun with the division as CUDA does it
    r_pred = prev + step.sigma_next * step_torch.scale_model_output(raw, step.sigma_next)
    r_dc = (prev - r_pred) * _host_reciprocal(step.sigma_next).to(DEVICE)
    r_x = hat + (step.sigma_next - step.sigma_hat) * (0.5 * d + 0.5 * r_dc)
    true_dc = (prev.cpu() - r_pred.cpu()) / step.sigma_next
    true_x = hat.cpu() + (step.sigma_next - step.sigma_hat) * (0.5 * d.cpu() + 0.5 * true_dc)
    assert _differs(r_dc.cpu(), true_dc) > 0.01, "inputs must tell multiply-by-reciprocal from division apart"
    assert _differs(r_x.cpu(), true_x) > 0, "the corrected sample must show the arithmetic"
    assert_bitwise(pred, r_pred, "pred_original_sample")
    if fused:
        r_hat = step_torch.churn(r_x, 1.007 * eps, nxt.sigma, nxt.sigma_hat)
        assert_bitwise(hat_n, r_hat, "next sample_hat")
        assert_bitwise(xin, step_torch.model_input(r_hat), "next model input")
        assert _differs(hat_n.cpu(), step_torch.churn(true_x, 1.007 * eps.cpu(), nxt.sigma, nxt.sigma_hat)) > 0
    else:
        assert_bitwise(x, r_x, "corrected sample")
        assert _differs(x.cpu(), true_x) > 0, "the corrected sample must not be the CPU's (true division)"


@needs_triton
def test_public_ops_check_their_inputs():
    x = _rand((2, 3, 4, 4), 0)
    step = _steps()[3]
    with pytest.raises(TypeError, match="sample"):
        step_triton.churn(x.double(), x, 1.0, step.sigma, step.sigma_hat)
    with pytest.raises(TypeError, match="eps"):
        step_triton.churn(x, x.half(), 1.0, step.sigma, step.sigma_hat)
    with pytest.raises(ValueError, match="eps"):
        step_triton.churn(x, x[:1], 1.0, step.sigma, step.sigma_hat)
    with pytest.raises(ValueError, match="raw"):
        step_triton.euler(x[:, :1], x, step.sigma_hat, step.sigma_next)
    with pytest.raises(ValueError, match="seed"):
        step_triton.churn(x, None, 1.0, step.sigma, step.sigma_hat)
    with pytest.raises(ValueError, match="image"):
        step_triton.euler(x, x, step.sigma_hat, step.sigma_next, image="jpeg")
    # Non-contiguous inputs are made contiguous, never misread.
    xt = _rand((2, 4, 4, 3), 1).permute(0, 3, 1, 2)
    eps = _rand((2, 3, 4, 4), 2)
    assert not xt.is_contiguous()
    a = step_triton.churn(xt, eps, 1.0, step.sigma, step.sigma_hat)[0]
    b = step_triton.churn(xt.contiguous(), eps, 1.0, step.sigma, step.sigma_hat)[0]
    assert_bitwise(a, b)


# --- the whole pipeline ------------------------------------------------------------------------------

# (model, generator form, batch size, steps, scheduler settings): both UNets (plus the Gaussian score, so
# images stay inside (0, 1), asserted) and the Gaussian score alone, every generator form.
PIPE_CASES = [
    ("test_unet+gaussian", "single", 2, 6, SMALL_SIGMAS),
    ("test_unet+gaussian", "global", 1, 14, {}),
    ("ncsnpp+gaussian", "list", 3, 5, SMALL_SIGMAS_NO_CHURN),
    ("ncsnpp+gaussian", "global", 2, 4, SMALL_SIGMAS),
    ("gaussian", "single", 1, 2, SMALL_SIGMAS_NO_CHURN),
    ("gaussian", "list", 3, 6, SMALL_SIGMAS),
    ("gaussian", "global", 2, 14, CUSTOM),
    ("test_unet+gaussian", "list", 2, 6, BELOW_CAP),
]


@needs_triton
@pytest.mark.parametrize("model, form, batch, steps, config", PIPE_CASES)
def test_triton_pipeline_matches_diffusers(models, model, form, batch, steps, config):
    unet = copy.deepcopy(models(model)).to(DEVICE)
    check_image_parity(unet, form, batch, steps, config, seed=8 + steps, backend="triton")
    # and the final sample (latent), against the real pipeline's last prev_sample
    ours = kve_pipe(unet, **config)(batch, steps, make_generator(form, 7, batch), output_type="latent",
                                    backend="triton").images
    _, ref = run_reference(unet, config, batch, steps, make_generator(form, 7, batch))
    assert_bitwise(ours, ref, "triton vs diffusers latent")


@needs_triton
@pytest.mark.parametrize("model, form", [("test_unet", "single"), ("ncsnpp", "list")])
def test_triton_latent_with_raw_unets_matches_diffusers(models, model, form):
    """The raw UNets' images saturate, their latents (not clamped) do not: compared with diffusers here."""
    unet = copy.deepcopy(models(model)).to(DEVICE)
    ours = kve_pipe(unet)(2, 3, make_generator(form, 7, 2), output_type="latent", backend="triton").images
    _, ref = run_reference(unet, {}, 2, 3, make_generator(form, 7, 2))
    assert_bitwise(ours, ref, "triton vs diffusers latent")


@needs_triton
def test_triton_with_callback_matches_torch(models):
    pipe = kve_pipe(copy.deepcopy(models("gaussian")).to(DEVICE), **SMALL_SIGMAS)
    seen = {}

    def cb(p, i, t, kw):
        seen.setdefault(p._backend_probe, []).append(kw["pred_original_sample"].clone())
        return {}

    out = {}
    for b in ("torch", "triton"):
        pipe._backend_probe = b
        out[b] = pipe(2, 4, torch.Generator().manual_seed(1), output_type="pil", backend=b, callback_on_step_end=cb,
                      callback_on_step_end_tensor_inputs=["sample", "pred_original_sample"]).images
    assert_mostly_inside(out["torch"], "PIL images")
    assert_bitwise(np.stack([np.asarray(i) for i in out["triton"]]), np.stack([np.asarray(i) for i in out["torch"]]))
    for a, b in zip(seen["triton"], seen["torch"]):
        assert_bitwise(a, b, "pred_original_sample")


# --- fast (device) noise -------------------------------------------------------------------------------


def _device_noise(seed, n=4096):
    zero = torch.zeros(n, device=DEVICE)
    # sample = 0, c = 1, S_noise = 1: sample_hat is the generated noise itself
    one, zero_s = torch.tensor(1.0), torch.tensor(0.0)
    return step_triton.churn(zero, None, 1.0, zero_s, one, seed=seed)[0].cpu().double()


@needs_triton
def test_device_noise_is_standard_normal_and_independent():
    from scipy import stats

    a, b = _device_noise(123), _device_noise(124)
    for e in (a, b):
        assert abs(e.mean()) < 5 / 64, "mean of 4096 N(0,1) draws"  # 5 standard errors
        assert abs(e.var() - 1) < 5 * (2 / 4096) ** 0.5, "variance"
        assert stats.normaltest(e.numpy()).pvalue > 1e-4
        assert stats.kstest(e.numpy(), "norm").pvalue > 1e-4
    # independent across steps (seeds) and across positions (samples of a batch are other positions)
    assert abs(np.corrcoef(a.numpy(), b.numpy())[0, 1]) < 5 / 64
    assert abs(np.corrcoef(a[:2048].numpy(), a[2048:].numpy())[0, 1]) < 5 / 45
    assert torch.equal(_device_noise(123), a), "same seed, same noise"
    assert not torch.equal(a, b)


@needs_triton
def test_fast_noise_is_reproducible_and_samples_well():
    unet = GaussianScore(8).to(DEVICE)
    pipe = kve_pipe(unet)
    run = lambda seed, b="triton": pipe(64, 20, torch.Generator().manual_seed(seed), output_type="np", noise="fast", backend=b).images  # noqa: E731
    a, b = run(0), run(0)
    assert np.array_equal(a, b), "fast mode must be deterministic for a seed"
    assert not np.array_equal(a, run(1))
    exact = pipe(64, 20, torch.Generator().manual_seed(0), output_type="np", backend="triton").images
    # Not the reference stream, but the same distribution: per-pixel means agree within sampling error
    # (64 samples, per-pixel std ~0.17: standard error ~0.02 each, difference of two ~0.03).
    assert not np.array_equal(a, exact)
    mean_gap = np.abs(a.mean(0) - exact.mean(0)).mean()
    assert mean_gap < 0.05, mean_gap
    assert abs(a.std() - exact.std()) < 0.02
    torch_fast = run(0, "torch")
    assert np.abs(torch_fast.mean(0) - exact.mean(0)).mean() < 0.05


# --- prefetched reference noise and backend selection -------------------------------------------------


@pytest.mark.parametrize("form", ["single", "list"])
def test_prefetched_reference_noise_is_the_same_stream(form):
    shape = (3, 2, 4, 4)
    plain = ReferenceNoise(shape, make_generator(form, 5, 3), "cpu", steps=6, prefetch=False)
    ahead = ReferenceNoise(shape, make_generator(form, 5, 3), "cpu", steps=6, prefetch=True)
    assert_bitwise(ahead.initial(), plain.initial())
    for _ in range(6):
        assert_bitwise(ahead.step(), plain.step())
    ahead.close()


def test_prefetch_leaves_generators_where_the_consumed_draws_did():
    shape = (2, 3, 4, 4)
    gen = torch.Generator().manual_seed(3)
    ahead = ReferenceNoise(shape, gen, "cpu", steps=10, prefetch=True, depth=4)
    ahead.initial()
    ahead.step()
    ahead.step()
    ahead.close()  # the thread drew further ahead; close() must rewind
    ref = torch.Generator().manual_seed(3)
    for _ in range(3):
        draw_randn(shape, ref)
    assert torch.equal(gen.get_state(), ref.get_state())


def test_backend_selection(monkeypatch):
    import kve_fast.backends as backends

    assert check_backend("auto", torch.device("cpu")) == "torch"
    if os.environ.get("TRITON_INTERPRET") == "1":
        if HAS_TRITON:
            assert check_backend("triton", torch.device("cpu")) == "triton"
        else:  # asked for by name, a missing Triton is an error that says so
            with pytest.raises(ValueError, match="Triton cannot be used"):
                check_backend("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend"):
        check_backend("cuda", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend"):
        check_backend("triton", torch.device("cpu"))
    monkeypatch.setattr(backends, "triton_available", lambda: (False, "ImportError: no triton"))
    _warn.forget()
    with pytest.warns(RuntimeWarning, match="Triton is unavailable"):
        assert check_backend("auto", torch.device("cuda")) == "torch"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_backend("auto", torch.device("cuda")) == "torch"  # warns once only

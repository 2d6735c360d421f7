"""The reference step arithmetic in plain torch, op for op as diffusers' ``KarrasVeScheduler``.

Every faster backend is checked against these functions. Scalars (``sigma``, ``sigma_hat``,
``sigma_next``) are 0-d float32 tensors on the CPU, exactly as the reference pipeline holds them:
torch then divides by them truly on the CPU and multiplies by a host-computed float32 reciprocal on
CUDA, which is what "bit-exact with the reference" means on each device. Never simplify the algebra
here (``(x - pred) / s`` is not rewritten as ``-model_output``): the rounding must stay the reference's.
"""

from __future__ import annotations

import torch

from ..edm_plan import churn_scale
from ..images import to_image
from ..noise import Draw, StepKeys, per_sample_randn

__all__ = ["churn", "model_input", "scale_model_output", "euler", "heun", "to_image", "TorchStep", "KTorchStep",
           "edm_churn_scale", "edm_churn", "edm_euler", "edm_heun", "EDMTorchStep"]


def churn(sample: torch.Tensor, eps: torch.Tensor, sigma, sigma_hat) -> torch.Tensor:
    """Algorithm 2, line 6: x_hat = x + sqrt(t_hat^2 - t^2) * eps (eps already scaled by S_noise)."""
    return sample + ((sigma_hat**2 - sigma**2) ** 0.5 * eps)


def model_input(sample: torch.Tensor) -> torch.Tensor:
    """Map a sample from [-1, 1] to the [0, 1] image space the score model is called in."""
    return (sample + 1) / 2


_to_model_input = model_input  # (the stages name their output `model_input`)


def scale_model_output(raw: torch.Tensor, sigma) -> torch.Tensor:
    """Turn the model's [0, 1]-space score into the reference's ``model_output`` (paper eq. 213)."""
    return (sigma / 2) * raw


def euler(model_output: torch.Tensor, sigma_hat, sigma_next, sample_hat: torch.Tensor):
    """Algorithm 2, lines 7-8: d = (x_hat - D(x_hat)) / t_hat; x_next = x_hat + (t_next - t_hat) d.

    Returns ``(sample_next, derivative, pred_original_sample)`` (diffusers' ``step``: ``sigma_next`` is
    its ``sigma_prev``).
    """
    pred_original_sample = sample_hat + sigma_hat * model_output
    derivative = (sample_hat - pred_original_sample) / sigma_hat
    sample_next = sample_hat + (sigma_next - sigma_hat) * derivative
    return sample_next, derivative, pred_original_sample


def heun(model_output: torch.Tensor, sigma_hat, sigma_next, sample_hat, sample_next, derivative):
    """Algorithm 2, lines 9-11: the second-order correction with d' at t_next.

    Returns ``(sample, pred_original_sample)`` (diffusers' ``step_correct``).
    """
    pred_original_sample = sample_next + sigma_next * model_output
    derivative_corr = (sample_next - pred_original_sample) / sigma_next
    sample = sample_hat + (sigma_next - sigma_hat) * (0.5 * derivative + 0.5 * derivative_corr)
    return sample, pred_original_sample


# NVlabs' EDM and EDM2 samplers (docs/edm-reading.md: both ``edm_sampler`` functions), op for op in the state's
# dtype (float64 in EDM, ``dtype`` in EDM2): every t a 0-d tensor of that dtype on the state's device, as the
# originals hold them, so each division is torch's true division by a device tensor.


# The churn's coefficient ``(t_hat ** 2 - t_cur ** 2).sqrt() * S_noise``: two squares, their difference, the root,
# the product with the Python number ``S_noise`` (rounded to the dtype), all 0-d (the plans' own formula)
edm_churn_scale = churn_scale


def edm_churn(x: torch.Tensor, eps: torch.Tensor, cs) -> torch.Tensor:
    """Line 6: ``x + cs * eps`` with ``cs = edm_churn_scale(...)`` (the 0-d coefficient times S_noise rounded
    first, then times the noise; at gamma = 0 still added: -0.0 becomes +0.0, an infinite draw NaN)."""
    return x + cs * eps


def edm_euler(denoised: torch.Tensor, x_hat: torch.Tensor, t_hat, t_next):
    """Lines 7-8: ``d = (x_hat - D) / t_hat``; ``x_next = x_hat + (t_next - t_hat) * d``, D the net's output cast
    to the state's dtype. Returns ``(x_next, d)``."""
    d = (x_hat - denoised.to(x_hat.dtype)) / t_hat
    return x_hat + (t_next - t_hat) * d, d


def edm_heun(denoised: torch.Tensor, x_hat: torch.Tensor, x_next: torch.Tensor, d: torch.Tensor, t_hat, t_next):
    """Lines 10-11: ``d' = (x_next - D') / t_next``; ``x_hat + (t_next - t_hat) * (0.5 * d + 0.5 * d')`` (two
    halves then their sum: not ``(d + d') / 2``, which differs where the sum overflows or a half is subnormal)."""
    d_prime = (x_next - denoised.to(x_hat.dtype)) / t_next
    return x_hat + (t_next - t_hat) * (0.5 * d + 0.5 * d_prime)


class TorchStep:
    """The torch step backend in the reference's convention: the reference's ops, one small kernel each, on
    any device, with the step's 0-d float32 CPU tensors (``kve_fast.plan.Step``). Every output is a new
    tensor; what a stage does not want (None) is not computed.

    Noise arrives as a tensor (the reference's stream) or, in fast mode, as per-sample keys
    (``kve_fast.noise.StepKeys``: sample b drawn here by a device generator seeded with its key; an int
    seed is still taken, for the whole tensor).
    """

    name = "torch"
    fuses_image = False
    reads = None  # any dtype: the reference's ops promote as they do there

    @staticmethod
    def _eps(noise, like: torch.Tensor) -> torch.Tensor:
        if isinstance(noise, Draw):
            noise = noise.get(like)
        if isinstance(noise, StepKeys):  # fast mode: sample b from its own device generator, keyed per sample
            return per_sample_randn(noise.host, like.shape, like.device).to(like.dtype)
        if isinstance(noise, int):
            g = torch.Generator(like.device).manual_seed(noise)
            return torch.randn(like.shape, generator=g, device=like.device).to(like.dtype)
        return noise

    def churn(self, x, values, *, noise: bool, hat, model_input):
        """Lines 5-6: ``x + sqrt(sigma_hat^2 - sigma^2) * (S_noise * eps)``; returns ``(x_hat, model input)``."""
        step = values.step
        eps = values.s_noise * self._eps(values.noise, x)
        x_hat = churn(x, eps, step.sigma, step.sigma_hat)
        return x_hat, None if model_input is None else _to_model_input(x_hat)

    def euler(self, raw, hat, values, *, x_next, d, model_input, denoised, image):
        """Lines 7-8 from the raw model output; returns ``(x_next, d, model input, denoised, image)``."""
        sigma_hat, sigma_next = values.step.sigma_hat, values.step.sigma_next  # (each access: a new 0-d tensor)
        # a low-precision UNet's output read exactly, in the (contiguous) state's layout
        model_output = scale_model_output(raw.float().contiguous(), sigma_hat)
        sample_next, derivative, pred = euler(model_output, sigma_hat, sigma_next, hat)
        return (sample_next, derivative, None if model_input is None else _to_model_input(sample_next), pred,
                None if image is None else to_image(sample_next, image[0]))

    def advance(self, hat, d, values, *, x_next):
        """Line 8 from a ``d`` computed earlier: ``hat + (sigma_next - sigma_hat) * d``."""
        return hat + (values.step.sigma_next - values.step.sigma_hat) * d

    def heun(self, raw, hat, x_next, d, values, *, x, denoised, then):
        """Lines 9-11, then (``then``: ``(ChurnValues, noise, hat, model input)``) the next step's churn;
        returns ``(x, denoised, hat_next, model_input_next)``."""
        sigma_hat, sigma_next = values.step.sigma_hat, values.step.sigma_next
        model_output = scale_model_output(raw.float().contiguous(), sigma_next)
        sample, pred = heun(model_output, sigma_hat, sigma_next, hat, x_next, d)
        if then is None:
            return sample, pred, None, None
        values_next, noise, hat_next, input_next = then
        return (sample, pred) + self.churn(sample, values_next, noise=noise, hat=hat_next, model_input=input_next)

    def to_image(self, sample, kind: str):
        return to_image(sample, kind)


def _append_dims(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t[(...,) + (None,) * (ndim - t.ndim)]


class KTorchStep:
    """k-diffusion's step arithmetic in plain torch, op for op as its ``sample_heun`` / ``sample_euler``.

    The model is a denoiser called at x_hat; scalars are 0-d tensors on the sigmas' device (from
    ``kve_fast.plan.KStep``), so every division is torch's true division by a device tensor.
    """

    name = "torch"
    fuses_image = False
    reads = None

    def churn(self, x, values, *, noise: bool, hat, model_input):
        """``eps = randn_like(x) * s_noise``; ``x = x + eps * (sigma_hat ** 2 - sigma ** 2) ** 0.5`` if gamma > 0."""
        step = values.step
        eps = TorchStep._eps(values.noise, x) * values.s_noise
        if not noise:
            return x, None
        sigma, sigma_hat = step.sigma, step.sigma_hat_on_device()
        return x + eps * (sigma_hat**2 - sigma**2) ** 0.5, None

    def euler(self, raw, hat, values, *, x_next, d, model_input, denoised, image):
        """``d = (x - denoised) / sigma_hat``; ``x = x + d * dt`` with ``dt = sigmas[i + 1] - sigma_hat``."""
        step = values.step
        sigma_hat = step.sigma_hat_on_device()
        derivative = (hat - raw) / _append_dims(sigma_hat, hat.ndim)
        return hat + derivative * (step.sigma_next - sigma_hat), derivative, None, raw, None

    def advance(self, hat, d, values, *, x_next):
        """``x + d * dt`` after the callback, with ``dt = sigmas[i + 1] - sigma_hat``."""
        step = values.step
        return hat + d * (step.sigma_next - step.sigma_hat_on_device())

    def heun(self, raw, hat, x_next, d, values, *, x, denoised, then):
        """``d_2 = (x_2 - denoised_2) / sigmas[i + 1]``; ``x = x + (d + d_2) / 2 * dt``, then the next churn."""
        step = values.step
        sigma_next = step.sigma_next
        dt = sigma_next - step.sigma_hat_on_device()
        d_2 = (x_next - raw) / _append_dims(sigma_next, x_next.ndim)
        d_prime = (d + d_2) / 2
        sample = hat + d_prime * dt
        if then is None:
            return sample, raw, None, None
        values_next, noise, hat_next, input_next = then
        return (sample, raw) + self.churn(sample, values_next, noise=noise, hat=hat_next, model_input=input_next)

    def to_image(self, sample, kind: str):
        return to_image(sample, kind)


class EDMTorchStep:
    """NVlabs' EDM/EDM2 step arithmetic in plain torch (``edm_churn``, ``edm_euler``, ``edm_heun``: the originals'
    ops in the state's dtype), with the step's 0-d tensors (``kve_fast.edm_plan.EStep``) on the state's device. Line
    6 draws its noise only where it runs (``noise``: every step in EDM, where it churns in EDM2), and is
    handed the state itself, as the originals hand it to their ``randn_like``. The net's output is cast to the
    state's dtype by ``edm_euler``/``edm_heun`` (``.to(dtype)``, as the originals cast it)."""

    name = "torch"
    fuses_image = False
    reads = None

    def churn(self, x, values, *, noise: bool, hat, model_input):
        """``x + cs * randn_like(x)`` where line 6 runs; else x itself (EDM2), nothing drawn."""
        if not noise:
            return x, None
        eps = values.noise.get(x) if isinstance(values.noise, Draw) else values.noise
        return edm_churn(x, eps, values.coef), None

    def euler(self, raw, hat, values, *, x_next, d, model_input, denoised, image):
        step = values.step
        x_next, d = edm_euler(raw, hat, step.t_hat, step.t_next)
        return x_next, d, None, None, None

    def heun(self, raw, hat, x_next, d, values, *, x, denoised, then):
        """The corrected sample, then (``then``) the next step's line 6 of it."""
        step = values.step
        sample = edm_heun(raw, hat, x_next, d, step.t_hat, step.t_next)
        if then is None:
            return sample, None, None, None
        values_next, noise, hat_next, input_next = then
        return (sample, None) + self.churn(sample, values_next, noise=noise, hat=hat_next, model_input=input_next)

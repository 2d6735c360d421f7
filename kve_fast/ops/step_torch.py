"""The reference step arithmetic in plain torch, op for op as diffusers' ``KarrasVeScheduler``.

Every faster backend is checked against these functions. Scalars (``sigma``, ``sigma_hat``,
``sigma_prev``) are 0-d float32 tensors on the CPU, exactly as the reference pipeline holds them:
torch then divides by them truly on the CPU and multiplies by a host-computed float32 reciprocal on
CUDA, which is what "bit-exact with the reference" means on each device. Never simplify the algebra
here (``(x - pred) / s`` is not rewritten as ``-model_output``): the rounding must stay the reference's.
"""

from __future__ import annotations

import torch

from ..images import to_image
from ..noise import StepKeys, per_sample_randn

__all__ = ["churn", "model_input", "scale_model_output", "euler", "heun", "to_image", "TorchStep", "KTorchStep"]


def churn(sample: torch.Tensor, eps: torch.Tensor, sigma, sigma_hat) -> torch.Tensor:
    """Algorithm 2, line 6: x_hat = x + sqrt(t_hat^2 - t^2) * eps (eps already scaled by S_noise)."""
    return sample + ((sigma_hat**2 - sigma**2) ** 0.5 * eps)


def model_input(sample: torch.Tensor) -> torch.Tensor:
    """Map a sample from [-1, 1] to the [0, 1] image space the score model is called in."""
    return (sample + 1) / 2


def scale_model_output(raw: torch.Tensor, sigma) -> torch.Tensor:
    """Turn the model's [0, 1]-space score into the reference's ``model_output`` (paper eq. 213)."""
    return (sigma / 2) * raw


def euler(model_output: torch.Tensor, sigma_hat, sigma_prev, sample_hat: torch.Tensor):
    """Algorithm 2, lines 7-8: d = (x_hat - D(x_hat)) / t_hat; x_next = x_hat + (t_next - t_hat) d.

    Returns ``(sample_prev, derivative, pred_original_sample)``.
    """
    pred_original_sample = sample_hat + sigma_hat * model_output
    derivative = (sample_hat - pred_original_sample) / sigma_hat
    sample_prev = sample_hat + (sigma_prev - sigma_hat) * derivative
    return sample_prev, derivative, pred_original_sample


def heun(model_output: torch.Tensor, sigma_hat, sigma_prev, sample_hat, sample_prev, derivative):
    """Algorithm 2, lines 9-11: the second-order correction with d' at t_next.

    Returns ``(sample_prev, pred_original_sample)``.
    """
    pred_original_sample = sample_prev + sigma_prev * model_output
    derivative_corr = (sample_prev - pred_original_sample) / sigma_prev
    sample_prev = sample_hat + (sigma_prev - sigma_hat) * (0.5 * derivative + 0.5 * derivative_corr)
    return sample_prev, pred_original_sample


class TorchStep:
    """The torch step backend: the reference's ops, one small kernel each, on any device.

    Noise arrives as a tensor (the reference's stream) or, in fast mode, as per-sample keys
    (``kve_fast.noise.StepKeys``: sample b drawn here by a device generator seeded with its key; an int
    seed is still taken, for the whole tensor).
    """

    name = "torch"

    def __init__(self, s_noise: float, want_pred: bool = False, shape=None):
        self.s_noise = s_noise

    @staticmethod
    def _eps(noise, like: torch.Tensor) -> torch.Tensor:
        if isinstance(noise, StepKeys):  # fast mode: sample b from its own device generator, keyed per sample
            return per_sample_randn(noise.host, like.shape, like.device)
        if isinstance(noise, int):
            g = torch.Generator(like.device).manual_seed(noise)
            return torch.randn(like.shape, generator=g, device=like.device)
        return noise

    def churn(self, sample, noise, step, keep: bool = False):
        """Lines 5-6 from unscaled noise; returns ``(sample_hat, model input)`` (always new tensors)."""
        eps = self.s_noise * self._eps(noise, sample)
        sample_hat = churn(sample, eps, step.sigma, step.sigma_hat)
        return sample_hat, model_input(sample_hat)

    def euler(self, raw, sample_hat, step, want_input: bool, want_derivative: bool = True,
              image: str | None = None, keep: bool = True):
        """Lines 7-8 from the raw model output.

        Returns ``(sample_prev, derivative, denoised, model input, image)``.
        """
        sigma_hat = step.sigma_hat
        # a low-precision UNet's output read exactly, in the (contiguous) state's layout
        model_output = scale_model_output(raw.float().contiguous(), sigma_hat)
        sample_prev, derivative, pred = euler(model_output, sigma_hat, step.sigma_prev, sample_hat)
        xin = model_input(sample_prev) if want_input else None
        return sample_prev, derivative, pred, xin, None if image is None else to_image(sample_prev, image)

    def heun(self, raw, sample_hat, sample_prev, derivative, step, next_step=None, eps_next=None):
        """Lines 9-11, then (if ``next_step``) the next step's churn; returns ``(sample, denoised, churned)``."""
        sigma_prev = step.sigma_prev
        model_output = scale_model_output(raw.float().contiguous(), sigma_prev)
        sample, pred = heun(model_output, step.sigma_hat, sigma_prev, sample_hat, sample_prev, derivative)
        churned = None if next_step is None else self.churn(sample, eps_next, next_step)
        return sample, pred, churned

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
    denoiser = True

    def __init__(self, s_noise: float, want_pred: bool = False, shape=None):
        self.s_noise = s_noise

    def churn(self, sample, noise, step, keep: bool = False):
        """``eps = randn_like(x) * s_noise``; ``x = x + eps * (sigma_hat ** 2 - sigma ** 2) ** 0.5`` if gamma > 0."""
        eps = TorchStep._eps(noise, sample) * self.s_noise
        if step.churn is None:
            return sample, sample
        sigma, sigma_hat = step.sigma, step.sigma_hat_on_device()
        x_hat = sample + eps * (sigma_hat**2 - sigma**2) ** 0.5
        return x_hat, x_hat

    def euler(self, raw, sample_hat, step, want_input: bool, want_derivative: bool = True,
              image: str | None = None, keep: bool = True):
        """``d = (x - denoised) / sigma_hat``; ``x = x + d * dt`` with ``dt = sigmas[i + 1] - sigma_hat``."""
        sigma_hat = step.sigma_hat_on_device()
        d = (sample_hat - raw) / _append_dims(sigma_hat, sample_hat.ndim)
        x_prev = sample_hat + d * (step.sigma_next - sigma_hat)
        return x_prev, d, raw, x_prev if want_input else None, None

    def heun(self, raw, sample_hat, sample_prev, derivative, step, next_step=None, noise_next=None):
        """``d_2 = (x_2 - denoised_2) / sigmas[i + 1]``; ``x = x + (d + d_2) / 2 * dt``, then the next churn."""
        sigma_next = step.sigma_next
        dt = sigma_next - step.sigma_hat_on_device()
        d_2 = (sample_prev - raw) / _append_dims(sigma_next, sample_prev.ndim)
        d_prime = (derivative + d_2) / 2
        sample = sample_hat + d_prime * dt
        churned = None if next_step is None else self.churn(sample, noise_next, next_step)
        return sample, raw, churned

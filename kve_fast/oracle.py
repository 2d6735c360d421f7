"""An exact oracle for the sampler: Gaussian data, whose score is known in closed form.

For data N(mu, s^2) per pixel the ideal denoiser is linear, D(x; sigma) = (s^2 x + sigma^2 mu) /
(s^2 + sigma^2), so every step of Algorithm 2 is an affine map of the sample plus Gaussian churn noise,
and the sampler's output is exactly Gaussian. ``output_moments`` propagates its mean and variance in
float64 without sampling, so the 2-Wasserstein distance to the data is computed exactly;
``GaussianScore`` is the same oracle as a model the sampler can call, so the two can be compared.
"""

from __future__ import annotations

import math
import types

import numpy as np
import torch

from .sampler import plan_steps
from .karras_ve_scheduler import KarrasVeScheduler


class GaussianScore(torch.nn.Module):
    """The exact score of data N(mean, std^2) per pixel in [0, 1] image space, called like a UNet.

    ``model(y, sigma_y).sample`` with ``y`` in [0, 1] space and ``sigma_y = sigma / 2`` returns
    ``(mean - y) / (std^2 + sigma_y^2)``, the reference pipeline's model convention.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        if mean.shape != std.shape or mean.dim() != 3:
            raise ValueError("`mean` and `std` must both be (channels, height, width)")
        self.register_buffer("mean", mean.to(torch.float32))
        self.register_buffer("std", std.to(torch.float32))
        c, h, w = mean.shape
        self.config = types.SimpleNamespace(sample_size=(h, w) if h != w else h, in_channels=c, out_channels=c)

    @classmethod
    def random(cls, channels: int = 3, size: int = 8, seed: int = 3, mean: float = 0.5, spread: float = 0.2,
               std: tuple[float, float] = (0.1, 0.2)) -> "GaussianScore":
        """Per-pixel means in mean +- spread / 2 and standard deviations in ``std``, from ``seed``."""
        g = torch.Generator().manual_seed(seed)
        m = mean + spread * (torch.rand(channels, size, size, generator=g) - 0.5)
        s = std[0] + (std[1] - std[0]) * torch.rand(channels, size, size, generator=g)
        return cls(m, s)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def dtype(self) -> torch.dtype:
        return self.mean.dtype

    def forward(self, y, sigma):
        from diffusers.utils import BaseOutput

        sigma = torch.as_tensor(sigma, dtype=y.dtype, device=y.device)
        return BaseOutput(sample=(self.mean - y) / (self.std**2 + sigma**2))

    def x_moments(self) -> tuple[np.ndarray, np.ndarray]:
        """The data's per-pixel mean and variance in the sampler's [-1, 1] space (float64)."""
        mu = 2 * self.mean.double().cpu().numpy() - 1
        return mu, (2 * self.std.double().cpu().numpy()) ** 2


def output_moments(steps, mu: np.ndarray, var: np.ndarray, init_sigma: float, s_noise: float,
                   solver: str = "heun") -> tuple[np.ndarray, np.ndarray]:
    """Exact per-pixel mean and variance of the sampler's output for data N(mu, var) in x space.

    Follows Algorithm 2 step by step with the plan's float32 sigmas, in float64: x_0 ~ N(0, init^2),
    churn adds variance (sigma_hat^2 - sigma^2) S_noise^2, and the Euler and Heun updates with the
    ideal denoiser are affine, x -> A x + B, so mean -> A mean + B and variance -> A^2 variance.
    """
    m = np.zeros_like(mu)
    v = np.full_like(var, float(init_sigma) ** 2)

    def denoiser(sigma):  # D(x) = a x + b
        a = var / (var + sigma**2)
        return a, (1 - a) * mu

    for st in steps:
        sigma, sigma_hat = float(st.sigma), float(st.sigma_hat)
        sigma_next = float(st.sigma_next)
        v = v + (sigma_hat**2 - sigma**2) * s_noise**2  # line 6
        a, b = denoiser(sigma_hat)
        # d = (x - D(x)) / sigma_hat = p x + q ; x' = x + h d  (lines 7-8)
        h = sigma_next - sigma_hat
        p, q = (1 - a) / sigma_hat, -b / sigma_hat
        A1, B1 = 1 + h * p, h * q
        if solver == "heun" and sigma_next != 0:
            a2, b2 = denoiser(sigma_next)
            p2, q2 = (1 - a2) / sigma_next, -b2 / sigma_next
            # d' = p2 x' + q2 with x' = A1 x + B1 ; x_new = x + h (d + d') / 2  (lines 9-11)
            A = 1 + h * 0.5 * (p + p2 * A1)
            B = h * 0.5 * (q + p2 * B1 + q2)
        else:
            A, B = A1, B1
        m, v = A * m + B, A * A * v
    return m, v


def w2_diagonal(m1, v1, m2, v2) -> float:
    """2-Wasserstein distance between Gaussians with diagonal covariances (per-pixel means, variances)."""
    return math.sqrt(float(np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)))


def sampler_w2(model: GaussianScore, scheduler: KarrasVeScheduler, num_inference_steps: int,
               solver: str = "heun") -> float:
    """Exact W2 between the sampler's output and the data, for ``model``'s Gaussian data."""
    mu, var = model.x_moments()
    steps = plan_steps(scheduler, num_inference_steps)
    m, v = output_moments(steps, mu, var, scheduler.init_noise_sigma, scheduler.config.s_noise, solver)
    return w2_diagonal(m, v, mu, var)


def nfe(num_inference_steps: int, solver: str) -> int:
    """Model evaluations of a run: Heun 2N - 1 (no correction on the last step), Euler N."""
    return 2 * num_inference_steps - 1 if solver == "heun" else num_inference_steps


def w2_table(nfes=(9, 19, 39, 79, 159), churn: bool = True, model: GaussianScore | None = None) -> list[dict]:
    """W2 to the data against model evaluations, per schedule and solver (Heun runs (NFE + 1) / 2 steps)."""
    model = model or GaussianScore.random(channels=1, size=8)
    rows = []
    for schedule in ("diffusers", "ve", "edm"):
        config = {"sigma_schedule": schedule} if churn else {"sigma_schedule": schedule, "s_churn": 0.0}
        scheduler = KarrasVeScheduler(**config)
        for solver in ("euler", "heun"):
            row = {"schedule": schedule, "solver": solver, "churn": churn}
            for budget in nfes:
                n = (budget + 1) // 2 if solver == "heun" else budget
                row[budget] = sampler_w2(model, scheduler, n, solver)
            rows.append(row)
    return rows


def format_w2_table(rows: list[dict], nfes) -> str:
    head = "| schedule | solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |"
    lines = [head, "|" + "---|" * (2 + len(nfes))]
    for r in rows:
        lines.append(f"| {r['schedule']} | {r['solver']} | " + " | ".join(f"{r[n]:.4f}" for n in nfes) + " |")
    return "\n".join(lines)


def main() -> None:
    nfes = (9, 19, 39, 79, 159)
    model = GaussianScore.random(channels=1, size=8)
    mu, var = model.x_moments()
    print("Exact 2-Wasserstein distance between the sampler's output and Gaussian data (8x8, 1 channel),")
    print(f"data W2 scale: ||std|| = {math.sqrt(var.sum()):.3f}; the sampler's start N(0, sigma_max^2) is far.\n")
    for churn in (True, False):
        print("with the default churn (S_churn=80, S_tmin=0.05, S_tmax=50, S_noise=1.007)" if churn
              else "deterministic (S_churn=0)")
        print(format_w2_table(w2_table(nfes, churn, model), nfes))
        print()


if __name__ == "__main__":
    main()

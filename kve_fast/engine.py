"""The step engine: one object that owns a whole step of Algorithm 2.

The sampler loop asks the engine for each stage in the paper's order (churn, Euler, Heun) and calls
the model in between; the engine decides which kernels run and fuse, which buffers they write, and
what is handed out:

- the churn of step i+1 (lines 4-6) is fused into the Heun correction of step i (lines 9-11) when no
  callback needs to see the sample in between (``hand_out=False``), so ``churn`` then only returns
  the model input that the previous step already wrote;
- the final image is fused into the last Euler stage when nothing can change the sample after it;
- what leaves the engine (``sample``, ``denoised`` for a callback, the final sample or image) is
  always a new tensor; everything else lives in the backend's reused buffers.

The arithmetic itself is a step backend's (``kve_fast.ops``: torch or Triton), with the scalars of each
step from ``kve_fast.plan``; noise comes from a noise source (``kve_fast.noise``).
"""

from __future__ import annotations

import torch


class StepEngine:
    """Runs the stages of each step on ``backend`` with noise from ``source`` (see the module docstring).

    Args:
        backend: a step backend (``TorchStep`` or ``TritonStep``).
        source: a noise source; ``source.step()`` gives one step's churn noise.
        plan: the run's steps (``kve_fast.plan.Plan``).
        solver: ``"heun"`` (Algorithm 2) or ``"euler"`` (no correction).
        call_model: ``call_model(x_in, noise_level)`` returns the model's raw output (a score for the
            reference's convention, the denoised image for k-diffusion's), checked.
        noise_level: ``noise_level(step, "hat" | "next")``, the model's noise-level argument at sigma_hat
            or at sigma_{i+1} (``sigma / 2`` as a 0-d tensor, or k-diffusion's ``sigma * s_in``).
        hand_out: a callback sees (and may replace) the sample after every step: nothing is fused across
            steps, and ``sample``/``denoised`` are kept as new tensors.
        image: None, ``"float"`` or ``"uint8"``: the final image the run returns (fused into the last
            Euler stage where possible).
    """

    def __init__(self, backend, source, plan, solver: str, hand_out: bool, image: str | None, call_model=None,
                 noise_level=None):
        self.backend, self.source, self.plan = backend, source, plan
        self.call_model, self.noise_level = call_model, noise_level
        self.heun_solver, self.hand_out, self.image_kind = solver == "heun", hand_out, image
        self.sample: torch.Tensor | None = None
        self.denoised: torch.Tensor | None = None
        self.image: torch.Tensor | None = None
        self._fused = None  # (x_hat, model input) of the next step, written by the previous correction
        self._stage = None  # (x_hat, x_prev, d) between the Euler stage and the correction

    def start(self, x0: torch.Tensor) -> None:
        """Line 1: the initial sample x_0 (already scaled, in the layout the backend keeps)."""
        self.sample = x0

    def step(self, step, on_denoised=None) -> None:
        """Lines 4-11 of Algorithm 2 for one step; ``on_denoised(step, x_hat, D)`` runs after the first model call."""
        # Lines 4-6: gamma_i; sigma_hat = sigma_i + gamma_i sigma_i; x_hat = x_i + sqrt(sigma_hat^2 - sigma_i^2) eps
        x_in = self.churn(step)
        # Lines 7-8: d = (x_hat - D(x_hat; sigma_hat)) / sigma_hat; x_{i+1} = x_hat + (sigma_{i+1} - sigma_hat) d
        raw = self.call_model(x_in, self.noise_level(step, "hat"))
        if on_denoised is not None:
            on_denoised(step, self.x_hat, raw)
        x_in = self.euler(step, raw)
        # Lines 9-11: if sigma_{i+1} != 0: d' = (x_{i+1} - D(x_{i+1}; sigma_{i+1})) / sigma_{i+1};
        # x_{i+1} = x_hat + (sigma_{i+1} - sigma_hat) (d / 2 + d' / 2)
        if x_in is not None:
            self.heun(step, self.call_model(x_in, self.noise_level(step, "next")))

    def corrects(self, step) -> bool:
        """Whether step ``step`` has a second-order correction (Heun, and sigma_{i+1} > 0)."""
        return self.heun_solver and not step.last

    def churn(self, step) -> torch.Tensor:
        """Lines 4-6: x_hat = x + sqrt(sigma_hat^2 - sigma^2) S_noise eps; returns the model's input at sigma_hat
        ((x_hat + 1) / 2 for a score model, x_hat itself for a denoiser)."""
        if self._fused is None:
            self._fused = self.backend.churn(self.sample, self.source.step(), step, keep=self.hand_out)
        (x_hat, x_in), self._fused = self._fused, None
        self._stage = (x_hat, None, None)
        return x_in

    @property
    def x_hat(self) -> torch.Tensor:
        """This step's x_hat, between ``churn`` and ``euler`` (a new tensor when ``hand_out``)."""
        return self._stage[0]

    def euler(self, step, raw: torch.Tensor) -> torch.Tensor | None:
        """Lines 7-8 from the model's raw output at sigma_hat: d = (x_hat - D) / sigma_hat, x_prev = x_hat + (sigma_prev - sigma_hat) d.

        Returns the model input at sigma_prev when the step has a correction, else None (the step is
        done and ``sample`` is x_prev).
        """
        correct = self.corrects(step)
        x_hat = self._stage[0]
        fuse_image = step.last and not self.hand_out and getattr(self.backend, "fuses_image", True)
        prev, d, denoised, x_in, image = self.backend.euler(
            raw, x_hat, step, want_input=correct, want_derivative=correct,
            image=self.image_kind if fuse_image else None, keep=step.last or self.hand_out)
        self.denoised, self.image = denoised, image
        if not correct:
            self.sample, self._stage = prev, None
            return None
        self._stage = (x_hat, prev, d)
        return x_in

    def heun(self, step, raw: torch.Tensor) -> None:
        """Lines 9-11 from the model's raw output at sigma_prev: x = x_hat + (sigma_prev - sigma_hat) (d + d') / 2,
        fused with the next step's lines 4-6 unless the sample must be handed out first."""
        x_hat, prev, d = self._stage
        i = step.index
        fuse = not self.hand_out and i + 1 < len(self.plan)
        nxt = self.plan[i + 1] if fuse else None
        self.sample, self.denoised, self._fused = self.backend.heun(
            raw, x_hat, prev, d, step, nxt, self.source.step() if fuse else None)
        self._stage = None

    def replace(self, sample: torch.Tensor) -> None:
        """A callback's new sample (only between steps, with ``hand_out``): the next churn starts from it."""
        self.sample = sample.contiguous()
        self.image = None

    def output(self) -> torch.Tensor:
        """The final sample, or the final image when one was asked for."""
        if self.image_kind is None:
            return self.sample
        if self.image is None:
            self.image = self.backend.to_image(self.sample, self.image_kind)
        return self.image

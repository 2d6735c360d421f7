"""The accuracy yardstick for kve_fast's non-exact modes (low precision, TF32, the fast FIR kernel), shared by
tests/test_accuracy.py and bench/precision_check.py: the float64 twin of Algorithm 2 (``algorithm2``), the
plain PyTorch way of running a model in a low dtype (``InDtype``), the cases, and the rule
(``YARDSTICK_FACTOR``: flash-attention's; see tests/test_accuracy.py for what each constant was measured as).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import numpy as np
import torch

import kve_fast
from kve_fast.oracle import GaussianScore
from kve_fast.precision import YARDSTICK_FACTOR  # noqa: F401 - imported from here by the tests and bench/
from kve_fast.sampler import plan_steps
from kve_fast.testing import MODELS, SMALL_SIGMAS

LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}

# the yardstick rule (kve_fast.precision.YARDSTICK_FACTOR: defined there, below this module, so the benchmark's
# accuracy gate reads it without importing the test cases)
# A low-precision run must land far further from float64 than float32 does, or the dtype did not take
# effect: bf16's unit roundoff is 2^16 times float32's and fp16's 2^13 times; measured 1,300x (fp16 autocast,
# test UNet) to 38,000x (bf16, NCSN++); 100x leaves a wide margin and still fails a run that stayed in float32.
TOOK_EFFECT = 100.0
# The float32 loop against kve_fast's torch backend: measured 0 (the same bits: ``algorithm2`` in float32
# is the reference's arithmetic op for op). Not required to be bit-exact, since it is only a yardstick: a
# loop that rounded a few ops differently would land about as far as float32 lands from float64 (up to
# 1.7e-6 here), which 1e-5 accepts, while staying 7x below the smallest distance it must resolve (7.2e-5).
LOOP_TOLERANCE = 1e-5
# float32 against float64, per image RMS: float32's unit roundoff (6e-8) grown over a run; measured 5.6e-8 to
# 1.7e-6 on these cases. 1e-5 is 6x over the worst and 7x under the smallest low-precision distance: it
# checks that the float64 twin is the same sampler (a wrong noise draw or step puts it O(0.1) to O(1) away).
FP32_TOLERANCE = 1e-5


def _sample_of(out) -> torch.Tensor:
    """The model output's tensor (``.sample`` of a diffusers output, else the tensor itself)."""
    return out.sample if hasattr(out, "sample") else out


@torch.no_grad()
def algorithm2(model, steps, shape, generator, *, init_sigma: float | None = None, x0: torch.Tensor | None = None,
               s_noise: float = 1.0, dtype: torch.dtype = torch.float64, device="cpu") -> torch.Tensor:
    """Algorithm 2 (Heun with churn) as diffusers' ``KarrasVePipeline`` runs it, state and scalars in ``dtype``.

    ``steps``: a ``kve_fast.plan`` plan; its float32 noise levels are used as they are, so the float64
    run differs from the float32 one by its arithmetic only. Noise is the reference's stream (see
    ``kve_fast.noise.ReferenceNoise``): float32 ``torch.randn(shape, generator=generator)`` on the
    generator's device, first the initial sample (times ``init_sigma``; skipped when ``x0`` is given),
    then one draw per step (also where gamma = 0), each moved to ``device`` and upcast to ``dtype``.
    The model is called as the reference calls it, ``model((x + 1) / 2, sigma / 2)`` with ``sigma / 2``
    a 0-d ``dtype`` tensor on the CPU, and its output is read in ``dtype``. In float32 with a float32
    model this is the reference's arithmetic, op for op.
    """
    def scalar(v) -> torch.Tensor:
        return torch.tensor(float(v), dtype=dtype)

    def score(x, half_sigma):
        return _sample_of(model(x, half_sigma)).to(dtype)

    if x0 is None:
        x = torch.randn(shape, generator=generator).to(device, dtype) * init_sigma
    else:
        x = x0.to(device, dtype)
    for st in steps:
        sigma, sigma_hat = scalar(st.sigma), scalar(st.sigma_hat)
        sigma_next = 0 if st.last else scalar(st.sigma_next)
        eps = s_noise * torch.randn(shape, generator=generator).to(device, dtype)
        x_hat = x + ((sigma_hat**2 - sigma**2) ** 0.5 * eps)                              # lines 4-6
        denoised = x_hat + sigma_hat * ((sigma_hat / 2) * score((x_hat + 1) / 2, sigma_hat / 2))
        d = (x_hat - denoised) / sigma_hat                                                  # line 7
        x_next = x_hat + (sigma_next - sigma_hat) * d                                       # line 8
        if not st.last:                                                                     # lines 9-11
            denoised = x_next + sigma_next * ((sigma_next / 2) * score((x_next + 1) / 2, sigma_next / 2))
            d_next = (x_next - denoised) / sigma_next
            x_next = x_hat + (sigma_next - sigma_hat) * (0.5 * d + 0.5 * d_next)
        x = x_next
    return x


class InDtype(torch.nn.Module):
    """A model run the plain PyTorch way in ``dtype``: a converted copy, its input cast to ``dtype``, its
    output cast back to float32; the noise-level argument is passed on as the sampler gives it (what a
    user writes by hand around diffusers' pipeline)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model = copy.deepcopy(model).to(dtype)
        self.run_dtype = dtype
        self.config = model.config

    def forward(self, x, sigma):
        return _sample_of(self.model(x.to(self.run_dtype), sigma)).float()


class ParamGaussian(GaussianScore):
    """``kve_fast.oracle.GaussianScore`` with its mean and std as (frozen) parameters instead of buffers.

    kve_fast reads a model's dtype from its parameters only (``kve_fast.precision.model_dtype``): a
    converted ``GaussianScore`` (buffers only) counts as float32 and gets float32 inputs, so its
    arithmetic is promoted back to float32. With parameters, ``.to(torch.bfloat16)`` makes kve_fast call
    it in bf16 and every op of the oracle runs in bf16, like a UNet's.
    """

    def __init__(self, base: GaussianScore):
        torch.nn.Module.__init__(self)
        self.mean = torch.nn.Parameter(base.mean.detach().clone(), requires_grad=False)
        self.std = torch.nn.Parameter(base.std.detach().clone(), requires_grad=False)
        self.config = base.config


def converted(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``model`` in ``dtype`` (the cached models are shared by the tests)."""
    return copy.deepcopy(model).to(dtype)


def distances(x: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
    """Per image: the RMS over pixels of ``x - ref`` (computed in float64)."""
    diff = (x.detach().cpu().double() - ref.detach().cpu().double()).reshape(len(x), -1)
    return diff.pow(2).mean(1).sqrt().numpy()


@dataclass(frozen=True)
class Case:
    """One accuracy configuration: a model, the scheduler's settings, steps, and batch sizes (fp16 smaller:
    fp16 convolutions are slow on CPUs). ``autocast``: the model has matmuls or convolutions, so a float32
    copy asked to run in bf16/fp16 (autocast) computes something in that dtype."""

    model: str
    scheduler: tuple
    steps: int
    batch: int
    fp16_batch: int
    autocast: bool = True
    seed: int = 0

    def make_scheduler(self) -> kve_fast.KarrasVeScheduler:
        return kve_fast.KarrasVeScheduler(**dict(self.scheduler))

    def batch_for(self, dtype_name: str) -> int:
        return self.fp16_batch if dtype_name == "fp16" else self.batch


_SMALL = tuple(sorted(SMALL_SIGMAS.items()))  # sigma 2 -> 0.05 with churn: Gaussian-based images stay in (0, 1)
CASES = {
    # The exact Gaussian score alone, over a long run: where the state's own rounding would accumulate
    # (a bf16 state lands ~10x further from float64 than the plain run; test_yardstick_rejects_...).
    "gaussian-300": Case("gaussian", _SMALL, 300, 16, 16, autocast=False),
    # The exact score plus diffusers' test UNet (convolutions, attention, time embedding): conftest's parity model.
    "test_unet+gaussian": Case("test_unet+gaussian", _SMALL, 12, 16, 8),
    # ... plus an NCSN++-style UNet (fourier embedding, FIR skip blocks).
    "ncsnpp+gaussian": Case("ncsnpp+gaussian", _SMALL, 12, 16, 8),
    # The bundled trained model. The paper's schedule: on the reference schedule at 30 steps, perturbations
    # of bf16's size send some trajectories to another digit (per-image distances up to 0.5 for bf16 and 2e-4
    # even for float32), so the per-image max would measure that chaos, not the precision.
    "digits-edm": Case("digits", (("sigma_schedule", "edm"),), 20, 32, 8),
}


@functools.lru_cache(maxsize=None)
def make_model(name: str) -> torch.nn.Module:
    """The float32 model of a case (cached: conftest's MODELS builds them; "digits" is the bundled model)."""
    if name == "digits":
        return kve_fast.load_model("digits")[0]
    model = MODELS[name]()
    return ParamGaussian(model) if isinstance(model, GaussianScore) else model


def image_shape(model, batch: int) -> tuple[int, int, int, int]:
    size = model.config.sample_size
    return (batch, getattr(model.config, "in_channels", 3), size, size)


def twin_sample(case: Case, model, batch: int, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """``algorithm2`` for ``case`` with ``model`` (the loop's state in ``dtype``) and the case's seed."""
    scheduler = case.make_scheduler()
    return algorithm2(model, plan_steps(scheduler, case.steps), image_shape(model, batch),
                      torch.Generator().manual_seed(case.seed), init_sigma=scheduler.init_noise_sigma,
                      s_noise=scheduler.config.s_noise, dtype=dtype, device=device)


def kve_run(case: Case, model, batch: int, device="cpu", **kwargs) -> torch.Tensor:
    """``kve_fast.sample_karras_ve`` for ``case`` (the same seed and noise as ``twin_sample``)."""
    return kve_fast.sample_karras_ve(model, case.make_scheduler(), image_shape(model, batch), case.steps,
                                     torch.Generator().manual_seed(case.seed), device=device, **kwargs)



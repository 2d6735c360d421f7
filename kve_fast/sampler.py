"""The sampler loop: Algorithm 2 of Karras et al. (2022), one Heun step at a time.

The loop owns the order of things (noise draws, model calls, callbacks); the arithmetic of each
stage lives in a step backend (``kve_fast.ops``) and the randomness in a noise source
(``kve_fast.noise``). With the torch backend and the reference noise stream, every tensor the loop
produces is bit-identical to what diffusers' ``KarrasVePipeline`` produces on the same device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ._checks import check_generator, check_int, check_real
from .backends import make_backend
from .noise import NOISE_MODES, make_noise
from .scheduler import churn_sigma

OUTPUTS = ("latent", "float", "uint8")


@dataclass(frozen=True)
class Step:
    """Per-step scalars as the reference computes them (0-d float32 CPU tensors; sigma_prev is 0 last).

    ``half_sigma_hat`` / ``half_sigma_prev`` are the model's noise-level arguments (``sigma / 2``);
    ``cache`` holds constants a backend derives from the scalars (computed once per plan).
    """

    index: int
    timestep: torch.Tensor
    sigma: torch.Tensor
    sigma_hat: torch.Tensor
    sigma_prev: torch.Tensor | int
    gamma: float
    half_sigma_hat: torch.Tensor
    half_sigma_prev: torch.Tensor | None
    cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def last(self) -> bool:
        return isinstance(self.sigma_prev, int)


def plan_steps(scheduler, num_inference_steps: int) -> tuple[Step, ...]:
    """The scalars of every step, computed like the reference pipeline does, without touching ``scheduler``.

    Plans are cached by scheduler class, config and step count (they are immutable).
    """
    check_int("num_inference_steps", num_inference_steps, 2)
    try:
        key = (type(scheduler), tuple(sorted((k, v) for k, v in scheduler.config.items() if not k.startswith("_"))))
        hash(key)
    except TypeError:  # an unhashable config value: plan without the cache
        return _plan(scheduler, num_inference_steps)
    return _cached_plan(key, num_inference_steps, scheduler)


_PLANS: dict = {}


def _cached_plan(key, num_inference_steps, scheduler):
    plan = _PLANS.get((key, num_inference_steps))
    if plan is None:
        if len(_PLANS) >= 64:
            _PLANS.pop(next(iter(_PLANS)))
        plan = _PLANS[(key, num_inference_steps)] = _plan(scheduler, num_inference_steps)
    return plan


def _plan(scheduler, num_inference_steps: int) -> tuple[Step, ...]:
    timesteps, schedule = scheduler.make_schedule(num_inference_steps)
    steps = []
    for i, t in enumerate(timesteps):
        # here sigma_t == t_i from the paper (the reference's schedule)
        sigma = schedule[t]
        sigma_prev = schedule[t - 1] if t > 0 else 0
        steps.append(_step(i, t, sigma, sigma_prev, *scheduler.churn_sigma(sigma, num_inference_steps)))
    return tuple(steps)


def _step(i, timestep, sigma, sigma_prev, sigma_hat, gamma) -> Step:
    half_prev = None if isinstance(sigma_prev, int) else sigma_prev / 2
    return Step(i, timestep, sigma, sigma_hat, sigma_prev, gamma, sigma_hat / 2, half_prev)


class ModelOutputError(ValueError):
    """The model returned something that is not a tensor shaped like its input."""


def _raw_output(out):
    """The model's output tensor: ``.sample`` of a diffusers output, the first item of a tuple, or itself."""
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


class _RngSnapshot:
    """Generator states taken before sampling, restored if the run is rejected after it started."""

    def __init__(self, generator, device: torch.device):
        gens = generator if isinstance(generator, list) else [generator]
        self.states = [(g, g.get_state()) for g in gens if g is not None]
        self.cpu = torch.get_rng_state() if generator is None else None
        self.cuda = None
        if generator is None and device.type == "cuda":
            self.cuda = (device, torch.cuda.get_rng_state(device))

    def restore(self) -> None:
        for g, state in self.states:
            g.set_state(state)
        if self.cpu is not None:
            torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda[1], self.cuda[0])


SOLVERS = ("heun", "euler")


def _check_common(shape, generator, callback, noise, output, solver):
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"`shape` must be (batch, channels, ...), got {shape}")
    batch_size = check_int("shape[0]", shape[0], 1)
    generator = check_generator(generator, batch_size)
    if callback is not None and not callable(callback):
        raise TypeError(f"`callback` must be callable, got {type(callback).__name__}")
    if not isinstance(noise, str) or noise not in NOISE_MODES:
        raise ValueError(f"`noise` must be one of {NOISE_MODES}, got {noise!r}")
    if output not in OUTPUTS:
        raise ValueError(f"`output` must be one of {OUTPUTS}, got {output!r}")
    if output != "latent" and len(shape) != 4:
        raise ValueError(f"`output`={output!r} needs a (batch, channels, height, width) shape, got {shape}")
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise ValueError(f"`solver` must be one of {SOLVERS}, got {solver!r}")
    return shape, generator


def sample_karras_ve(
    model: Callable,
    scheduler,
    shape: tuple[int, ...],
    num_inference_steps: int = 50,
    generator=None,
    device: torch.device | str = "cpu",
    backend: str = "auto",
    noise: str = "exact",
    callback: Callable[[dict], dict | None] | None = None,
    progress: Callable | bool = False,
    output: str = "latent",
    solver: str = "heun",
) -> torch.Tensor:
    """Run Algorithm 2 with ``model`` and ``scheduler``; return the final sample or image.

    ``model(x, sigma / 2)`` is called with ``x`` in [0, 1] image space and returns the score there
    (a tensor, a tuple, or an object with ``.sample``). ``generator`` is None, a ``torch.Generator`` or
    a list with one per sample. ``backend``: ``"auto"``, ``"torch"`` or ``"triton"``; ``noise``:
    ``"exact"`` (the reference's stream) or ``"fast"`` (generated on the device). ``callback(state)``
    runs after each step with ``state`` holding ``i``, ``timestep``, ``sigma``, ``sigma_hat``,
    ``sigma_prev``, ``sample`` (also as ``x``) and ``pred_original_sample`` (also as ``denoised``); it
    may return a dict whose ``"sample"`` replaces the sample and whose ``"stop": True`` ends the run.
    ``progress`` is True for a tqdm bar, or a function wrapping the step iterable (a pipeline's
    ``progress_bar``). ``output``: ``"latent"`` (the sample, float32, [-1, 1] space), ``"float"``
    (``(x / 2 + 0.5).clamp(0, 1)``, BCHW) or ``"uint8"`` (that image as PIL rounds it, BHWC).
    ``solver``: ``"heun"`` (Algorithm 2) or ``"euler"`` (no second-order correction: one model call
    per step). ``scheduler`` is not modified.
    """
    shape, generator = _check_common(shape, generator, callback, noise, output, solver)
    device = torch.device(device)
    steps = plan_steps(scheduler, num_inference_steps)
    backend = make_backend(backend, device, scheduler.config.s_noise, want_pred=callback is not None)
    snapshot = _RngSnapshot(generator, device)
    source = make_noise(noise, shape, generator, device, len(steps))
    # Algorithm 2, line 1: x_0 ~ N(0, t_0^2 I) (the reference scales by sigma_max, not schedule[0]).
    sample = source.initial() * scheduler.init_noise_sigma
    return _run(model, steps, sample, source, backend, callback, progress, output, solver, snapshot)


def sample_heun(
    model: Callable,
    x: torch.Tensor,
    sigmas,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    generator=None,
    callback: Callable[[dict], dict | None] | None = None,
    disable: bool = True,
    backend: str = "auto",
    noise: str = "exact",
    solver: str = "heun",
) -> torch.Tensor:
    """Algorithm 2 over your own noise levels, k-diffusion style: ``sample_heun(model, x, sigmas)``.

    ``x`` is the initial sample, already scaled to ``sigmas[0]`` (e.g. ``torch.randn(shape) *
    sigmas[0]``); ``sigmas`` is a descending 1-D sequence ending in 0, one step per interval. The model
    is called as everywhere in kve_fast: ``model((x + 1) / 2, sigma / 2)`` returning the score in
    [0, 1] image space. Churn: gamma_i = min(s_churn / N, sqrt(2) - 1) where s_tmin <= sigma_i <= s_tmax.
    ``callback(state)`` gets ``x``, ``i``, ``sigma``, ``sigma_hat`` and ``denoised`` (and the names the
    pipeline uses). Noise comes from ``generator`` (or the global RNG), drawn on the host like the
    reference draws it (``noise="exact"``) or on the device (``"fast"``). Returns the final sample.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("`x` must be a floating-point torch.Tensor")
    steps = steps_from_sigmas(sigmas, s_churn, s_tmin, s_tmax)
    check_real("s_noise", s_noise, minimum=0)
    shape, generator = _check_common(x.shape, generator, callback, noise, "latent", solver)
    backend = make_backend(backend, x.device, s_noise, want_pred=callback is not None)
    snapshot = _RngSnapshot(generator, x.device)
    source = make_noise(noise, shape, generator, x.device, len(steps))
    return _run(model, steps, x.to(torch.float32), source, backend, callback, not disable, "latent", solver,
                snapshot)


def steps_from_sigmas(sigmas, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf")):
    """Steps for a user's descending ``sigmas`` (ending in 0), with the reference's per-step rounding."""
    check_real("s_churn", s_churn, minimum=0)
    check_real("s_tmin", s_tmin, minimum=0)
    if isinstance(s_tmax, bool) or not isinstance(s_tmax, (int, float)):
        raise TypeError(f"`s_tmax` must be a number, got {type(s_tmax).__name__}")
    if not s_tmax >= s_tmin:
        raise ValueError(f"`s_tmax` must be >= `s_tmin`, got {s_tmax!r}")
    try:
        sig = torch.as_tensor(sigmas, dtype=torch.float32).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"`sigmas` must be a 1-D sequence of numbers: {exc}") from None
    if sig.dim() != 1 or sig.numel() < 2:
        raise ValueError(f"`sigmas` must be 1-D with at least 2 values (the last one 0), got shape {tuple(sig.shape)}")
    if not bool(torch.isfinite(sig).all()) or float(sig[-1]) != 0 or not bool((sig[:-1] > 0).all()):
        raise ValueError("`sigmas` must be finite, positive, and end with a single 0")
    if not bool((sig[1:] <= sig[:-1]).all()):
        raise ValueError("`sigmas` must be non-increasing")
    n = sig.numel() - 1
    steps = []
    for i in range(n):
        sigma = sig[i]
        sigma_prev = sig[i + 1] if i + 1 < n else 0
        steps.append(_step(i, torch.tensor(n - 1 - i), sigma, sigma_prev, *churn_sigma(sigma, n, s_churn, s_tmin, s_tmax)))
    return tuple(steps)


def _run(model, steps, sample, source, backend, callback, progress, output, solver, snapshot) -> torch.Tensor:
    """The loop of Algorithm 2 from the initial sample; the callers checked every argument.

    A model whose output is not shaped like its input is rejected at its first call, and the
    generators are left as they were before the run (``snapshot``).
    """
    if progress is True:
        from tqdm.auto import tqdm

        iterator = tqdm(steps)
    elif callable(progress):
        iterator = progress(steps)
    else:
        iterator = steps
    heun_solver = solver == "heun"
    image_kind = None if output == "latent" else output

    def call_model(x, half_sigma):
        out = _raw_output(model(x, half_sigma))
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ModelOutputError(f"`model` must return a tensor shaped like its input {tuple(x.shape)}, got {got}")
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        return out

    image = None
    try:
        churned = None
        for step in iterator:
            i = step.index
            correct = heun_solver and not step.last
            # Lines 4-6: increase the noise level temporarily, sigma -> sigma_hat, with fresh noise.
            if churned is None:
                churned = backend.churn(sample, source.step(), step)
            sample_hat, x_in = churned
            churned = None
            # Lines 7-8: Euler step from sigma_hat to sigma_prev (the model sees [0, 1] images). On the
            # last step, with no callback to change the sample, the final image is fused in.
            raw = call_model(x_in, step.half_sigma_hat)
            fuse_image = step.last and callback is None
            sample_prev, derivative, pred, x_in, image = backend.euler(
                raw, sample_hat, step, correct, correct, image_kind if fuse_image else None,
                keep=step.last or callback is not None,
            )
            if not correct:
                sample = sample_prev
            else:
                # Lines 9-11: second-order correction at sigma_prev; with no callback to see the
                # sample in between, the next step's churn (lines 4-6) is fused into the same stage.
                raw = call_model(x_in, step.half_sigma_prev)
                fuse = callback is None and i + 1 < len(steps)
                sample, pred, churned = backend.heun(
                    raw, sample_hat, sample_prev, derivative, step,
                    steps[i + 1] if fuse else None, source.step() if fuse else None,
                )
            if callback is not None:
                state = {
                    "i": i, "timestep": step.timestep, "sigma": step.sigma, "sigma_hat": step.sigma_hat,
                    "sigma_prev": step.sigma_prev, "sample": sample, "pred_original_sample": pred,
                    "x": sample, "denoised": pred,
                }
                out = callback(state)
                if out:
                    new = out.get("sample", sample)
                    if new is not sample:
                        if not isinstance(new, torch.Tensor) or new.shape != sample.shape or new.dtype != sample.dtype \
                                or new.device != sample.device:
                            raise ValueError("`callback` must return a `sample` of the same shape, dtype and device")
                        sample = new
                    if out.get("stop", False):
                        break
    except ModelOutputError:
        source.close()
        snapshot.restore()
        raise
    finally:
        source.close()
        if hasattr(iterator, "close"):
            iterator.close()
    if output == "latent":
        return sample
    return image if image is not None else backend.to_image(sample, output)

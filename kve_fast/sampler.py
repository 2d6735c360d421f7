"""The sampler loop: Algorithm 2 of Karras et al. (2022), one Heun step at a time.

The loop owns the order of things (noise draws, model calls, callbacks); the per-step scalars come
from a lazy plan (``kve_fast.plan``), the arithmetic of each stage from a step backend
(``kve_fast.ops``) and the randomness from a noise source (``kve_fast.noise``). With the torch backend
and the reference noise stream, every tensor the loop produces is bit-identical to what diffusers'
``KarrasVePipeline`` produces on the same device.

Every entry point checks all its arguments before the first random draw, runs without an autograd
tape, and, if the run fails for any reason (a model or callback that raises, a bad callback return,
KeyboardInterrupt, out of memory), puts the generators and the global RNGs back as they were and
leaves no thread behind.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable

import torch

from ._checks import check_generator, check_int, check_real
from .backends import make_backend
from .engine import StepEngine
from .graphs import decide, graphed_engine, keep, release
from .noise import make_noise
from .options import NOISE_MODES, SOLVERS
from .plan import PlanHandle, Step, plan_steps, scheduler_plan, sigmas_plan
from .precision import UNET_DTYPES, Precision, resolve

__all__ = ["sample_karras_ve", "sample_karras_ve_sigmas", "plan_steps", "Step", "ModelOutputError", "OUTPUTS", "SOLVERS"]

OUTPUTS = ("latent", "float", "uint8")


class ModelOutputError(ValueError):
    """The model returned something that is not a tensor shaped like its input."""


def _raw_output(out):
    """The model's output tensor: ``.sample`` of a diffusers output, the first item of a tuple, or itself."""
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0] if len(out) else out
    return out


class _RngSnapshot:
    """The generators' and the global RNGs' states before a run, put back if the run fails."""

    def __init__(self, generator, device: torch.device):
        gens = generator if isinstance(generator, list) else [generator]
        self.states = [(g, g.get_state()) for g in gens if g is not None]
        self.cpu = torch.get_rng_state()
        self.cuda = None
        if device.type == "cuda" and torch.cuda.is_initialized():
            index = device.index if device.index is not None else torch.cuda.current_device()
            self.cuda = (index, torch.cuda.get_rng_state(index))

    def restore(self) -> None:
        for g, state in self.states:
            g.set_state(state)
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda[1], self.cuda[0])


def _check_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"`device` must be a torch device such as 'cpu' or 'cuda:0', got {device!r}: {exc}") from None
    if device.type == "meta":
        raise ValueError("`device`='meta' holds no data: sample on 'cpu' or 'cuda'")
    return device


def _check_common(model, shape, generator, callback, noise, output, solver):
    if not callable(model):
        raise TypeError(f"`model` must be callable (a torch.nn.Module or a function), got {type(model).__name__}")
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"`shape` must be (batch, channels, ...), got {shape}")
    for k, d in enumerate(shape):
        check_int(f"shape[{k}]", d, 1)
    generator = check_generator(generator, shape[0])
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


@torch.no_grad()
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
    cuda_graph: bool | str | None = None,
    unet_dtype: torch.dtype | None = None,
    tf32: bool = False,
    channels_last: bool = False,
) -> torch.Tensor:
    """Run Algorithm 2 with ``model`` and ``scheduler``; return the final sample or image.

    ``model(x, sigma / 2)`` is called with ``x`` in [0, 1] image space and returns the score there
    (a tensor, a tuple, or an object with ``.sample``). ``generator`` is None, a ``torch.Generator`` or
    a list with one per sample. ``backend``: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``; ``noise``:
    ``"exact"`` (the reference's stream) or ``"fast"`` (generated on the device). ``callback(state)``
    runs after each step with ``state`` holding ``i``, ``timestep``, ``sigma``, ``sigma_hat``,
    ``sigma_prev``, ``sample`` (also as ``x``) and ``pred_original_sample`` (also as ``denoised``), all
    new tensors; it returns None or a dict whose ``"sample"`` replaces the sample and whose
    ``"stop": True`` ends the run. ``progress`` is True for a tqdm bar, or a function wrapping the step
    iterable (a pipeline's ``progress_bar``). ``output``: ``"latent"`` (the sample, float32, [-1, 1]
    space), ``"float"`` (``(x / 2 + 0.5).clamp(0, 1)``, BCHW) or ``"uint8"`` (that image as PIL rounds
    it, BHWC). ``solver``: ``"heun"`` (Algorithm 2) or ``"euler"`` (no second-order correction: one
    model call per step). ``cuda_graph``: ``"auto"`` (capture each step in a CUDA graph where possible,
    see ``kve_fast.graphs``), True (raise where not possible), False, or None (the default,
    ``kve_fast.graphs.DEFAULT_MODE``, which is "auto"). ``unet_dtype``: None (the model's own parameter
    dtype), ``torch.float32``, ``torch.bfloat16`` or ``torch.float16``: the dtype the model runs in while the
    state stays float32 (a float32 model then runs under autocast); ``tf32``: TF32 matmuls and
    convolutions for the run (see ``kve_fast.precision``; neither is bit-exact with the reference).
    ``channels_last``: the Triton and CUDA backends keep the state and the model's input in channels_last
    memory (for a model converted with ``.to(memory_format=torch.channels_last)``, which then gives the
    same values as without it: the sampler's arithmetic does not depend on the layout, but convolutions
    pick their algorithm by it); a 4-D ``shape`` only. ``scheduler`` is not modified. Runs under ``torch.no_grad()``.
    """
    shape, generator = _check_common(model, shape, generator, callback, noise, output, solver)
    device = _check_device(device)
    precision = resolve(model, unet_dtype, tf32, device)
    layout = _check_channels_last(channels_last, shape, device)
    plan = scheduler_plan(scheduler, num_inference_steps)
    backend = make_backend(backend, device, scheduler.config.s_noise, want_pred=callback is not None, shape=shape,
                           model_dtype=precision.input_dtype, layout=layout)
    graphed = decide(cuda_graph, device, backend, noise)
    # Algorithm 2, line 1: x_0 ~ N(0, t_0^2 I) (the reference scales by sigma_max, not by the first sigma).
    return _run(model, plan, shape, generator, device, noise, lambda x0: x0 * scheduler.init_noise_sigma, backend,
                callback, progress, output, solver, graph=(cuda_graph, scheduler.config.s_noise) if graphed else None,
                precision=precision)


@torch.no_grad()
def sample_karras_ve_sigmas(
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
    cuda_graph: bool | str | None = None,
    unet_dtype: torch.dtype | None = None,
    tf32: bool = False,
) -> torch.Tensor:
    """Algorithm 2 over your own noise levels, in the reference pipeline's score convention.

    ``sample_karras_ve_sigmas(model, x, sigmas)``: the loop of ``sample_karras_ve`` (same model
    convention, noise stream and rounding) over a descending ``sigmas`` you bring. For k-diffusion's
    convention (a denoiser model, its callback and noise) use ``kve_fast.k_diffusion.sample_heun``.

    ``x`` is the initial sample, already scaled to ``sigmas[0]`` (e.g. ``torch.randn(shape) *
    sigmas[0]``), in any layout (it is read, never written; the state is kept contiguous); ``sigmas``
    is a descending 1-D sequence ending in 0, one step per interval. The model is called as everywhere
    in kve_fast: ``model((x + 1) / 2, sigma / 2)`` returning the score in [0, 1] image space. Churn:
    gamma_i = min(s_churn / N, sqrt(2) - 1) where s_tmin <= sigma_i <= s_tmax. ``callback(state)``
    gets ``x``, ``i``, ``sigma``, ``sigma_hat`` and ``denoised`` (and the names the pipeline uses).
    Noise comes from ``generator`` (or the global RNG), drawn on the host like the reference draws it
    (``noise="exact"``) or on the device (``"fast"``). ``unet_dtype`` and ``tf32``: as in
    ``sample_karras_ve``. Returns the final sample (float32, contiguous).
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("`x` must be a floating-point torch.Tensor")
    plan = sigmas_plan(sigmas, s_churn, s_tmin, s_tmax)
    check_real("s_noise", s_noise, minimum=0)
    shape, generator = _check_common(model, x.shape, generator, callback, noise, "latent", solver)
    precision = resolve(model, unet_dtype, tf32, x.device)
    backend = make_backend(backend, x.device, s_noise, want_pred=callback is not None, shape=shape,
                           model_dtype=precision.input_dtype)
    graphed = decide(cuda_graph, x.device, backend, noise)
    x0 = x.detach()
    return _run(model, PlanHandle(plan, None), shape, generator, x.device, noise, lambda _: x0.to(torch.float32),
                backend, callback, not disable, "latent", solver, draw_initial=False,
                graph=(cuda_graph, s_noise) if graphed else None, precision=precision)


def _check_channels_last(channels_last, shape, device) -> torch.Tensor | None:
    """The layout template the fused backends keep their state in: None (contiguous) or channels_last."""
    if not isinstance(channels_last, bool):
        raise TypeError(f"`channels_last` must be True or False, got {type(channels_last).__name__}")
    if not channels_last:
        return None
    if len(shape) != 4:
        raise ValueError(f"`channels_last`=True needs a (batch, channels, height, width) shape, got {shape}")
    return torch.empty(shape, dtype=torch.float32, device=device, memory_format=torch.channels_last)


def _progress(progress, steps):
    if progress is True:
        from tqdm.auto import tqdm

        return tqdm(steps)
    if callable(progress):
        return progress(steps)
    return steps


def _callback_update(out, sample: torch.Tensor):
    """Check what a callback returned; return ``(replacement sample or None, stop)``."""
    if out is None:
        return None, False
    if not isinstance(out, dict):
        raise TypeError(f"`callback` must return None or a dict, got {type(out).__name__}")
    new = out.get("sample", out.get("x", sample))
    if new is not sample:
        if not isinstance(new, torch.Tensor):
            raise TypeError(f"`callback` returned a `sample` that is a {type(new).__name__}, not a torch.Tensor")
        if new.shape != sample.shape or new.dtype != sample.dtype or new.device != sample.device:
            raise ValueError(
                f"`callback` must return a `sample` of the same shape, dtype and device as the one it got "
                f"({tuple(sample.shape)}, {sample.dtype}, {sample.device}), got "
                f"({tuple(new.shape)}, {new.dtype}, {new.device})")
        new = new.detach()  # made contiguous by StepEngine.replace
    else:
        new = None
    return new, bool(out.get("stop", False))


def _warn_if_not_finite(sample: torch.Tensor) -> None:
    """One reduction at the end of the run (no per-step host sync): a warning naming NaN/inf."""
    bad = int((~torch.isfinite(sample)).sum())
    if bad:
        nan = int(torch.isnan(sample).sum())
        warnings.warn(
            f"kve_fast: the final sample has {bad} non-finite values of {sample.numel()} ({nan} NaN, {bad - nan} "
            "inf): the model returned NaN/inf, or the settings overflow float32; images show them as black "
            "(pass a callback to inspect each step's sample)",
            RuntimeWarning, stacklevel=4)


def _half_sigma(step, which: str) -> torch.Tensor:
    """The reference's model noise-level argument: sigma / 2 as a 0-d float32 CPU tensor (a new one each call)."""
    return step.half_sigma_hat if which == "hat" else step.half_sigma_prev


def _fast_fir(model, device: torch.device, noise: str, precision: Precision) -> bool:
    """Whether this run puts an NCSN++ UNet's FIR resampling on the Triton kernel (``kve_fast.ncsnpp.make_fast``):
    only in the modes that are not bit-exact anyway (fast noise, low precision, TF32), on CUDA (or in
    Triton's interpreter), for the duration of the run."""
    if noise != "fast" and precision.exact:
        return False
    if not isinstance(model, torch.nn.Module):
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _run(model, plan: PlanHandle, shape, generator, device, noise, initial, backend, callback, progress, output,
         solver, draw_initial: bool = True, graph=None, precision: Precision = Precision()) -> torch.Tensor:
    """The loop of Algorithm 2; the callers checked every argument.

    ``initial(x)`` makes x_0 from the source's unscaled initial noise (``draw_initial``) or ignores it.
    ``graph``: ``(cuda_graph, s_noise)`` to replay captured steps (``kve_fast.graphs``), or None.
    ``precision``: how the model is called (``kve_fast.precision``; float32 by default).
    On any failure the generators and RNGs are put back (``_RngSnapshot``) and the noise thread is
    stopped; the plan is cached only once the run has completed.
    """
    steps = plan.plan
    forward = precision.call(model, device)

    def call_model(x, half_sigma):
        out = _raw_output(forward(x, half_sigma))
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ModelOutputError(f"`model` must return a tensor shaped like its input {tuple(x.shape)}, got {got}")
        if out.dtype not in UNET_DTYPES:  # float64, say: float32 like the state (low-precision outputs are read as is)
            out = out.to(torch.float32)
        return out  # in the state's layout by the backend (a copy only where the layouts differ)

    snapshot = _RngSnapshot(generator, device)
    source = iterator = capture = None
    image = None if output == "latent" else output
    switches = precision.switches()
    fir_patched = 0
    try:
        switches.__enter__()
        if _fast_fir(model, device, noise, precision):
            from . import ncsnpp

            if ncsnpp.needs_patch(model):
                # capturable first (bit-identical): then restore_fast only switches the patches back, and the
                # device filters a CUDA graph captured in this call reads stay alive on the model
                ncsnpp.make_capturable(model)
            fir_patched = ncsnpp.make_fast(model)  # 0 for a model without FIR blocks (or already fast)
        source = make_noise(noise, shape, generator, device, len(steps))
        engine = None
        if graph is not None:
            engine = graphed_engine(graph[0], model, backend, source, steps, shape, device, noise, solver,
                                    callback is not None, image, graph[1], call_model, _half_sigma,
                                    variant=precision.key())
            capture = None if engine is None else engine.cap
        if engine is None:
            engine = StepEngine(backend, source, steps, solver, hand_out=callback is not None, image=image,
                                call_model=call_model, noise_level=_half_sigma)
        # Line 1: x_0 ~ N(0, t_0^2 I).
        engine.start(initial(source.initial() if draw_initial else None).contiguous())
        iterator = _progress(progress, steps)
        for step in iterator:
            engine.step(step)  # lines 4-11 (kve_fast/engine.py)
            if callback is not None:
                sample = engine.sample
                state = {
                    "i": step.index, "timestep": torch.tensor(step.timestep), "sigma": step.sigma,
                    "sigma_hat": step.sigma_hat, "sigma_prev": step.sigma_prev, "sample": sample,
                    "pred_original_sample": engine.denoised, "x": sample, "denoised": engine.denoised,
                }
                new, stop = _callback_update(callback(state), sample)
                if new is not None:
                    engine.replace(new)
                if stop:
                    break
        result = engine.output()
        _warn_if_not_finite(engine.sample)
    except BaseException:
        if source is not None:
            source.close()
        if capture is not None:
            release(capture)
        snapshot.restore()
        raise
    finally:
        if source is not None:
            source.close()
        if hasattr(iterator, "close"):
            iterator.close()
        if fir_patched:
            from . import ncsnpp

            ncsnpp.restore_fast(model)  # exact runs of this model keep diffusers' own ops and bits
        switches.__exit__(None, None, None)
    if capture is not None:
        keep(capture)
    plan.commit()
    return result

"""The sampler loop: Algorithm 2 of Karras et al. (2022), one step at a time, in either convention.

``execute`` is the one loop behind every entry point (``sample_karras_ve`` and ``sample_karras_ve_sigmas``
here, ``kve_fast.pipeline.KarrasVePipeline``, ``kve_fast.k_diffusion``): next to k-diffusion's
``sample_heun`` it reads::

    x = x_0                                  # line 1 (the front door drew and scaled it)
    for step in plan:                        # line 2
        engine.step(step)                    # lines 4-11: the step's stages (kve_fast.stages)
        if the callback asked to stop: break

Everything that differs between the conventions is the ``Convention``'s (``kve_fast.convention``); the
per-step scalars come from a lazy plan (``kve_fast.plan``), the arithmetic of each stage from a step
backend (``kve_fast.ops``), the randomness from a noise source (``kve_fast.noise``), and the engine runs
the stages eagerly (``kve_fast.engine``) or replays them from CUDA graphs (``kve_fast.graphs``). With the
torch backend and the reference noise stream, every tensor the loop produces is bit-identical to what
diffusers' ``KarrasVePipeline`` produces on the same device.

Every entry point checks all its arguments before the first random draw and runs without an autograd
tape; if a run fails for any reason (a model or callback that raises, a bad callback return,
KeyboardInterrupt, out of memory), the reference's entry points put the generators and the global RNGs
back as they were, and no thread is left behind.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from . import backends, graphs
from ._warn import warn_once
from ._checks import check_generator, check_int, check_real, check_shape
from .backends import make_backend
from .convention import REFERENCE, ModelOutputError
from .engine import Engine
from .fingerprint import nets
from .noise import make_noise
from .options import NOISE_MODES, SOLVERS
from .plan import Plan, PlanHandle, Step, scheduler_plan, sigmas_plan
from .precision import Precision, resolve
from .stages import Schedule
from .spec import RunSpec, resolve_device
from .threads import for_call

__all__ = ["sample_karras_ve", "sample_karras_ve_sigmas", "plan_steps", "Step", "ModelOutputError", "OUTPUTS", "SOLVERS",
           "execute", "Run"]

OUTPUTS = ("latent", "float", "uint8")


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
    shape = check_shape("shape", shape)
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


def _fast_fir(model, device: torch.device, noise: str, precision: Precision) -> bool:
    """Whether a run puts an NCSN++ UNet's FIR resampling on the Triton kernel (``kve_fast.ncsnpp.fast_fir``):
    only in the modes that are not bit-exact anyway (fast noise, low precision, TF32), on CUDA (or in
    Triton's interpreter)."""
    if noise != "fast" and precision.exact:
        return False
    if not isinstance(model, torch.nn.Module):
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


# -- the loop ----------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One run, as a front door set it up (every argument already checked).

    ``spec``: the run's settings (``kve_fast.spec.RunSpec``); ``plan``: its steps; ``backend``: the step
    backend made from the spec; ``like``: the state's layout template (None: contiguous); ``source``: makes
    the noise source (``source()``); ``initial``: x_0 from the source (``initial(source)``), already scaled;
    ``graphed``: replay the steps from CUDA graphs (``kve_fast.graphs.decide``), with ``cuda_graph`` the
    mode the front decided (``"auto"``, True or False); ``hand_out``: the callback at each ``HandOut`` stage
    (``(stage, step, state) -> new x or None``; an object with a ``stop`` attribute ends the run after the
    step); ``restore_rng``: put the generators and global RNGs back if the run fails; ``extra``: k-diffusion's
    ``extra_args``; ``s_in``: its ``s_in``; ``fallback``: the backend that goes on where the chosen one cannot
    read a model output (or a function that raises; None: a TypeError).
    """

    model: Callable
    spec: RunSpec
    plan: object
    backend: object
    like: torch.Tensor | None
    source: Callable
    initial: Callable
    graphed: bool = False
    cuda_graph: object = None
    hand_out: Callable | None = None
    progress: object = False
    generator: object = None
    restore_rng: bool = True
    extra: dict | None = None
    s_in: torch.Tensor | None = None
    fallback: Callable | None = None


def execute(r: Run) -> torch.Tensor:
    """The loop of Algorithm 2 (see the module docstring). Returns the final sample or image."""
    spec = r.spec
    device, convention = spec.device, spec.convention
    snapshot = _RngSnapshot(r.generator, device) if r.restore_rng else None
    steps = r.plan.plan if isinstance(r.plan, PlanHandle) else r.plan
    source = iterator = capture = None
    completed = False
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(for_call(device))  # CPU threads that do not collapse beside a busy process
            stack.enter_context(spec.precision.switches())
            if spec.fir == "triton":
                from . import ncsnpp

                if ncsnpp.needs_patch(r.model):
                    ncsnpp.make_capturable(r.model)  # bit-identical; the fast kernel needs the patched helpers
                stack.enter_context(ncsnpp.fast_fir())
            denoise = convention.caller(r.model, spec, r.extra)
            source = r.source()
            schedule = Schedule(convention, spec.solver == "heun", spec.hand_out, spec.image,
                                getattr(r.backend, "fuses_image", False))
            def eager() -> Engine:
                return _eager_engine(r, schedule, steps, denoise, source)

            engine = None
            if r.graphed:
                engine, capture = _graphed(r, schedule, steps, denoise, source, eager)
            if engine is None:
                engine = eager()
            engine.start(r.initial(source))  # line 1, and the first churn where it runs on its own
            iterator = _progress(r.progress, steps)
            for step in iterator:  # line 2
                engine.step(step)  # lines 4-11
                if getattr(r.hand_out, "stop", False):
                    break
            result = engine.output()
            _warn_if_not_finite(engine.sample())
            completed = True
    except BaseException:
        if source is not None:
            source.close()
        if snapshot is not None:
            snapshot.restore()
        raise
    finally:
        if source is not None:
            source.close()
        if hasattr(iterator, "close"):
            iterator.close()
        if capture is not None:
            graphs.release(capture, completed)
    if isinstance(r.plan, PlanHandle):
        r.plan.commit()
    return result


def _eager_engine(r: Run, schedule, steps, denoise, source) -> Engine:
    """The eager engine of ``r`` (buffers in the state's layout for a fused backend)."""
    spec = r.spec
    like = None
    if getattr(r.backend, "layout", False) is not False:  # a fused backend: buffers in the layout
        like = r.like if r.like is not None else torch.empty(spec.shape, dtype=torch.float32, device=spec.device)
    return Engine(schedule, steps, r.backend, denoise, source, spec.s_noise, like,
                  r.backend.model_dtype if like is not None else torch.float32, r.s_in, r.extra, r.hand_out,
                  r.fallback)


def _graphed(r: Run, schedule, steps, denoise, source, eager):
    """``(GraphEngine with its graphs captured, capture)``, or ``(None, None)`` to run eagerly: the capture is
    busy in another thread (``"auto"``), or the model cannot be captured (``"auto"`` warns once, ``True``
    raises). ``eager()`` makes the eager engine the graphed one hands over to if a callback changes the model."""
    from . import ncsnpp
    from .fake_graph import CaptureRefused

    mode, model, spec = r.cuda_graph, r.model, r.spec
    cap = None
    try:
        for net in nets(model):
            if isinstance(net, torch.nn.Module) and ncsnpp.needs_patch(net):
                ncsnpp.make_capturable(net)  # host-built FIR filters -> device-cached, bit-identical
        like = r.like if r.like is not None else torch.empty(spec.shape, dtype=torch.float32, device=spec.device)
        cap = graphs.checkout(model, spec, r.backend, like, r.backend.model_dtype, wait=mode is True)
        if cap is None:
            warn_once(("busy",), "kve_fast: this model's CUDA-graph capture is in use by another thread; running "
                                 "eagerly (same results; cuda_graph=True waits for it instead)")
            return None, None
        engine = graphs.GraphEngine(cap, schedule, steps, denoise, source, spec.s_noise, r.hand_out, r.extra, eager)
        engine.prepare()
        # what the capture baked in, as the warm-up left it (it may have built device FIR filters for a new
        # dtype: a cache that only grows, which the graphs read)
        cap.state = graphs.ModelState(model)
    except (CaptureRefused, RuntimeError, ValueError, TypeError, AttributeError) as exc:
        if cap is not None:
            graphs.release(cap, completed=False)
        reason = f"{type(exc).__name__}: {exc}".strip()
        if mode is True:
            raise ValueError(f"`cuda_graph`=True but the model cannot be captured in a CUDA graph ({reason})") from exc
        warn_once(("capture", type(model)), f"kve_fast: this model cannot be captured in a CUDA graph "
                                                    f"({reason}); running eagerly, same results")
        return None, None
    return engine, cap


def _progress(progress, steps):
    if progress is True:
        from tqdm.auto import tqdm

        return tqdm(steps)
    if callable(progress):
        return progress(steps)
    return steps


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


# -- the reference's convention: kve_fast's own front doors ----------------------------------------------------


class ReferenceCallback:
    """The reference convention's callback at each step's ``HandOut``: ``callback(state)`` with the step's
    names (``i``, ``timestep``, ``sigma``, ``sigma_hat``, ``sigma_prev``, ``sample``/``x``,
    ``pred_original_sample``/``denoised``); it returns None or a dict whose ``"sample"`` (or ``"x"``)
    replaces the sample and whose ``"stop": True`` ends the run."""

    def __init__(self, callback: Callable):
        self.callback, self.stop = callback, False

    def __call__(self, stage, step, state):
        sample, denoised = state[stage.x], state[stage.denoised]
        out = self.callback({
            "i": step.index, "timestep": torch.tensor(step.timestep), "sigma": step.sigma, "sigma_hat": step.sigma_hat,
            "sigma_prev": step.sigma_next, "sample": sample, "pred_original_sample": denoised, "x": sample,
            "denoised": denoised,
        })
        new, self.stop = _callback_update(out, sample)
        return new


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
        new = new.detach().contiguous()
    else:
        new = None
    return new, bool(out.get("stop", False))


def _check_channels_last(channels_last, shape, device) -> torch.Tensor | None:
    """The layout template the fused backends keep their state in: None (contiguous) or channels_last."""
    if not isinstance(channels_last, bool):
        raise TypeError(f"`channels_last` must be True or False, got {type(channels_last).__name__}")
    if not channels_last:
        return None
    if len(shape) != 4:
        raise ValueError(f"`channels_last`=True needs a (batch, channels, height, width) shape, got {shape}")
    return torch.empty(shape, dtype=torch.float32, device=device, memory_format=torch.channels_last)


def _strides(shape, like: torch.Tensor | None) -> tuple:
    return tuple(like.stride()) if like is not None else tuple(torch.empty(shape, device="meta").stride())


def make_reference_run(model, plan, shape, generator, device, noise, initial, backend_name, callback, progress, output,
                  solver, cuda_graph, precision: Precision, layout, s_noise: float) -> Run:
    """A ``Run`` in the reference's convention (the callers checked every argument but ``backend_name`` and
    ``cuda_graph``): its device, step backend, graphs and noise are decided here, once, and handed down."""
    device = resolve_device(device)
    backend = make_backend(backends.check_backend(backend_name, device), device, REFERENCE, shape=shape,
                           layout=layout, model_dtype=precision.input_dtype)
    mode = graphs.check_cuda_graph(cuda_graph)
    hand_out = None if callback is None else ReferenceCallback(callback)
    image = None if output == "latent" else output
    spec = RunSpec(convention=REFERENCE, backend=backend.name, device=device, shape=tuple(shape),
                   strides=_strides(shape, layout), noise=noise, solver=solver, hand_out=hand_out is not None,
                   image=image, precision=precision,
                   fir="triton" if _fast_fir(model, device, noise, precision) else "diffusers", s_noise=float(s_noise))
    steps = plan.plan if isinstance(plan, PlanHandle) else plan
    return Run(model=model, spec=spec, plan=plan, backend=backend, like=layout,
               source=lambda: make_noise(noise, shape, generator, device, len(steps)), initial=initial,
               graphed=graphs.decide(mode, device, backend.name), cuda_graph=mode, hand_out=hand_out,
               progress=progress, generator=generator)


def _scheduler_plan(scheduler, num_inference_steps) -> PlanHandle:
    """``kve_fast.plan.scheduler_plan`` from where ``scheduler``'s noise levels come (its config, or its own
    methods), decided here after ``num_inference_steps`` is checked: ``kve_fast.karras_ve_scheduler.schedule_source``,
    which refuses a scheduler that replaces the step arithmetic."""
    from .karras_ve_scheduler import schedule_source  # (diffusers: loaded when a scheduler is first planned)

    n = check_int("num_inference_steps", num_inference_steps, 2)
    return scheduler_plan(scheduler, n, schedule_source(scheduler))


def plan_steps(scheduler, num_inference_steps: int) -> Plan:
    """The steps of a run with ``scheduler``'s settings, computed like the reference pipeline does."""
    return _scheduler_plan(scheduler, num_inference_steps).plan


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
    ``sigma_prev`` (sigma_{i+1}), ``sample`` (also as ``x``) and ``pred_original_sample`` (also as
    ``denoised``), all new tensors; it returns None or a dict whose ``"sample"`` replaces the sample and whose
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
    plan = _scheduler_plan(scheduler, num_inference_steps)
    init_sigma = scheduler.init_noise_sigma
    # Algorithm 2, line 1: x_0 ~ N(0, t_0^2 I) (the reference scales by sigma_max, not by the first sigma).
    r = make_reference_run(model, plan, shape, generator, device, noise, lambda src: (src.initial() * init_sigma).contiguous(),
                      backend, callback, progress, output, solver, cuda_graph, precision, layout,
                      scheduler.config.s_noise)
    return execute(r)


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
    x0 = x.detach()
    r = make_reference_run(model, PlanHandle(plan, None), shape, generator, x.device, noise,
                      lambda _: x0.to(torch.float32).contiguous(), backend, callback, not disable, "latent", solver,
                      cuda_graph, precision, None, s_noise)
    return execute(r)

"""One configuration's rows: diffusers' pipeline and kve_fast eager and CUDA-graphed, exact and fast noise, each
timed and compared bit for bit (``bench_pipeline``); the kernel warm-up before any timing (``jit_warmup``).

Import-light: torch and diffusers load inside the functions.
"""

from __future__ import annotations

import copy
import os
import sys
import time
import warnings

from ..options import NOISE_MODES
from .floor import measure_floor
from .timing import (GRAPH_ENV, RepeatPolicy, _first_line, _host, _latent_to_np, _median_ms, _needs_patch, _params,
                     _settle, _sync, _timed, compare, inside_share, low_precision_copy, precision_label, relative_rms)

__all__ = ["bench_pipeline", "SharedReference", "FAST_FIR_FP32_BOUND", "jit_warmup", "graph_support", "supports_cuda_graph", "row_label", "KINDS", "ROW_LABELS"]

FLOOR_TARGET = 1.05  # the target: graphed exact total <= 1.05 x the floor
FIRST_IMAGE_TARGET_S = 3.0  # ... and the first image within 3 s (capture included)
KINDS = ("eager", "graphed")

ROW_LABELS = {
    ("reference", "exact"): "diffusers KarrasVePipeline",
    ("eager", "exact"): "kve_fast eager, exact noise",
    ("eager", "fast"): "kve_fast eager, fast noise",
    ("graphed", "exact"): "kve_fast graphed, exact noise",
    ("graphed", "fast"): "kve_fast graphed, fast noise",
}


def _graphs_module():
    """``kve_fast.graphs`` if this kve_fast has it, else None."""
    try:
        from .. import graphs
    except Exception:  # absent, or half-written: graphed rows then say why when they run
        return None
    return graphs


def supports_cuda_graph(pipe) -> bool:
    """Whether ``pipe.__call__`` (a pipeline or its class) takes ``cuda_graph=`` (the graph runner's switch)."""
    import inspect

    try:
        cls = pipe if isinstance(pipe, type) else type(pipe)
        return "cuda_graph" in inspect.signature(cls.__call__).parameters
    except (TypeError, ValueError):
        return False


def graph_support(pipe, device) -> tuple[bool, str]:
    """``(True, "")`` when graphed rows can be tried, else ``(False, why)`` (``pipe``: None for a sampler function
    that takes ``cuda_graph=``)."""
    graphs = _graphs_module()
    fake = graphs is not None and hasattr(graphs, "fake") and graphs.fake()
    if device.type != "cuda" and not fake:
        return False, f"graphs unavailable: CUDA graphs need a CUDA device (the device is {device})"
    value = os.environ.get(GRAPH_ENV)
    if value is not None and value.strip().lower() in ("0", "false", "off", "no"):
        return False, f"graphs unavailable: {GRAPH_ENV}={value} in the environment"
    if pipe is not None and not supports_cuda_graph(pipe):
        return False, "graphs unavailable: this kve_fast's pipeline has no cuda_graph option"
    return True, ""


def _clear_graphs(note: list | None = None) -> None:
    graphs = _graphs_module()
    if graphs is not None and hasattr(graphs, "clear_graphs"):
        graphs.clear_graphs()
    elif note is not None and not any("clear_graphs is missing" in n for n in note):
        note.append("kve_fast.graphs.clear_graphs is missing: graphed first calls may reuse earlier captures")


def _captures() -> int | None:
    graphs = _graphs_module()
    if graphs is None or not hasattr(graphs, "graph_info"):
        return None
    try:
        return int(graphs.graph_info().get("captures"))
    except Exception:
        return None


def _reference_pipeline(pipe):
    """diffusers' own pipeline on the same UNet, with the scheduler settings of ``pipe``; or ``(None, why)``."""
    config = getattr(pipe.unet, "config", None)
    channels = getattr(config, "in_channels", 3)
    size = getattr(config, "sample_size", None)
    if channels != 3:
        return None, (f"diffusers' KarrasVePipeline hard-codes 3 channels (batch, 3, size, size); this model has "
                      f"{channels}")
    if not isinstance(size, int):
        return None, f"diffusers' KarrasVePipeline needs a square int sample_size; this model has {size!r}"
    sched = dict(pipe.scheduler.config)
    if sched.get("sigma_schedule", "diffusers") != "diffusers":
        return None, (f"the model's scheduler uses sigma_schedule={sched['sigma_schedule']!r}; diffusers' scheduler "
                      "has only its own ('diffusers')")
    try:
        from diffusers.pipelines.deprecated.stochastic_karras_ve import KarrasVePipeline as RefPipeline
        from diffusers.schedulers.deprecated.scheduling_karras_ve import KarrasVeScheduler as RefScheduler
    except ImportError as exc:
        return None, f"diffusers' KarrasVePipeline does not import: {_first_line(exc)}"
    keys = ("sigma_min", "sigma_max", "s_noise", "s_churn", "s_min", "s_max")
    ref = RefPipeline(unet=pipe.unet, scheduler=RefScheduler(**{k: sched[k] for k in keys if k in sched}))
    ref.set_progress_bar_config(disable=True)
    return ref, ""


class _LatentHook:
    """Records the final sample of diffusers' loop (the last ``step``/``step_correct`` ``prev_sample``)
    while active, by wrapping the scheduler instance's two methods; the timed calls run unwrapped."""

    def __init__(self, scheduler):
        self.scheduler, self.latent = scheduler, None

    def __enter__(self):
        sched = self.scheduler
        step, correct = sched.step, sched.step_correct

        def wrapped(fn):
            def call(*args, **kwargs):
                out = fn(*args, **kwargs)
                self.latent = out.prev_sample
                return out
            return call

        object.__setattr__(sched, "step", wrapped(step))
        object.__setattr__(sched, "step_correct", wrapped(correct))
        return self

    def __exit__(self, *exc):
        vars(self.scheduler).pop("step", None)
        vars(self.scheduler).pop("step_correct", None)
        return False


def row_label(kind: str, noise: str, precision: str | None = None) -> str:
    """``ROW_LABELS``' label; with a low ``precision`` label, which UNet the row runs: diffusers' row
    "(fp32 UNet)", kve_fast's rows ", bf16 UNet" (or ", fp32 UNet + TF32")."""
    base = ROW_LABELS[(kind, noise)]
    if precision is None:
        return base
    if kind == "reference":
        return f"{base} (fp32 UNet)"
    dtype, _, tf32 = precision.partition(" + ")
    return f"{base}, {dtype} UNet" + (f" + {tf32}" if tf32 else "")


def _row_record(kind: str, noise: str, precision: str | None = None) -> dict:
    rec = {"row": row_label(kind, noise, precision), "kind": kind, "noise": noise, "status": "pending", "why": None,
           "ms_per_call": None, "min_ms": None, "max_ms": None, "times_ms": [], "repeats": 0, "repeat_rule_met": None,
           "first_call_s": None, "speedup": None, "floor": None, "floor_ratio": None, "equal_reference_latent": None,
           "equal_reference_np": None, "equal_eager": None, "repeat_consistent": None, "accuracy": None,
           "warnings": []}
    if precision is not None and kind != "reference":
        rec.update(precision=precision, rel_rms_reference=None)
    return rec


def _row_estimate(call_s: float, policy: RepeatPolicy) -> float:
    """Seconds a row should take: its first call and the repeats ``policy`` gives such calls (+5 %)."""
    return 1.05 * call_s * (1 + policy.repeats(call_s))


def _time_row(rec: dict, call, sync, policy: RepeatPolicy, log, before_first=None):
    """First call (timed as first image), then the policy's repeats, and more while the median says the rule
    needs more (``required_repeats``); returns the first call's output (host)."""
    from .provenance import required_repeats

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if before_first is not None:
            before_first()
        first_s, out = _timed(call, sync)
    for w in caught:
        text = f"{w.category.__name__}: {w.message}"
        if text not in rec["warnings"]:
            rec["warnings"].append(text)
            log(f"    warning: {text}")
    first = _host(out)
    del out
    n = policy.repeats(first_s)
    times, consistent = [], True

    def one():
        nonlocal consistent
        dt, out = _timed(call, sync)
        times.append(dt)
        consistent = consistent and compare(_host(out), first)["equal"]

    for _ in range(n):
        one()
    while policy.fixed is None and times and len(times) < required_repeats(sorted(times)[len(times) // 2]):
        one()  # the first call was long (a capture), the calls are short: the rule for short calls
    rule = required_repeats(sorted(times)[len(times) // 2]) if times else None
    rec.update(status="ok", first_call_s=first_s, times_ms=[t * 1e3 for t in times], repeats=len(times),
               ms_per_call=_median_ms(times) if times else None, min_ms=min(times) * 1e3 if times else None,
               max_ms=max(times) * 1e3 if times else None, repeat_consistent=consistent,
               repeat_rule_met=rule is not None and len(times) >= rule)
    return first


# -- accuracy of the rows that are not bit-exact -----------------------------------------------------------------

# A fast-noise float32 row differs from the same-noise float32 reference only where an NCSN++ UNet's FIR blocks
# run on the Triton kernel (the only non-exact op of that mode): each FIR output is within a few float32
# roundings of diffusers' (kve_fast.ops.fir_triton), grown over the run. A priori bound on the relative RMS of
# the final latent (measured on the CPU, Triton's interpreter: see bench/RESULTS.md, "Accuracy bounds"); a row
# without FIR blocks must be equal.
FAST_FIR_FP32_BOUND = 1e-3
QUALITY_NOTE = ("neither the digits judge nor the Gaussian oracle applies to this model (random weights): "
                "bench/precision_check.py and tests/test_accuracy.py check those models")


class SharedReference:
    """What the rows of one configuration share across its precisions, measured once in the run: diffusers'
    timed row and its final latent and images (``row``, ``latent``, ``np``), and the untimed float32 reference
    runs of the non-exact rows (``runs``, by name). Pass the same object to ``bench_pipeline`` for each
    precision of a configuration: the second call reuses diffusers' row (its speed-ups are against the median
    measured in this run) instead of timing it again."""

    def __init__(self, config: str):
        self.config, self.row, self.latent, self.np, self.runs = config, None, None, None, {}


class _Plain:
    """A low-precision copy of a model run the plain PyTorch way (``kve_fast.accuracy.InDtype`` without another
    copy): input cast to ``dtype``, output read back in float32; a function, so the sampler runs diffusers'
    FIR ops on it (``kve_fast.sampler._fast_fir`` applies to modules only)."""

    def __init__(self, model, dtype):
        self.model, self.dtype = model, dtype

    def __call__(self, x, sigma):
        out = self.model(x.to(self.dtype), sigma)
        return (out.sample if hasattr(out, "sample") else out).float()


def _as_function(model):
    """``model`` as a plain function: the same calls, but the sampler treats it as a function (diffusers' FIR
    ops, never the fast kernel), so its run is the float32 reference of the fast-noise rows."""
    return lambda x, sigma: model(x, sigma)


def _reference_run(shared: SharedReference, key: str, make, log):
    """``shared.runs[key]``: the untimed reference run ``make()`` (its host output), made once."""
    if key not in shared.runs:
        log(f"    accuracy reference: {key} ...")
        shared.runs[key] = _host(make())
    return shared.runs[key]


def _accuracy(r: dict, out, *, noise: str, low: dict | None, has_fir: bool, fir_fast: bool, shared: SharedReference,
              reference, plain, log) -> dict:
    """The accuracy check of a non-exact row (see ``bench_pipeline``): relative RMS of its final output against
    the float32 reference with the same noise, and its bound."""
    import math

    from ..precision import YARDSTICK_FACTOR

    ref_name, ref = reference
    value = relative_rms(out, ref)
    acc = {"metric": "relative RMS of the final sample, ||a - b|| / ||b||", "against": ref_name, "value": value,
           "quality": QUALITY_NOTE}
    if low is not None:
        plain_name, plain_out = plain
        yard = relative_rms(plain_out, ref)
        acc.update(yardstick={"run": plain_name, "value": yard}, bound=YARDSTICK_FACTOR * yard,
                   bound_rule=f"at most {YARDSTICK_FACTOR:g}x the plain run's distance (flash-attention's rule, "
                              "kve_fast.precision.YARDSTICK_FACTOR), measured in this run")
    elif has_fir and fir_fast:
        acc.update(bound=FAST_FIR_FP32_BOUND, bound_rule=f"at most {FAST_FIR_FP32_BOUND:g}: the FIR kernel is the "
                   "only non-exact op (a priori bound, kve_fast.benchmark.rows.FAST_FIR_FP32_BOUND)")
    else:
        acc.update(bound=0.0, bound_rule="equal: no op of this mode differs from the reference but the noise source, "
                                         "which the reference shares")
    acc["ok"] = bool(math.isfinite(value) and value <= acc["bound"])
    return acc


def bench_pipeline(pipe, *, name: str, batch_size: int, steps: int = 50, device=None, seed: int = 0,
                   noises=NOISE_MODES, kinds=KINDS, reference: bool = True, step_backend: str = "auto",
                   output_type: str = "latent", policy: RepeatPolicy | None = None, deadline: float | None = None,
                   log=print, model_label: str | None = None, unet_dtype=None, tf32: bool = False,
                   shared: SharedReference | None = None) -> dict:
    """Measure every row for one pipeline and batch size; return the configuration's record (see the module
    docstring). ``deadline``: a ``time.monotonic()`` value after which rows are skipped with a note (and the
    whole configuration, when its estimated cost does not fit the time left).

    ``unet_dtype`` (None, ``torch.float32``, ``torch.bfloat16`` or ``torch.float16``) and ``tf32``: how
    kve_fast's rows run the UNet. Low precision: they run a converted copy of ``pipe.unet`` (which must
    be float32; it is not modified) natively, with ``unet_dtype`` and ``tf32`` passed to the pipeline;
    diffusers' row runs the float32 UNet with TF32 off. The copy is dropped (and the graph captures holding
    it cleared) before returning.

    Every row that is not bit-exact (low precision, TF32, fast noise, and with it an NCSN++ UNet's FIR blocks on
    the Triton kernel) gets ``accuracy``: the relative RMS of its final sample against the float32 reference
    with the same noise (exact noise: diffusers' final latent, else kve_fast's exact float32 run; fast noise:
    kve_fast's eager float32 run with the same keys, the model called as a function so its FIR blocks run
    diffusers' ops), and its bound: low precision and TF32, at most ``YARDSTICK_FACTOR`` x the distance of the
    plain run in that precision (the model cast around its call, diffusers' ops; measured in this run); float32
    fast noise, ``FAST_FIR_FP32_BOUND`` with FIR blocks on the kernel, else equality. A row out of its bound is
    a failed check (``exactness_failures``). Each row names its ``floor``: the forward it runs (dtype, FIR
    kernel), measured in this run (``rec["floors"]``).

    ``shared``: a ``SharedReference`` to share diffusers' row and the reference runs between the precisions of
    one configuration (see there); None: this call's own.
    """
    import torch

    from ..precision import check_tf32, check_unet_dtype, model_dtype

    unet_dtype, tf32 = check_unet_dtype(unet_dtype), check_tf32(tf32)
    if unet_dtype == torch.float32:
        unet_dtype = None
    label = precision_label(unet_dtype, tf32)
    common = dict(name=name, batch_size=batch_size, steps=steps, device=device, seed=seed, noises=noises,
                  kinds=kinds, reference=reference, step_backend=step_backend, output_type=output_type,
                  policy=policy, deadline=deadline, log=log, model_label=model_label,
                  shared=shared if shared is not None else SharedReference(name))
    if label is None:
        return _bench_pipeline(pipe, pipe, **common)
    own = model_dtype(pipe.unet)
    if unet_dtype is not None and own != torch.float32:
        raise ValueError(f"bench_pipeline: `unet_dtype`={unet_dtype} needs the float32 UNet (diffusers' row runs it; "
                         f"kve_fast's rows run a converted copy), got a {own} one")
    run_pipe = pipe
    if unet_dtype is not None:
        run_pipe = copy.copy(pipe)  # shares the scheduler; only its unet differs
        run_pipe.__dict__["unet"] = low_precision_copy(pipe.unet, unet_dtype)
    precision = {"label": label, "unet_dtype": str(unet_dtype or torch.float32).replace("torch.", ""), "tf32": tf32,
                 "converted_copy": run_pipe is not pipe, "reference": "float32, TF32 off"}
    try:
        return _bench_pipeline(pipe, run_pipe, precision=precision, **common)
    finally:
        if run_pipe is not pipe:
            _clear_graphs()  # captures of the copy hold it and its buffers
            run_pipe.__dict__.pop("unet", None)
            del run_pipe
            import gc

            gc.collect()
            dev = torch.device(device) if device is not None else pipe.device
            if dev.type == "cuda":
                torch.cuda.empty_cache()


def _bench_pipeline(pipe, run_pipe, **settings) -> dict:
    """``bench_pipeline``'s rows: diffusers' on ``pipe`` (float32), kve_fast's on ``run_pipe`` (``pipe`` itself,
    or a copy holding the low-precision UNet); ``precision``: None (float32, exact) or bench_pipeline's record."""
    config = _Config(pipe, run_pipe, **settings)
    why = config.over_budget()
    if why is not None:
        return config.skipped(why)
    for key in config.rows:
        config.run_row(key)
    return config.finish()


class _Config:
    """One configuration's measurement (``_bench_pipeline``): its record, its floors, its rows' records and the
    calls they time; one method per part."""

    def __init__(self, pipe, run_pipe, *, name: str, batch_size: int, steps: int, device, seed: int, noises, kinds,
                 reference: bool, step_backend: str, output_type: str, policy: RepeatPolicy | None,
                 deadline: float | None, log, model_label: str | None, shared: SharedReference,
                 precision: dict | None = None):
        import torch

        from .floor import has_fir
        from .timing import _fast_fir_runs

        self.pipe, self.run_pipe, self.shared, self.log, self.deadline = pipe, run_pipe, shared, log, deadline
        self.batch_size, self.steps, self.seed, self.noises = batch_size, steps, seed, noises
        self.step_backend, self.output_type = step_backend, output_type
        self.device = torch.device(device) if device is not None else pipe.device
        self.policy = policy or RepeatPolicy()
        self.sync = _sync(self.device)
        self.t_config = time.monotonic()
        self.unet = pipe.unet
        self.precision = precision
        self.label = precision["label"] if precision is not None else None
        self.shape = pipe._image_shape(batch_size)
        self.calls = 2 * steps - 1
        self.rec = {"name": name, "model": model_label, "params": _params(self.unet), "shape": list(self.shape),
                    "batch_size": batch_size, "steps": steps, "model_calls": self.calls, "output_type": output_type,
                    "step_backend": step_backend, "seed": seed, "repeat_policy": self.policy.as_dict(),
                    "status": "ok", "floor": None, "floors": {}, "rows": [], "notes": [], "inside_share": None}
        if precision is not None:
            self.rec["precision"] = dict(precision)
        log(f"== {name}: image {'x'.join(map(str, self.shape[1:]))}, batch {batch_size}, {steps} steps ({self.calls} "
            f"model calls), {(self.rec['params'] or 0) / 1e6:.1f} M parameters, {self.device}"
            + (f"; kve_fast rows in {self.label}" if precision is not None else ""))
        self.fir = has_fir(run_pipe.unet)
        self.fir_fast = self.fir and _fast_fir_runs(self.device)  # where the sampler's fast modes run the FIR kernel
        self.dtype = getattr(torch, precision["unet_dtype"]) if precision is not None else torch.float32
        self.tf32 = bool(precision["tf32"]) if precision is not None else False
        self.rows = ([("reference", "exact")] if reference else []) + [(k, n) for k in KINDS if k in kinds
                                                                         for n in NOISE_MODES if n in noises]
        self.records = {key: _row_record(*key, precision=self.label) for key in self.rows}
        self.rec["rows"] = list(self.records.values())
        for (kind, noise), r in self.records.items():  # diffusers' row: the float32 floor, where this config has it
            r["floor"] = self.floor_for(noise) if kind != "reference" else (
                None if precision is not None else self.floor_for("exact"))
        if not self.rec["floors"]:
            self.floor_for("exact")
        self.rec["floor"] = next(iter(self.rec["floors"].values()))  # the first: the float32 exact rows' (or the only)
        self.shipped = _needs_patch(self.unet)  # NCSN++ as diffusers ships it: put back after the runner patched it
        self.ref_pipe, self.ref_why = (None, "not asked for (--no-reference)") if not reference else \
            _reference_pipeline(pipe)
        if shared.row is not None:
            self.ref_pipe, self.ref_why = None, f"measured once for {shared.config} in this run (shared)"
        self.graphs_ok, self.graphs_why = graph_support(run_pipe, self.device)
        self.cuda_graph_kw = supports_cuda_graph(run_pipe)
        self.precision_kw = {"unet_dtype": self.dtype, "tf32": self.tf32} if precision is not None else {}
        self.outputs: dict = {}

    def floor_for(self, noise: str) -> str:
        """The floor a row of ``noise`` runs against: its forward (dtype, FIR kernel), measured once."""
        import torch

        fast_mode = self.precision is not None or noise == "fast"
        key = (self.label or "fp32") + (", FIR on Triton" if fast_mode and self.fir_fast else "")
        if key not in self.rec["floors"]:
            self.log(f"    floor: {key} ...")
            self.rec["floors"][key] = measure_floor(
                self.run_pipe.unet, self.shape, self.device, self.calls, self.log,
                dtype=None if self.dtype == torch.float32 else self.dtype, fast_fir=fast_mode, tf32=self.tf32)
        return key

    def over_budget(self) -> str | None:
        """Why the whole configuration is skipped: its rows (first call + the policy's repeats) and the accuracy
        references cannot fit the time left (low precision: the floor is the low-precision model's, so diffusers'
        float32 row is underestimated); None where it fits or there is no deadline."""
        if self.deadline is None:
            return None
        some_floor = self.rec["floor"] or {}
        eager_call_s = self.calls * some_floor.get("forward_eager_ms", 0.0) / 1e3
        graph_call_s = some_floor.get("floor_ms", 0.0) / 1e3
        est = sum(_row_estimate(graph_call_s if k == "graphed" else eager_call_s * (1.1 if k == "reference" else 1.0),
                                self.policy) for k, _ in self.rows
                  if not (k == "reference" and self.shared.row is not None))
        est += eager_call_s * (("fast" in self.noises) + 2 * (self.precision is not None))  # untimed references
        left = self.deadline - time.monotonic()
        if est <= left:
            return None
        return f"skipped: about {est:.0f} s needed, {max(left, 0):.0f} s left of the time budget (--budget-s)"

    def skipped(self, why: str) -> dict:
        for r in self.rec["rows"]:
            r.update(status="skipped", why=why)
        self.rec.update(status="skipped", notes=[why], seconds=time.monotonic() - self.t_config)
        self.log("    " + why)
        return self.rec

    # -- the calls ---------------------------------------------------------------------------------------------

    def generator(self):
        import torch

        return torch.Generator().manual_seed(self.seed)

    def ours(self, kind: str, noise: str):
        """A timed row's call: kve_fast's pipeline, eager or graphed."""
        kwargs = {"cuda_graph": kind == "graphed"} if self.cuda_graph_kw else {}
        return lambda: self.run_pipe(self.batch_size, self.steps, self.generator(), output_type=self.output_type,
                                     backend=self.step_backend, noise=noise, **kwargs, **self.precision_kw).images

    def as_output(self, latent):
        return latent if self.output_type == "latent" else _latent_to_np(latent)

    def sampled(self, model, noise: str, backend: str, tf32: bool = False):
        """An untimed eager run of ``model`` (a function) with this row's scheduler, seed and noise."""
        from ..sampler import sample_karras_ve

        return lambda: self.as_output(sample_karras_ve(
            model, self.pipe.scheduler, self.shape, self.steps, self.generator(), device=self.device, backend=backend,
            noise=noise, cuda_graph=False, output="latent", tf32=tf32))

    def fp32_reference(self, noise: str):
        """(name, output): the float32 reference of a non-exact row with ``noise`` (see bench_pipeline)."""
        shared = self.shared
        if noise == "exact" and shared.latent is not None:
            return "diffusers' float32 pipeline (exact noise, the same stream)", self.as_output(shared.latent)
        if noise == "exact":
            return ("kve_fast's exact float32 run (torch backend; bit-identical to diffusers')",
                    _reference_run(shared, "fp32 exact", self.sampled(_as_function(self.unet), "exact", "torch"),
                                   self.log))
        return ("kve_fast's eager float32 run with the same fast-noise keys, the UNet called as a function "
                "(diffusers' FIR ops)", _reference_run(shared, "fp32 fast", self.sampled(
                    _as_function(self.unet), "fast", self.step_backend), self.log))

    def plain_run(self, noise: str):
        """(name, output): the plain run in this row's precision, with ``noise``."""
        import torch

        backend = "torch" if noise == "exact" else self.step_backend
        if self.dtype != torch.float32:
            model = _Plain(self.run_pipe.unet, self.dtype)
            what = f"the {self.label} copy called plainly (input cast, output read in float32)"
        else:
            model, what = _as_function(self.unet), "the float32 UNet"
        return (f"{what}, {'TF32 on, ' if self.tf32 else ''}diffusers' ops, the float32 loop, {noise} noise",
                _reference_run(self.shared, f"plain {self.label} {noise}",
                               self.sampled(model, noise, backend, tf32=self.tf32), self.log))

    # -- the rows ----------------------------------------------------------------------------------------------

    def run_row(self, key) -> None:
        """Time one row and compare it; a failure is the row's, the others still run."""
        kind, noise = key
        r = self.records[key]
        if self.deadline is not None and time.monotonic() > self.deadline:
            r.update(status="skipped", why="skipped: the time budget (--budget-s) ran out")
            self.log(f"    {r['row']}: {r['why']}")
            return
        try:
            if kind == "reference":
                self.reference_row(r)
            else:
                self.kve_row(r, kind, noise)
        except Exception as exc:
            _settle(self.device)
            r.update(status="failed", why=_first_line(exc))
            self.log(f"    {r['row']}: FAILED {r['why']}")
            import traceback

            traceback.print_exc(file=sys.stderr)

    def reference_row(self, r: dict) -> None:
        """diffusers' row: timed, its final latent recorded on the first call (shared across precisions)."""
        shared = self.shared
        if shared.row is not None:
            r.update({k: v for k, v in shared.row.items() if k not in ("row", "floor")}, shared_from=shared.config)
            return
        if self.ref_pipe is None:
            r.update(status="unavailable", why=self.ref_why)  # left out of the report, with the reason
            return
        self.log(f"    {r['row']} ...")
        hook = _LatentHook(self.ref_pipe.scheduler)
        call = lambda: self.ref_pipe(self.batch_size, self.steps, self.generator(), output_type="np").images  # noqa: E731
        state = {"first": True}

        def ref_call():
            if state["first"]:
                state["first"] = False
                with hook:
                    return call()
            return call()

        shared.np = _time_row(r, ref_call, self.sync, self.policy, self.log)
        shared.latent = _host(hook.latent) if hook.latent is not None else None
        shared.row = dict(r)
        self.rec["inside_share"] = inside_share(shared.np)

    def kve_row(self, r: dict, kind: str, noise: str) -> None:
        """One of kve_fast's rows: timed (graphed: from no captures, so the first call includes capturing), then
        compared."""
        if kind == "graphed" and not self.graphs_ok:
            r.update(status="unavailable", why=self.graphs_why)
            return

        def fresh():
            _clear_graphs(self.rec["notes"])
            r["captures_before"] = _captures()

        self.log(f"    {r['row']} ...")
        try:
            out = _time_row(r, self.ours(kind, noise), self.sync, self.policy, self.log,
                            before_first=fresh if kind == "graphed" else None)
        except (ValueError, TypeError, NotImplementedError) as exc:
            # The runner's documented refusal (cuda_graph=True and the run cannot be captured) is a ValueError;
            # anything else is a failure, reported as such.
            if kind != "graphed":
                raise
            r.update(status="unavailable", why=f"graphs unavailable: {_first_line(exc)}")
            _settle(self.device)
            return
        if kind == "graphed":
            r["captures_after"] = _captures()
            if r.get("captures_after") == 0:
                self.rec["notes"].append(f"{r['row']}: graph_info() reports no capture after the run: it may have run "
                                         "eagerly")
        self.outputs[(kind, noise)] = out
        if self.rec["inside_share"] is None:
            self.rec["inside_share"] = inside_share(_latent_to_np(out) if self.output_type == "latent" else out)
        self.compare_row(r, kind, noise, out)

    def compare_row(self, r: dict, kind: str, noise: str, out) -> None:
        """A row's output against diffusers' (bits; low precision: the relative RMS), against the eager row's
        (graphed), and, where it is not bit-exact, its accuracy gate."""
        low, latent_out = self.precision is not None, self.output_type == "latent"
        ref_latent, ref_np = self.shared.latent, self.shared.np
        if noise == "exact" and low and ref_latent is not None and latent_out:
            # Bits cannot match a float32 run: how far the final sample is from diffusers' instead.
            r["rel_rms_reference"] = {"of": "latent", "value": relative_rms(out, ref_latent)}
        elif noise == "exact" and low and ref_np is not None and not latent_out:
            r["rel_rms_reference"] = {"of": "np", "value": relative_rms(out, ref_np)}
        elif noise == "exact" and ref_np is not None:
            if latent_out:
                if ref_latent is not None:
                    r["equal_reference_latent"] = compare(out, ref_latent)
                # diffusers' own conversion, on the device diffusers ran it on
                r["equal_reference_np"] = compare(_latent_to_np(out.to(self.device)), ref_np)
            else:
                r["equal_reference_np"] = compare(out, ref_np)
        if kind == "graphed" and ("eager", noise) in self.outputs:
            r["equal_eager"] = compare(out, self.outputs[("eager", noise)])
        if low or noise == "fast":
            r["accuracy"] = _accuracy(r, out, noise=noise, low=self.precision, has_fir=self.fir,
                                      fir_fast=self.fir_fast, shared=self.shared,
                                      reference=self.fp32_reference(noise),
                                      plain=self.plain_run(noise) if low else None, log=self.log)
            a = r["accuracy"]
            self.log(f"    accuracy: {a['value']:.3g} (bound {a['bound']:.3g}: {'ok' if a['ok'] else 'OUT OF BOUND'})")

    def finish(self) -> dict:
        """Captures cleared (the UNet as diffusers ships it again), the ratios to the floor and to diffusers."""
        if any(k == "graphed" for k, _ in self.rows) and self.graphs_ok:
            _clear_graphs()
            if self.shipped and not _needs_patch(self.unet):
                from .. import ncsnpp

                ncsnpp.restore(self.unet)
                self.rec["notes"].append("the graph runner made the UNet capturable (kve_fast.ncsnpp); restored "
                                         "afterwards, so later configurations see the model as diffusers ships it")
        ref_row = self.records.get(("reference", "exact"))
        ref_ms = ref_row["ms_per_call"] if ref_row is not None else None
        for r in self.rec["rows"]:
            floor = self.rec["floors"].get(r.get("floor"))
            if r["ms_per_call"] and floor:
                r["floor_ratio"] = r["ms_per_call"] / floor["floor_ms"]
            if r["ms_per_call"] and ref_ms:
                r["speedup"] = ref_ms / r["ms_per_call"]
        self.rec["seconds"] = time.monotonic() - self.t_config
        if any(r["status"] == "failed" for r in self.rec["rows"]):
            self.rec["status"] = "partial"
        return self.rec


def jit_warmup(device, step_backend: str = "auto", log=print, unet_dtype=None, tf32: bool = False) -> float | None:
    """Compile the step kernels (eager and graphed, both noises) on a throwaway tiny UNet, 2 steps, so that
    first-call times are not Triton's one-time JIT; returns the seconds it took (None on the CPU).
    ``unet_dtype``/``tf32``: warm up the variants low-precision rows run (the UNet converted to ``unet_dtype``;
    the kernels write the model input in it)."""
    import torch

    if device.type != "cuda":
        return None
    from diffusers import UNet2DModel

    from ..pipeline import KarrasVePipeline
    from ..karras_ve_scheduler import KarrasVeScheduler

    t0 = time.perf_counter()
    torch.manual_seed(0)
    unet = UNet2DModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=3, out_channels=3,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    unet = unet.to(device).eval()
    precision_kw = {}
    if unet_dtype is not None and unet_dtype != torch.float32:
        unet = low_precision_copy(unet, unet_dtype)
        precision_kw["unet_dtype"] = unet_dtype
    if tf32:
        precision_kw["tf32"] = True
    pipe = KarrasVePipeline(unet, KarrasVeScheduler())
    pipe.set_progress_bar_config(disable=True)
    graphs_ok, _ = graph_support(pipe, device)
    kinds = [False, True] if graphs_ok else [False]
    for graphed in kinds:
        for noise in NOISE_MODES:
            kwargs = {"cuda_graph": graphed} if supports_cuda_graph(pipe) else {}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    pipe(1, 2, torch.Generator().manual_seed(0), output_type="latent", backend=step_backend,
                         noise=noise, **kwargs, **precision_kw)
            except Exception as exc:
                log(f"    warm-up ({'graphed' if graphed else 'eager'}, {noise}): {_first_line(exc)}")
    if graphs_ok:
        _clear_graphs()
    torch.cuda.synchronize(device)
    del pipe, unet
    torch.cuda.empty_cache()
    return time.perf_counter() - t0

"""The step schedule: which stages of Algorithm 2 a step runs, what fuses, and which named tensors each
stage reads and writes. Declared once, here; the eager engine runs it (``kve_fast.engine``) and the graph
runner captures the very same stage lists (``kve_fast.graphs``), so there is no second copy of a step.

A step of Algorithm 2 is four stages, in the paper's order::

    Churn    lines 4-6   x_hat = x + sqrt(sigma_hat^2 - sigma^2) S_noise eps, and the model's input
    Denoise  line 7      D(x_hat; sigma_hat)                                   (the model)
    Euler    lines 7-8   d = (x_hat - D) / sigma_hat;  x_next = x_hat + (sigma_{i+1} - sigma_hat) d
    Denoise  line 10     D(x_next; sigma_{i+1})                                (the model; Heun only)
    Heun     lines 10-11 x_next = x_hat + (sigma_{i+1} - sigma_hat) (d + d') / 2

What fuses: without a callback, step i+1's churn is fused into step i's last stage (``Heun.then``, or a
``Churn`` of the next step after an Euler-only step), so the first step's churn runs on its own before the
loop (``Schedule.prologue``) and every step then starts at its model call; the final image is written by
the last Euler stage where the backend can. With a callback, each step starts with its own churn and a
``HandOut`` stage gives the callback the sample (between steps, the reference's convention) or x_hat and
D (after the first model call, k-diffusion's); a graph ends before a ``HandOut`` and the next one starts
after it.

Tensors are named, not numbered: ``x`` (the sample, and the output), ``hat`` (x_hat), ``input`` and
``input_next`` (the model's inputs at sigma_hat and sigma_{i+1}: ``(x + 1) / 2`` for a score model, in
its dtype; a denoiser takes ``hat`` and ``next`` themselves), ``raw`` and ``raw_next`` (the model's
outputs), ``next`` (x_{i+1} of the Euler stage), ``d``, ``denoised`` (D, for a callback) and ``image``.
Where each lives is ``Buffers``' decision: a buffer reused every step, or a new tensor each time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .convention import Convention
from .noise import Draw
from .plan import LevelValues  # (defined with the plan, which makes them once per step)


# -- the stages ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Churn:
    """Lines 4-6 at step i (``of="own"``) or at step i+1 (``"next"``, fused after step i): ``hat`` = ``x`` +
    c S_noise eps, and ``model_input`` = (``hat`` + 1) / 2 for a score model (None for a denoiser).
    ``noise`` False: k-diffusion's gamma = 0, where ``hat`` is ``x`` itself and no noise is added."""

    x: str
    hat: str
    model_input: str | None
    noise: bool
    of: str = "own"

    def writes(self) -> tuple:
        return self.hat, self.model_input


@dataclass(frozen=True)
class Denoise:
    """The model at ``x``, at sigma_hat (``at="hat"``, line 7) or sigma_{i+1} (``"next"``, line 10); its raw
    output is ``out``."""

    x: str
    at: str
    out: str

    def writes(self) -> tuple:
        return ()  # the model's output is the model's own tensor


@dataclass(frozen=True)
class Euler:
    """Lines 7-8 from the raw model output: ``x_next``, and where named: ``d``, the model's input at
    ``x_next`` (``model_input``), D itself (``denoised``), and the final image (``image``, of kind
    ``image_kind``: ``"float"`` BCHW or ``"uint8"`` BHWC)."""

    raw: str
    hat: str
    x_next: str
    d: str | None = None
    model_input: str | None = None
    denoised: str | None = None
    image: str | None = None
    image_kind: str | None = None

    def writes(self) -> tuple:
        return self.x_next, self.d, self.model_input, self.denoised, self.image


@dataclass(frozen=True)
class Heun:
    """Lines 9-11 from the raw model output at sigma_{i+1}: the corrected sample ``x`` (None when it only
    feeds ``then``), D' (``denoised``), and ``then``: the next step's churn of that sample, fused."""

    raw: str
    hat: str
    x_next: str
    d: str
    x: str | None = None
    denoised: str | None = None
    then: Churn | None = None

    def writes(self) -> tuple:
        return (self.x, self.denoised) + (self.then.writes() if self.then is not None else (None, None))


@dataclass(frozen=True)
class Advance:
    """Line 8 on its own, after a callback saw x_hat: ``x_next`` = ``hat`` + (sigma_{i+1} - sigma_hat) ``d``, from
    the ``d`` an Euler stage computed before the callback (k-diffusion's order: an in-place edit of x_hat by
    the callback moves the step, an edit of D does not)."""

    hat: str
    d: str
    x_next: str

    def writes(self) -> tuple:
        return (self.x_next,)


@dataclass(frozen=True)
class HostDraw:
    """Host work: the churn noise of the stage after this one is drawn here, from the caller's ``randn_like``
    (NVlabs' samplers, ``Convention.edm``), after the model call before and before the launch that adds it, as
    the originals draw it: a graph ends here and the next one starts after the draw (the eager engine draws in
    the churn that follows, at the same point: nothing runs in between)."""

    def writes(self) -> tuple:
        return ()


@dataclass(frozen=True)
class HandOut:
    """Host work: the callback sees ``x`` and ``denoised`` (and may replace ``x`` or stop the run)."""

    x: str
    denoised: str

    def writes(self) -> tuple:
        return ()


# -- which stages a step runs ----------------------------------------------------------------------------


class StepKind(NamedTuple):
    """What distinguishes one step's stage list from another's."""

    correct: bool  # lines 9-11 run (Heun, and sigma_{i+1} != 0)
    last: bool  # the run's last step
    churns: bool  # this step's line 6 adds noise (always in the reference's convention)
    next_churns: bool  # ... and the next step's (False on the last step)


class Schedule:
    """The stage lists of one run (see the module docstring).

    Args:
        convention: ``kve_fast.convention.REFERENCE`` or ``K_DIFFUSION``.
        heun: Heun's correction (Algorithm 2), else Euler steps only.
        hand_out: a callback sees each step (``HandOut`` stages; nothing fused across steps).
        image: None, ``"float"`` or ``"uint8"``: the final image the run returns.
        fuses_image: the backend can write that image from its last Euler stage.
    """

    def __init__(self, convention: Convention, heun: bool, hand_out: bool, image: str | None, fuses_image: bool):
        self.convention, self.heun, self.hand_out, self.image = convention, heun, hand_out, image
        self.fuses_image = fuses_image and image is not None and not hand_out
        # each churn that draws is preceded by a declared HostDraw (NVlabs' samplers; they take no callback)
        self.host_draws = convention.edm and not hand_out
        self._stages: dict = {}  # StepKind -> its stages (a run has a few kinds)

    def kind(self, plan, step) -> StepKind:
        """The kind of ``step`` (of ``plan``)."""
        return StepKind(*self._kind_fields(plan, step))

    def _kind_fields(self, plan, step) -> tuple:
        """``kind(plan, step)``'s fields, as a plain tuple (equal to the ``StepKind``: a key of ``_stages``)."""
        i = step.index
        last = i == len(plan) - 1
        correct = self.heun and not step.last  # step.last: sigma_{i+1} = 0 (k-diffusion's sequences may end elsewhere)
        if self.convention.churn_every_step:  # (then no other step needs to be made to know)
            return correct, last, True, not last
        churns = self.convention.churns
        return correct, last, churns(step), not last and churns(plan[i + 1])

    def step_stages(self, plan, step) -> tuple:
        """``stages(kind(plan, step))``, with fewer calls (the eager loop asks every step)."""
        stages = self._stages.get(self._kind_fields(plan, step))
        return stages if stages is not None else self.stages(self.kind(plan, step))

    def rest_after(self, plan, step, stage: HandOut):
        """``(step, the stages after stage)`` once a callback at ``stage`` has run: ``plan.reread`` gives the
        step as its original finishes it where the callback edited what the plan was made from (k-diffusion's
        sigmas, which its loop reads as it goes; the step's kind may change), else ``step`` and None (go on)."""
        reread = getattr(plan, "reread", None)
        new = reread(step) if reread is not None else None
        if new is None:
            return step, None
        stages = self.step_stages(plan, new)
        return new, stages[stages.index(stage) + 1:]

    def _input(self, hat: str, name: str) -> tuple[str, str | None]:
        """(what the model is called at, the named model input a stage writes for it) for the sample ``hat``."""
        if self.convention.model_input_is_hat():
            return hat, None
        return name, name

    def prologue(self, plan) -> tuple:
        """What runs once before the first step: its churn, unless each step churns itself (a callback)."""
        if self.hand_out:
            return ()
        return self._prologue(self.convention.churns(plan[0]))

    def _prologue(self, churns: bool) -> tuple:
        _, model_input = self._input("hat", "input")
        return self._drawn(Churn(x="x", hat="hat", model_input=model_input, noise=churns))

    def _drawn(self, stage) -> tuple:
        """``stage`` (a churn, or a Heun fused with one), preceded by its ``HostDraw`` where the schedule declares
        them and it draws."""
        churn = stage if isinstance(stage, Churn) else stage.then
        return (HostDraw(), stage) if self.host_draws and churn is not None and churn.noise else (stage,)

    def stages(self, kind: StepKind) -> tuple:
        """The stages of a step of ``kind``, in the paper's order."""
        stages = self._stages.get(kind)
        if stages is None:
            stages = self._stages[kind] = self._declare(kind)
        return stages

    def _declare(self, kind: StepKind) -> tuple:
        at_hat, input_hat = self._input("hat", "input")
        at_next, input_next = self._input("next", "input_next")
        k_diffusion_callback = self.hand_out and self.convention.denoiser
        reference_callback = self.hand_out and not self.convention.denoiser
        stages = []
        if self.hand_out:  # lines 4-6 here; else the previous step (or the prologue) did them
            stages.append(Churn(x="x", hat="hat", model_input=input_hat, noise=kind.churns))
        stages.append(Denoise(x=at_hat, at="hat", out="raw"))  # line 7
        then = None
        if not self.hand_out and not kind.last:  # the next step's lines 4-6, fused into this step's end
            then = Churn(x="x", hat="hat", model_input=input_hat, noise=kind.next_churns, of="next")
        x_next = "next" if kind.correct else "x"
        if k_diffusion_callback:
            # k-diffusion: d, then the callback sees x_hat and D, then line 8 from the x_hat it may have edited
            stages.append(Euler(raw="raw", hat="hat", x_next="scratch", d="d"))
            stages.append(HandOut(x="hat", denoised="raw"))
            stages.append(Advance(hat="hat", d="d", x_next=x_next))
        elif kind.correct:  # lines 7-8
            stages.append(Euler(raw="raw", hat="hat", x_next="next", d="d", model_input=input_next))
        else:  # lines 7-8 only: Euler steps, and a step to sigma_{i+1} = 0
            image = "image" if kind.last and self.fuses_image else None
            stages.append(Euler(raw="raw", hat="hat", x_next="x", denoised="denoised" if reference_callback else None,
                                image=image, image_kind=self.image if image else None))
        if kind.correct:  # lines 9-11
            stages.append(Denoise(x=at_next, at="next", out="raw_next"))
            stages.extend(self._drawn(Heun(raw="raw_next", hat="hat", x_next="next", d="d",
                                           x="x" if self.hand_out or kind.last else None,
                                           denoised="denoised" if reference_callback else None, then=then)))
        elif then is not None:
            stages.extend(self._drawn(then))
        if reference_callback:  # the reference's callback sees the sample after the step
            stages.append(HandOut(x="x", denoised="denoised"))
        return tuple(stages)

    def reusable(self) -> set:
        """The names an eager run keeps in buffers reused every step: all but those whose tensors leave the
        loop (the model's inputs, what a callback sees, the output), which get a new tensor each time, so
        nothing handed out is overwritten later."""
        exposed = {"x", "image"}
        # what is exposed does not depend on gamma: the kinds of a middle and of the last step, without the plan
        middle = StepKind(correct=self.heun, last=False, churns=True, next_churns=True)
        last = StepKind(correct=False, last=True, churns=True, next_churns=False)
        for stages in (() if self.hand_out else self._prologue(True), self.stages(middle), self.stages(last)):
            for s in stages:
                if isinstance(s, Denoise):
                    exposed.add(s.x)
                elif isinstance(s, HandOut):
                    exposed.update((s.x, s.denoised))
        return {"hat", "next", "d", "input", "input_next", "scratch"} - exposed


# -- where the named tensors live -------------------------------------------------------------------------

NEW = "new"  # Buffers.target: a new tensor (the op allocates it)


class Buffers:
    """Where each named tensor of a step is written: a buffer reused every step (``reuse``), or ``NEW``.

    ``reuse``: the names to keep in buffers (None: all of them, as graphs need). Buffers are allocated on
    first use in the state's layout and dtype (``like``: float32, or NVlabs' samplers' float64 or ``dtype``), or
    the model's input dtype for model inputs; ``image`` as the final image of kind ``image_kind`` (float32 BCHW,
    or uint8 BHWC).
    """

    MODEL_INPUTS = ("input", "input_next")

    def __init__(self, like: torch.Tensor | None, model_dtype: torch.dtype = torch.float32, reuse=None,
                 image_kind: str | None = None):
        self.like, self.model_dtype, self.reuse, self.image_kind = like, model_dtype, reuse, image_kind
        self.tensors: dict[str, torch.Tensor] = {}
        self._targets: dict = {}

    def targets(self, stage) -> tuple:
        """``(stage.writes(), their targets)``: ``target(name)`` for each name, in that order (the same every step)."""
        found = self._targets.get(stage)
        if found is None:
            names = stage.writes()
            found = self._targets[stage] = (names, tuple(self.target(n) for n in names))
        return found

    def target(self, name: str | None):
        """The tensor ``name`` is written into, ``NEW``, or None (not wanted)."""
        if name is None:
            return None
        if self.like is None or (self.reuse is not None and name not in self.reuse):
            return NEW
        t = self.tensors.get(name)
        if t is None:
            t = self.tensors[name] = self._allocate(name)
        return t

    def _allocate(self, name: str) -> torch.Tensor:
        like = self.like
        if name == "image" and self.image_kind == "uint8":
            b, c, h, w = like.shape
            return torch.zeros((b, h, w, c), dtype=torch.uint8, device=like.device)
        dtype = self.model_dtype if name in self.MODEL_INPUTS else torch.float32 if name == "image" else like.dtype
        return torch.zeros_like(like, dtype=dtype)


# -- the values one step reads ----------------------------------------------------------------------------


class ChurnValues(NamedTuple):
    """What a churn reads: the step (its 0-d tensors, for the torch backend), ``coef`` and ``s_noise`` as
    floats, or ``coef`` a device tensor ``[c, S_noise]`` (graphs, ``s_noise`` None), and the noise: a
    ``kve_fast.noise.Draw`` (eager: every churn stage draws it, also where it adds none), or the static buffer
    of a graph (a tensor of unscaled draws, or fast-noise keys)."""

    step: object
    coef: object
    s_noise: float | None
    noise: object


class HostFeed:
    """A step's values for an eager run: the plan's floats, one churn's noise from ``source`` (a
    ``kve_fast.noise.Draw``, drawn when the churn runs, with the sample it churns), the model's noise levels
    as the convention makes them."""

    def __init__(self, convention: Convention, plan, s_noise: float, source, s_in=None, extra=None):
        self.convention, self.plan, self.s_noise, self.source = convention, plan, s_noise, source
        self.s_in, self.extra = s_in, extra
        self.step = self.at_hat = self.at_next = None

    def at(self, step) -> "HostFeed":
        """This feed, now for ``step`` (one object serves a whole run)."""
        self.step = step
        self.at_hat, self.at_next = step.values  # (LevelValues made once with the step)
        return self

    def churn(self, of: str) -> ChurnValues:
        step = self.step if of == "own" else self.plan[self.step.index + 1]
        return ChurnValues(step, step.noise_coef, self.s_noise, Draw(self.source))

    def model_level(self, at: str) -> torch.Tensor:
        return self.convention.noise_level(self.step, at, self.s_in)


# -- running the stages -----------------------------------------------------------------------------------


class StepContext:
    """What the stages of one run work with: the step backend, the named tensors (``env``, kept from step to
    step), where they are written (``buffers``), the model (``denoise``) and the host work of ``HandOut``.

    ``fallback``: where the backend cannot read a model output (``backend.reads``: a float64 denoiser on the
    fused float32 kernels), ``fallback(raw)`` returns the backend that goes on instead (the torch ops: the
    original's own, so the bits stay its bits), or raises."""

    def __init__(self, backend, buffers: Buffers, denoise, hand_out=None, fallback=None):
        self.backend, self.buffers, self.denoise, self.hand_out = backend, buffers, denoise, hand_out
        self.fallback = fallback
        self.env: dict[str, torch.Tensor] = {}
        self.programs: dict = {}  # id(stage list) -> its stages with their targets (``run``)
        self.keep: list = []  # the stage lists those ids belong to

    def cannot_read(self, raw: torch.Tensor):
        """Switch to ``fallback(raw)``'s backend for the rest of the run; returns it."""
        if self.fallback is None:
            raise TypeError(f"the model returned {raw.dtype}, which the {self.backend.name} backend does not read")
        self.backend = self.fallback(raw)
        self.buffers = Buffers(None)
        self.programs.clear()
        return self.backend


def run_stages(stages, ctx: StepContext, feed) -> None:
    """Run ``stages`` with the step values of ``feed`` (a ``HostFeed``, or a graph's device feed)."""
    env, be = ctx.env, ctx.backend
    program = ctx.programs.get(id(stages))  # (stage lists are cached by the schedule: their ids are stable)
    if program is None:
        program = ctx.programs[id(stages)] = [(type(s), s) + ctx.buffers.targets(s) for s in stages]
        ctx.keep.append(stages)
    for k, (kind, s, names, out) in enumerate(program):
        if kind is Denoise:
            raw = env[s.out] = ctx.denoise(env[s.x], feed.model_level(s.at), feed.extra)
            if be.reads is not None and raw.dtype not in be.reads:  # a float64 denoiser, say: the torch ops go on
                ctx.cannot_read(raw)
                return run_stages(stages[k + 1:], ctx, feed)
            continue
        if kind is HandOut:
            rest = ctx.hand_out(s, feed)
            if rest is not None:  # the step was planned again meanwhile (see Schedule.rest_after): its own stages
                return run_stages(rest, ctx, feed)
            continue
        if kind is Churn:
            written = be.churn(env[s.x], feed.churn(s.of), noise=s.noise, hat=out[0], model_input=out[1])
        elif kind is Euler:
            written = be.euler(env[s.raw], env[s.hat], feed.at_hat, x_next=out[0], d=out[1], model_input=out[2],
                               denoised=out[3], image=None if s.image is None else (s.image_kind, out[4]))
        elif kind is Advance:
            written = (be.advance(env[s.hat], env[s.d], feed.at_hat, x_next=out[0]),)
        elif kind is Heun:
            then = None if s.then is None else (feed.churn(s.then.of), s.then.noise, out[2], out[3])
            written = be.heun(env[s.raw], env[s.hat], env[s.x_next], env[s.d], feed.at_next, x=out[0],
                              denoised=out[1], then=then)
        elif kind is HostDraw:  # (the churn after it draws, at this point)
            continue
        else:  # pragma: no cover - a stage type without a runner
            raise TypeError(f"unknown stage {s!r}")
        for name, t in zip(names, written):
            if name is not None:
                env[name] = t

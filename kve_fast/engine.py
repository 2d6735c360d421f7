"""The eager engine: runs a run's declared stages (``kve_fast.stages``) step by step on a step backend.

``Engine`` and the graph runner's ``GraphEngine`` (``kve_fast.graphs``) share this interface and the same
stage lists; they differ only in where a step's values come from (here: the plan's floats and the noise
as drawn, ``HostFeed``) and in how the stages run (here: called; there: replayed from CUDA graphs).

An eager run gives every tensor that leaves the loop (the model's inputs, what a callback sees, the
output) a new tensor, so nothing it hands out is overwritten later; the others (x_hat of a score model,
d, x_{i+1}) live in buffers reused every step (``Schedule.reusable``).
"""

from __future__ import annotations

import torch

from .stages import Buffers, HandOut, HostFeed, StepContext, run_stages


class Engine:
    """Runs ``plan`` with ``schedule`` on ``backend`` (see the module docstring).

    Args:
        schedule: the run's ``kve_fast.stages.Schedule``.
        plan: its steps (``kve_fast.plan``).
        backend: a step backend (``kve_fast.ops``).
        denoise: the model caller (``Convention.caller``).
        source: the noise source; ``source.step()`` is one churn's noise.
        s_noise: S_noise.
        like: the state's layout template for the fused backends' buffers (None: the torch backend, which
            makes a new tensor for everything).
        model_dtype: the dtype of a score model's input buffers.
        s_in: k-diffusion's ``x.new_ones([batch])`` (None for the reference's convention).
        extra: k-diffusion's ``extra_args``.
        callback: ``callback(stage, step, state)`` at each ``HandOut``, with ``state`` the named tensors it
            sees; returns a replacement for ``state[stage.x]`` or None.
        fallback: ``fallback(raw)``, the backend that goes on where ``backend`` cannot read a model output
            (``kve_fast.stages.StepContext``), or None.
    """

    def __init__(self, schedule, plan, backend, denoise, source, s_noise: float, like: torch.Tensor | None,
                 model_dtype: torch.dtype = torch.float32, s_in=None, extra=None, callback=None, fallback=None):
        self.schedule, self.plan, self.source, self.s_noise = schedule, plan, source, s_noise
        self.s_in, self.extra, self.callback = s_in, extra, callback
        buffers = Buffers(like, model_dtype, reuse=schedule.reusable(), image_kind=schedule.image)
        self.ctx = StepContext(backend, buffers, denoise, self._hand_out, fallback)
        self.feed = HostFeed(schedule.convention, plan, s_noise, source, s_in, extra)

    @property
    def env(self) -> dict:
        return self.ctx.env

    def start(self, x0: torch.Tensor) -> None:
        """Line 1: the initial sample (already scaled), then the first step's churn where it runs on its own."""
        self.env["x"] = x0
        prologue = self.schedule.prologue(self.plan)
        if prologue:
            run_stages(prologue, self.ctx, self.feed.at(self.plan[0]))

    def step(self, step) -> None:
        """Lines 4-11 of Algorithm 2 for ``step``: the stages of its kind."""
        run_stages(self.schedule.step_stages(self.plan, step), self.ctx, self.feed.at(step))

    def _hand_out(self, stage: HandOut, feed):
        """The callback, with the live state; returns the rest of the step's stages where it has to change
        (``Schedule.rest_after``), else None."""
        state = {stage.x: self.env[stage.x], stage.denoised: self.env[stage.denoised]}
        new = self.callback(stage, feed.step, state)
        if new is not None:
            self.env[stage.x] = new
        step, rest = self.schedule.rest_after(self.plan, feed.step, stage)
        if rest is not None:
            feed.at(step)
        return rest

    def sample(self) -> torch.Tensor:
        """The current sample (after ``step``: x_{i+1})."""
        return self.env["x"]

    def output(self) -> torch.Tensor:
        """The final sample, or its image (new tensors)."""
        if self.schedule.image is None:
            return self.env["x"]
        image = self.env.get("image")
        return image if image is not None else self.ctx.backend.to_image(self.env["x"], self.schedule.image)

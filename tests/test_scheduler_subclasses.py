"""Scheduler subclasses, ours and diffusers': a subclass's own schedule is sampled as diffusers' pipeline samples
it (bit for bit, against the real pipeline run with the same subclass); one that replaces the per-step arithmetic
is refused by name before any work; diffusers' class is recognised by what it is, not by its name."""

from __future__ import annotations

import types

import pytest
import torch
from conftest import RefPipeline, RefScheduler, assert_bitwise, assert_mostly_inside, needs_triton

import kve_fast
from kve_fast import plan as plan_module

BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]
CONFIG = {"s_churn": 2.0, "s_min": 0.05, "s_max": 30.0}  # (gamma below its cap: S_churn / N counts)


def _sqrt_set_timesteps(self, num_inference_steps, device=None):
    """sigma_i = sqrt(t_i): Table 1's VE column as the paper means it, after diffusers' own schedule."""
    RefScheduler.set_timesteps(self, num_inference_steps, device)
    self.schedule = self.schedule.sqrt()


def _sqrt_make_schedule(self, num_inference_steps, device=None):
    timesteps, schedule = kve_fast.KarrasVeScheduler.make_schedule(self, num_inference_steps, device)
    return timesteps, schedule.sqrt()


class DiffusersSqrt(RefScheduler):
    set_timesteps = _sqrt_set_timesteps


def _diffusers_subclass_keeping_the_name():
    class KarrasVeScheduler(RefScheduler):  # (what kve_fast once converted by its name, losing the override)
        set_timesteps = _sqrt_set_timesteps

    return KarrasVeScheduler


class OursSqrt(kve_fast.KarrasVeScheduler):
    make_schedule = _sqrt_make_schedule


class OursEveryOtherStep(kve_fast.KarrasVeScheduler):
    """Every other timestep (t = 6, 4, 2, 0 of 7): diffusers' pipeline then steps from schedule[t] to
    schedule[t - 1], and gamma still divides by num_inference_steps = 7."""

    def set_timesteps(self, num_inference_steps, device=None):
        super().set_timesteps(num_inference_steps, device)
        self.timesteps = self.timesteps[::2]


SUBCLASSES = {"diffusers'": DiffusersSqrt, "diffusers', keeping the name": _diffusers_subclass_keeping_the_name(),
              "ours, make_schedule": OursSqrt, "ours, timesteps": OursEveryOtherStep}


def _images(pipe, steps, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(2, steps, torch.Generator().manual_seed(0), output_type="np", **kwargs).images


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("steps", [7, 8])  # (every other timestep of 8 is 7, 5, 3, 1: the last step ends above 0)
@pytest.mark.parametrize("name", list(SUBCLASSES))
def test_a_subclass_schedule_is_sampled_as_diffusers_pipeline_samples_it(models, name, steps, backend):
    """Mutations: the override not detected (the default schedule sampled: every case fails), gamma divided by
    the number of steps instead of num_inference_steps, sigma_prev taken as the next visited level instead of
    schedule[t - 1], the last step taken to 0 where its t is not 0 (the every-other-step cases)."""
    cls, unet = SUBCLASSES[name], models("gaussian")
    expected = _images(RefPipeline(unet=unet, scheduler=cls(**CONFIG)), steps)
    assert_mostly_inside(expected)
    default = _images(RefPipeline(unet=unet, scheduler=RefScheduler(**CONFIG)), steps)
    assert not (expected == default).all(), "the override must change the images"
    scheduler = cls(**CONFIG)
    pipe = kve_fast.KarrasVePipeline(unet, scheduler)
    assert_bitwise(_images(pipe, steps, backend=backend), expected, name)
    assert pipe.scheduler is scheduler
    scheduler.set_timesteps(5)
    before = scheduler.schedule.clone()
    kve_fast.sample_karras_ve(unet, scheduler, (1, 3, 8, 8), 4, torch.Generator().manual_seed(0), backend=backend)
    assert scheduler.num_inference_steps == 5 and torch.equal(scheduler.schedule, before), "left as it was"


@pytest.mark.parametrize("base, method", [
    (base, method) for base in ("ours", "diffusers'")
    for method in ("add_noise_to_input", "step", "step_correct", "on the instance")
] + [("ours", "churn_sigma")])  # (diffusers' scheduler has no churn_sigma)
def test_a_subclass_replacing_the_step_arithmetic_is_refused_before_any_work(models, base, method):
    """kve_fast runs each step's arithmetic in its own fused steps: a replacement is a TypeError naming the class
    and the method, at the pipeline's construction, at a call with it swapped in, and in sample_karras_ve,
    with the generator and the model untouched (mutation: the step overrides not looked for -> no error)."""
    parent = kve_fast.KarrasVeScheduler if base == "ours" else RefScheduler
    if method == "on the instance":
        scheduler, name, method = parent(), parent.__name__, "step"
        scheduler.step = types.MethodType(parent.step, scheduler)
    else:
        scheduler = type("Replaced", (parent,), {method: getattr(parent, method)})()
        name = "Replaced"
    unet, calls = models("gaussian"), []
    hook = unet.register_forward_hook(lambda *a: calls.append(1))
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    try:
        with pytest.raises(TypeError, match=rf"{name}.*`{method}`"):
            kve_fast.KarrasVePipeline(unet, scheduler)
        pipe = kve_fast.KarrasVePipeline(unet, kve_fast.KarrasVeScheduler())
        pipe.scheduler = scheduler
        with pytest.raises(TypeError, match=rf"{name}.*`{method}`"):
            pipe(1, 3, g)
        with pytest.raises(TypeError, match=rf"{name}.*`{method}`"):
            kve_fast.sample_karras_ve(unet, scheduler, (1, 3, 8, 8), 3, g)
    finally:
        hook.remove()
    assert not calls and torch.equal(g.get_state(), state)


def test_a_class_named_like_diffusers_scheduler_is_not_taken_for_it(models):
    """Recognised by isinstance against diffusers' class, not by the name (mutation: the old name test -> this
    stranger was converted with its config)."""

    class KarrasVeScheduler:
        config = dict(RefScheduler().config)

    with pytest.raises(TypeError, match="scheduler"):
        kve_fast.KarrasVePipeline(models("gaussian"), KarrasVeScheduler())


def test_the_plan_cache_serves_no_scheduler_a_plan_of_another_schedule():
    """Plans are cached by the scheduler's type and config; one whose schedule methods are replaced (on its
    class, or on the instance) after a plan of its type and config was cached is planned from its own methods,
    and is not cached (mutation: the cache looked up before the override test -> the default schedule)."""

    class Plain(kve_fast.KarrasVeScheduler):
        pass

    plan_module.clear_plan_cache()
    default = [s.sigma for s in kve_fast.sampler.plan_steps(Plain(**CONFIG), 6)]
    run = lambda s: kve_fast.sample_karras_ve(  # noqa: E731
        lambda x, sigma: -x, s, (1, 3, 4, 4), 6, callback=lambda d: seen.append(d["sigma"]))
    seen = []
    run(Plain(**CONFIG))
    assert plan_module.plan_cache_info()["plans"] == 1 and seen == default
    patched = Plain(**CONFIG)
    patched.make_schedule = types.MethodType(_sqrt_make_schedule, patched)
    seen.clear()
    run(patched)
    assert seen == [s.sqrt() for s in default]
    Plain.make_schedule = _sqrt_make_schedule
    seen.clear()
    run(Plain(**CONFIG))
    assert seen == [s.sqrt() for s in default]
    assert plan_module.plan_cache_info()["plans"] == 1
    plan_module.clear_plan_cache()


@needs_triton
@pytest.mark.parametrize("steps", [7, 8])
def test_a_subclass_schedule_runs_graphed_with_the_eager_bits(models, fake_graphs, steps):
    """The graph runner captures the kinds of the first and last steps: a subclass's last step that ends above 0
    (a Heun correction on the last step) is one of them."""
    pipe = kve_fast.KarrasVePipeline(models("gaussian"), OursEveryOtherStep(**CONFIG))
    assert_bitwise(_images(pipe, steps, backend="triton", cuda_graph=True),
                   _images(pipe, steps, backend="torch", cuda_graph=False), f"{steps} steps")

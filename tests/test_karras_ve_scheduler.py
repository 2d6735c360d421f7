"""kve_fast.karras_ve_scheduler.KarrasVeScheduler: the reference's schedule, step arithmetic and config files, bit for
bit (and kve_fast.scheduler, its old module name); settings whose float32 schedule is not finite and positive are
refused at construction; the schedule is made when it is read (a pipeline call of 10**7 steps builds none). Its
subclasses, ours and diffusers': a subclass's own schedule is sampled as diffusers' pipeline samples it (bit for bit,
against the real pipeline run with the same subclass); one that replaces the per-step arithmetic is refused by name
before any work; diffusers' class is recognised by what it is, not by its name."""

from __future__ import annotations

import json
import tracemalloc
import types

import pytest
import torch
from conftest import (
    GaussianScore, RefPipeline, RefScheduler, assert_bitwise, assert_mostly_inside, kve_pipe, needs_triton,
)

import kve_fast
from kve_fast import KarrasVeScheduler
from kve_fast import plan as plan_module

SETTINGS = [
    {},
    {"sigma_min": 0.01, "sigma_max": 50.0, "s_noise": 1.0, "s_churn": 30.0, "s_min": 0.1, "s_max": 10.0},
    {"sigma_min": 0.002, "sigma_max": 80, "s_noise": 1.003, "s_churn": 0, "s_min": 0, "s_max": 1000},
]


@pytest.mark.parametrize("config", SETTINGS)
@pytest.mark.parametrize("n", [2, 3, 7, 50, 257])
def test_set_timesteps_matches_reference(config, n):
    ours, ref = KarrasVeScheduler(**config), RefScheduler(**config)
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    assert_bitwise(ours.timesteps, ref.timesteps, "timesteps")
    assert_bitwise(ours.schedule, ref.schedule, "schedule")
    assert ours.num_inference_steps == ref.num_inference_steps == n
    assert ours.init_noise_sigma == ref.init_noise_sigma


@pytest.mark.parametrize("config", SETTINGS)
def test_step_functions_match_reference(config):
    n = 12
    ours, ref = KarrasVeScheduler(**config), RefScheduler(**config)
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    g = torch.Generator().manual_seed(7)
    sample = torch.randn(2, 3, 5, 7, generator=g) * 3
    for t in ref.timesteps:  # every step, so churned and unchurned (gamma = 0) levels are both covered
        sigma = ref.schedule[t]
        sigma_prev = ref.schedule[t - 1] if t > 0 else 0
        hat_o, sh_o = ours.add_noise_to_input(sample, sigma, generator=torch.Generator().manual_seed(int(t)))
        hat_r, sh_r = ref.add_noise_to_input(sample, sigma, generator=torch.Generator().manual_seed(int(t)))
        assert_bitwise(hat_o, hat_r, f"sample_hat at t={int(t)}")
        assert_bitwise(sh_o, sh_r, f"sigma_hat at t={int(t)}")
        model_output = torch.randn(sample.shape, generator=g)
        so, sr = ours.step(model_output, sh_r, sigma_prev, hat_r), ref.step(model_output, sh_r, sigma_prev, hat_r)
        for field in ("prev_sample", "derivative", "pred_original_sample"):
            assert_bitwise(so[field], sr[field], f"step {field}")
        if sigma_prev != 0:
            mo2 = torch.randn(sample.shape, generator=g)
            co = ours.step_correct(mo2, sh_r, sigma_prev, hat_r, sr.prev_sample, sr.derivative)
            cr = ref.step_correct(mo2, sh_r, sigma_prev, hat_r, sr.prev_sample, sr.derivative)
            for field in ("prev_sample", "derivative", "pred_original_sample"):
                assert_bitwise(co[field], cr[field], f"step_correct {field}")
            assert_bitwise(
                ours.step_correct(mo2, sh_r, sigma_prev, hat_r, sr.prev_sample, sr.derivative, return_dict=False)[0],
                cr.prev_sample,
            )
        sample = hat_r


def test_config_round_trips(tmp_path):
    config = SETTINGS[1]
    ours = KarrasVeScheduler(**config)
    ours.save_config(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "KarrasVeScheduler"
    assert {k: saved[k] for k in config} == config
    loaded = KarrasVeScheduler.from_pretrained(tmp_path)
    assert {k: loaded.config[k] for k in config} == config
    # A config written by diffusers' own scheduler loads too, and the other way round.
    ref_dir = tmp_path / "ref"
    RefScheduler(**SETTINGS[2]).save_config(ref_dir)
    from_ref = KarrasVeScheduler.from_pretrained(ref_dir)
    assert {k: from_ref.config[k] for k in SETTINGS[2]} == SETTINGS[2]
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(KarrasVeScheduler.from_config(RefScheduler().config).config) == public(KarrasVeScheduler().config)
    assert public(RefScheduler.from_config(ours.config).config) == public(RefScheduler(**config).config)


@pytest.mark.parametrize(
    "config, name",
    [
        ({"sigma_min": 100, "sigma_max": 100}, "sigma_min"),
        ({"sigma_min": 5.0, "sigma_max": 1.0}, "sigma_min"),
        ({"sigma_min": 0.0}, "sigma_min"),
        ({"sigma_max": -1}, "sigma_max"),
        ({"s_churn": -1.0}, "s_churn"),
        ({"s_noise": -0.5}, "s_noise"),
        ({"s_min": 2.0, "s_max": 1.0}, "s_min"),
        ({"s_min": -1.0}, "s_min"),
        ({"sigma_max": float("inf")}, "sigma_max"),
    ],
)
def test_bad_settings_raise_value_error(config, name):
    with pytest.raises(ValueError, match=name):
        KarrasVeScheduler(**config)


@pytest.mark.parametrize("value", ["50", None, True, [1.0]])
def test_bad_setting_types_raise_type_error(value):
    with pytest.raises(TypeError, match="s_churn"):
        KarrasVeScheduler(s_churn=value)


@pytest.mark.parametrize("n, error", [(1, ValueError), (0, ValueError), (-3, ValueError), (2.0, TypeError), ("5", TypeError), (True, TypeError)])
def test_bad_num_inference_steps_leaves_scheduler_unchanged(n, error):
    scheduler = KarrasVeScheduler()
    scheduler.set_timesteps(5)
    before = (scheduler.num_inference_steps, scheduler.timesteps.clone(), scheduler.schedule.clone())
    with pytest.raises(error, match="num_inference_steps"):
        scheduler.set_timesteps(n)
    assert scheduler.num_inference_steps == before[0]
    assert_bitwise(scheduler.timesteps, before[1])
    assert_bitwise(scheduler.schedule, before[2])


@pytest.mark.parametrize("config", [{}, {"sigma_schedule": "edm", "rho": 5.0, "s_churn": 3.0}])
def test_a_saved_config_loads_in_diffusers_class_without_a_warning(tmp_path, config):
    """diffusers' KarrasVeScheduler warned that `sigma_schedule` and `rho` "are not expected and will be ignored"
    (mutation: writing them as top-level keys); kve_fast reads them back (mutation: dropping them)."""
    import io
    import logging

    from diffusers.schedulers.deprecated.scheduling_karras_ve import KarrasVeScheduler as Ref

    kve_fast.KarrasVeScheduler(**config).save_pretrained(tmp_path)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        ref = Ref.from_pretrained(tmp_path)
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == "", stream.getvalue()
    assert ref.config.s_churn == config.get("s_churn", 80)
    back = kve_fast.KarrasVeScheduler.from_pretrained(tmp_path)
    assert back.config.sigma_schedule == config.get("sigma_schedule", "diffusers")
    assert back.config.rho == config.get("rho", 7.0)


def test_a_subclass_may_replace_one_of_timesteps_and_schedule():
    """Both are made when first read: a subclass's set_timesteps that replaces one after super()'s left the other
    None (mutation: the setters without making the pair first)."""

    class OwnSchedule(KarrasVeScheduler):
        def set_timesteps(self, num_inference_steps, device=None):
            super().set_timesteps(num_inference_steps, device)
            self.schedule = torch.linspace(0.5, 10.0, num_inference_steps)

    class OwnTimesteps(KarrasVeScheduler):
        def set_timesteps(self, num_inference_steps, device=None):
            super().set_timesteps(num_inference_steps, device)
            self.timesteps = torch.arange(num_inference_steps - 1, -1, -2)

    ref = RefScheduler()
    ref.set_timesteps(5)
    own = OwnSchedule()
    own.set_timesteps(5)
    assert_bitwise(own.timesteps, ref.timesteps, "timesteps")
    assert_bitwise(own.schedule, torch.linspace(0.5, 10.0, 5), "schedule")
    own = OwnTimesteps()
    own.set_timesteps(5)
    assert_bitwise(own.schedule, ref.schedule, "schedule")
    assert_bitwise(own.timesteps, torch.tensor([4, 2, 0]), "timesteps")


_ALL = {"sigma_min": 0.01, "sigma_max": 50.0, "s_noise": 1.0, "s_churn": 30.0, "s_min": 0.1, "s_max": 10.0,
        "sigma_schedule": "edm", "rho": 5.0}


@pytest.mark.parametrize("config", [{}, {"sigma_schedule": "ve"}, _ALL] + [
    {k: v for k, v in _ALL.items() if k != left} for left in _ALL  # (one argument left at its default)
])
def test_a_saved_and_reloaded_config_equals_the_saved_one(tmp_path, config):
    """diffusers' own scheduler test mixin (SchedulerCommonTest.test_from_pretrained) run against ours: the
    reloaded config carried `_use_default_values: ['sigma_schedule', 'rho']` (the file leaves them out at their
    defaults) and a non-default pair as a private `_kve_fast` entry, which a reloaded diffusers config never
    does (mutations: extract_init_dict without the defaults filled in, or leaving `_kve_fast` in -> fails). The
    same for diffusers' class, and saving the reloaded one writes the same file."""
    own = {k: v for k, v in config.items() if k not in KarrasVeScheduler._EXTRAS}
    for cls, kwargs in ((RefScheduler, own), (KarrasVeScheduler, config)):
        scheduler = cls(**kwargs)
        folder = tmp_path / cls.__module__.split(".")[0]
        scheduler.save_pretrained(folder)
        text = (folder / "scheduler_config.json").read_text()
        loaded = cls.from_pretrained(folder)
        saved = dict(scheduler.config)
        saved.pop("_use_default_values", None)  # (as the mixin deletes it: a config made with defaults lists them)
        assert dict(loaded.config) == saved, cls
        loaded.save_pretrained(folder)
        assert (folder / "scheduler_config.json").read_text() == text
    if not {"sigma_schedule", "rho"} & set(config):
        assert text == text.replace('"_kve_fast"', ""), "at its defaults the file is diffusers' own"


def test_the_old_module_name_still_imports_with_a_deprecation_warning():
    """kve_fast.scheduler was renamed kve_fast.karras_ve_scheduler; code importing the old name keeps working."""
    import importlib
    import sys

    sys.modules.pop("kve_fast.scheduler", None)
    with pytest.warns(DeprecationWarning, match="kve_fast.scheduler is deprecated"):
        old = importlib.import_module("kve_fast.scheduler")
    assert old.KarrasVeScheduler is kve_fast.KarrasVeScheduler


# --- settings whose float32 schedule is not finite and positive are rejected at construction -----------


@pytest.mark.parametrize("config, name", [
    ({"sigma_min": 1e-30}, "sigma_min"),
    ({"sigma_max": 1e30}, "sigma_max"),
    ({"sigma_max": 1e200}, "sigma_max"),
    ({"sigma_max": 1e15}, "sigma_max"),  # sigma_max**2 = 1e30 is finite, but its square is not
    ({"sigma_min": 1e-40, "sigma_schedule": "ve"}, "sigma_min"),  # a float32 denormal: 1/sigma overflows
    ({"sigma_max": 1e30, "sigma_schedule": "edm"}, "sigma_max"),
])
def test_settings_that_overflow_float32_are_rejected_at_construction(config, name):
    with pytest.raises(ValueError, match=name):
        kve_fast.KarrasVeScheduler(**config)


def test_extreme_but_finite_settings_sample_finite_images():
    scheduler = kve_fast.KarrasVeScheduler(sigma_min=1e-6, sigma_max=1e4)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = kve_fast.sample_karras_ve(GaussianScore(8), scheduler, (1, 3, 8, 8), 6,
                                        torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(out).all())


# --- the schedule is made when it is read ------------------------------------------------------------------


def test_a_pipeline_call_with_a_huge_step_count_builds_no_schedule():
    """pipe(num_inference_steps=10**7) used to build the whole schedule in set_timesteps after the call
    (a list of 10**7 tensors: bad_alloc in 6 GB); the scheduler now makes it when it is read."""
    pipe = kve_pipe(GaussianScore(8))

    def stop(p, i, t, kw):
        p._interrupt = True
        return {}

    tracemalloc.start()
    try:
        pipe(1, 10**7, torch.Generator().manual_seed(0), output_type="latent", callback_on_step_end=stop)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB"
    assert pipe.scheduler.num_inference_steps == 10**7
    pipe.scheduler.set_timesteps(5)
    ref = RefScheduler()
    ref.set_timesteps(5)
    assert_bitwise(pipe.scheduler.schedule, ref.schedule, "the schedule, read after set_timesteps")
    assert_bitwise(pipe.scheduler.timesteps, ref.timesteps, "the timesteps")


# --- subclasses, ours and diffusers' ----------------------------------------------------------------------------------

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

"""Trust: layouts, autograd, failures that leave nothing behind, typed callbacks, bounded plans and caches,
float32-safe settings and reported NaN/inf. Each test here failed on the code before these fixes."""

from __future__ import annotations

import threading
import time
import tracemalloc

import numpy as np
import pytest
import torch
from conftest import CAN_RUN_TRITON, GaussianScore, RefScheduler, assert_bitwise, kve_pipe, make_generator, reference_test_unet

import kve_fast
from kve_fast import noise as noise_module
from kve_fast import plan as plan_module
from kve_fast import sampler as sampler_module

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch"] + (["triton"] if CAN_RUN_TRITON else [])
SIGMAS = [20.0, 5.0, 1.0, 0.3, 0.0]


def _layouts(x: torch.Tensor) -> dict:
    """The same values in the layouts a user can hand in."""
    wide = torch.zeros(x.shape[0] * 2, *x.shape[1:], device=x.device)
    wide[::2] = x
    return {
        "contiguous": x.clone(),
        "channels_last": x.clone().to(memory_format=torch.channels_last),
        "permuted": x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),
        "sliced": wide[::2],
    }


# --- 1. every layout gives the torch backend's bits on every backend ----------------------------------------


@pytest.mark.parametrize("model_name", ["gaussian", "unet"])
def test_every_layout_gives_the_same_bits_on_every_backend(model_name):
    model = GaussianScore(8) if model_name == "gaussian" else reference_test_unet(8)
    model = model.to(DEVICE)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(DEVICE) * SIGMAS[0]
    expected = kve_fast.sample_karras_ve_sigmas(model, x, SIGMAS, s_churn=2.0, generator=torch.Generator().manual_seed(1),
                                    backend="torch")
    for name, xl in _layouts(x).items():
        assert torch.equal(xl, x)
        for backend in BACKENDS:
            got = kve_fast.sample_karras_ve_sigmas(model, xl, SIGMAS, s_churn=2.0, generator=torch.Generator().manual_seed(1),
                                       backend=backend)
            assert_bitwise(got, expected, f"{backend} backend, {name} input")
            assert got.is_contiguous()


def test_a_callback_may_return_any_layout():
    model = GaussianScore(8).to(DEVICE)
    pipe = kve_pipe(model)

    def to_channels_last(p, i, t, kw):
        return {"sample": kw["sample"].to(memory_format=torch.channels_last)}

    out = {b: pipe(2, 4, torch.Generator().manual_seed(3), output_type="latent", backend=b,
                   callback_on_step_end=to_channels_last).images for b in BACKENDS}
    plain = pipe(2, 4, torch.Generator().manual_seed(3), output_type="latent", backend="torch").images
    for b, latent in out.items():
        assert_bitwise(latent, plain, f"{b}: a channels_last sample from the callback")


# --- 2. no autograd tape -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_entry_point_records_an_autograd_tape(backend):
    unet = reference_test_unet(8).to(DEVICE)
    assert any(p.requires_grad for p in unet.parameters())
    x = (torch.randn(1, 3, 8, 8) * SIGMAS[0]).to(DEVICE).requires_grad_(True)
    out = kve_fast.sample_karras_ve_sigmas(unet, x, SIGMAS, backend=backend)
    assert not out.requires_grad and out.grad_fn is None
    out = kve_fast.sample_karras_ve(unet, kve_fast.KarrasVeScheduler(), (1, 3, 8, 8), 3, device=DEVICE, backend=backend)
    assert not out.requires_grad and out.grad_fn is None
    seen = []
    kve_fast.sample_karras_ve(unet, kve_fast.KarrasVeScheduler(), (1, 3, 8, 8), 3, device=DEVICE, backend=backend,
                              callback=lambda s: seen.append(s["sample"].requires_grad or s["denoised"].requires_grad))
    assert seen == [False, False, False]


# --- 3. a failed call leaves generators, RNGs, caches and threads as they were ----------------------------


class _Boom(Exception):
    pass


class _FailingModel(torch.nn.Module):
    """The Gaussian score, failing (``kind``) after ``after`` calls; it draws from the global RNG as dropout would."""

    def __init__(self, kind: str, after: int = 2):
        super().__init__()
        self.base, self.kind, self.after, self.calls = GaussianScore(8), kind, after, 0
        self.config = self.base.config

    def forward(self, x, sigma):
        self.calls += 1
        torch.rand(1)
        if self.calls > self.after:
            if self.kind == "raises":
                raise _Boom("model failed")
            if self.kind == "interrupt":
                raise KeyboardInterrupt
            if self.kind == "empty":
                return ()
            if self.kind == "wrong_shape":
                return x[:, :1]
        return self.base(x, sigma)


_failing_model = _FailingModel


def _callback(kind: str):
    def callback(p, i, t, kw):
        if i < 1:
            return {}
        if kind == "callback_raises":
            raise _Boom("callback failed")
        if kind == "callback_tensor":
            return kw["sample"]
        if kind == "callback_list":
            return [kw["sample"]]
        if kind == "callback_bad_sample":
            return {"sample": kw["sample"][:1]}
        if kind == "callback_interrupt":
            raise KeyboardInterrupt
        return {}

    return callback


FAILURES = [
    ("raises", _Boom), ("interrupt", KeyboardInterrupt), ("empty", ValueError), ("wrong_shape", ValueError),
    ("callback_raises", _Boom), ("callback_tensor", TypeError), ("callback_list", TypeError),
    ("callback_bad_sample", ValueError), ("callback_interrupt", KeyboardInterrupt),
]


def _rng_states(gen):
    gens = gen if isinstance(gen, list) else ([] if gen is None else [gen])
    return [g.get_state() for g in gens] + [torch.get_rng_state()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["single", "list", "global"])
@pytest.mark.parametrize("kind, error", FAILURES)
def test_a_failed_call_leaves_everything_as_it_was(kind, error, form, backend):
    model = _failing_model(kind) if not kind.startswith("callback") else _failing_model("fine")
    pipe = kve_pipe(model, s_churn=7.0)
    pipe.scheduler.set_timesteps(9)
    ok = kve_pipe(GaussianScore(8), s_churn=7.0)
    before_failure = ok(2, 5, make_generator(form, 5, 2), output_type="np", backend=backend).images
    gen = make_generator(form, 5, 2)
    before, cache = _rng_states(gen), plan_module.plan_cache_info()
    threads = set(threading.enumerate())
    callback = _callback(kind) if kind.startswith("callback") else None
    with pytest.raises(error):
        pipe(2, 5, gen, output_type="np", backend=backend, callback_on_step_end=callback)
    for a, b in zip(_rng_states(gen), before):
        assert torch.equal(a, b), "a generator or the global RNG moved"
    assert plan_module.plan_cache_info() == cache
    assert pipe.scheduler.num_inference_steps == 9
    assert set(threading.enumerate()) <= threads
    # and the next call is the same as the one made before the failure: nothing was corrupted (caches, plans)
    after = ok(2, 5, make_generator(form, 5, 2), output_type="np", backend=backend).images
    assert_bitwise(after, before_failure, "a call after the failure vs the same call before it")


@pytest.mark.parametrize("where", ["progress", "model"])
def test_the_noise_thread_never_outlives_a_failed_call(monkeypatch, where):
    # The prefetch thread runs on CUDA only; force it on the CPU to see that a failure stops it.
    real = noise_module.make_noise

    def prefetching(mode, shape, generator, device, steps):
        return noise_module.ReferenceNoise(shape, generator, device, steps, prefetch=True) if mode == "exact" \
            else real(mode, shape, generator, device, steps)

    monkeypatch.setattr(sampler_module, "make_noise", prefetching)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()

    def bad_progress(steps):
        raise MemoryError("no room for a progress bar")

    model = GaussianScore(8) if where == "progress" else _failing_model("raises", after=1)
    with pytest.raises((MemoryError, _Boom)):
        kve_fast.sample_karras_ve(model, kve_fast.KarrasVeScheduler(), (2, 3, 8, 8), 6, gen,
                                  progress=bad_progress if where == "progress" else False)
    assert not [t for t in threading.enumerate() if t.name == "kve_fast-noise"]
    assert torch.equal(gen.get_state(), state)


def test_a_float64_model_fails_before_any_draw():
    # (fp16 and bf16 models run, with float32 state: tests/test_precision.py)
    unet = reference_test_unet(8).double()
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    with pytest.raises(ValueError, match="float64"):
        kve_pipe(unet)(1, 3, gen, output_type="np")
    assert torch.equal(gen.get_state(), state)


@pytest.mark.skipif(not CAN_RUN_TRITON, reason="needs Triton")
def test_the_triton_size_limit_is_checked_before_any_draw():
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    with pytest.raises(ValueError, match="shape"):
        kve_fast.sample_karras_ve(GaussianScore(8), kve_fast.KarrasVeScheduler(), (2**16, 1, 2**8, 2**8), 3, gen,
                                  backend="triton", noise="fast")
    assert torch.equal(gen.get_state(), state)


# --- 4. typed callbacks, and nothing a callback gets can change a later call ------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_callback_that_mutates_what_it_gets_cannot_corrupt_later_calls(backend):
    model, scheduler = GaussianScore(8), kve_fast.KarrasVeScheduler(s_churn=10.0)
    run = lambda cb=None: kve_fast.sample_karras_ve(  # noqa: E731
        model, scheduler, (2, 3, 8, 8), 5, torch.Generator().manual_seed(0), backend=backend, callback=cb)
    before = run()

    def vandal(state):
        for key in ("sigma", "sigma_hat", "sigma_prev", "timestep"):
            if isinstance(state[key], torch.Tensor):
                state[key].mul_(100)

    run(vandal)
    assert_bitwise(run(), before, "a run after a callback scribbled on its tensors")


def test_callback_protocol_is_typed():
    pipe = kve_pipe(GaussianScore(8))
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(TypeError, match="callback_on_step_end"):
        pipe(1, 3, gen, callback_on_step_end=lambda p, i, t, k: k["sample"])
    with pytest.raises(TypeError, match="callback_on_step_end"):
        pipe(1, 3, gen, callback_on_step_end=lambda p, i, t, k: [k["sample"]])
    with pytest.raises(TypeError, match="callback_on_step_end_tensor_inputs"):
        pipe(1, 3, gen, callback_on_step_end=lambda p, i, t, k: None, callback_on_step_end_tensor_inputs="sample")
    seen = []
    pipe(1, 3, gen, callback_on_step_end=lambda p, i, t, k: seen.append(sorted(k)),
         callback_on_step_end_tensor_inputs=None)
    assert seen == [[], [], []]
    with pytest.raises(TypeError, match="callback"):
        kve_fast.sample_karras_ve(GaussianScore(8), kve_fast.KarrasVeScheduler(), (1, 3, 8, 8), 3,
                                  callback=lambda s: s["sample"])


# --- 5. nothing before step 1 grows with the step count; caches bounded in bytes and thread-safe ---------


def test_a_huge_step_count_starts_at_once(monkeypatch):
    calls = []
    real = plan_module.schedule_value

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(plan_module, "schedule_value", counting)
    seen = []
    tracemalloc.start()
    try:
        out = kve_fast.sample_karras_ve(GaussianScore(8), kve_fast.KarrasVeScheduler(), (1, 3, 8, 8), 10**9,
                                        callback=lambda s: seen.append(s["i"]) or {"stop": s["i"] >= 1})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen == [0, 1] and out.shape == (1, 3, 8, 8)
    # 2 for the scheduler's range check at construction, then sigma_i and sigma_{i+1} for each of the 2 steps
    assert len(calls) <= 6, f"{len(calls)} schedule values computed for 2 steps"
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB for a run stopped after 2 of 10**9 steps"


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


class _FirstModelCall(Exception):
    """Raised by a model: the run stops where its first step's model call would run."""


def _long_run(front: str, sigmas: torch.Tensor, model, callback=None, noise="exact"):
    """One call of ``front`` over ``sigmas`` with a near-free ``model`` (score or denoiser), torch backend, eager."""
    x = torch.ones(1, 3, 4, 4) * float(sigmas[0])
    if front == "k-diffusion":
        from kve_fast import k_diffusion as kd

        return kd.sample_heun(lambda x, s: model(x), x, sigmas, disable=True, s_churn=1.0, backend="torch",
                              callback=callback, noise=noise)
    return kve_fast.sample_karras_ve_sigmas(lambda x, s: model(x), x, sigmas, s_churn=1.0, backend="torch",
                                            cuda_graph=False, callback=callback, noise=noise)


def _first_call(x):
    raise _FirstModelCall


@pytest.mark.parametrize("noise", ["exact", "fast"])
@pytest.mark.parametrize("front", ["sigmas", "k-diffusion"])
def test_a_long_sigma_sequence_is_planned_in_bounded_memory_and_fast(front, noise):
    """10**6 user sigmas: at the first model call the run holds few Python objects and got there fast. The plans
    computed every step's floats up front (about 650 bytes a step: 0.65 GB and 9 s before step 1 here, 6.7 GB
    and 58 s for 10**7 sigmas). tracemalloc counts Python's allocations (the per-step floats, tuples, steps), not
    tensor storage: the sequence, its float32 copy and the checks' temporaries are O(n) tensors, which is
    allowed. Mutation: ``_Chunks`` making every row at once (CHUNK = n) -> 0.6 GB here; fast noise's keys made for
    every step at once (KEY_CHUNK = n: 8 bytes a step and sample, and their temporaries) -> 40 MB."""
    n = 10**6
    sigmas = torch.cat([torch.linspace(50.0, 0.01, n), torch.zeros(1)])
    with pytest.raises(_FirstModelCall):
        _long_run(front, torch.tensor([3.0, 2.0, 0.0]), _first_call)  # (what the first call imports)
    seen = {}

    def model(x):
        seen["peak"], seen["t"] = tracemalloc.get_traced_memory()[1], time.perf_counter()
        raise _FirstModelCall

    tracemalloc.start()
    try:
        start = time.perf_counter()
        with pytest.raises(_FirstModelCall):
            _long_run(front, sigmas, model, noise=noise)
    finally:
        tracemalloc.stop()
    assert seen["peak"] < 8 * 2**20, f"{seen['peak'] / 2**20:.1f} MiB of Python objects before step 1"
    assert seen["t"] - start < 5.0, f"{seen['t'] - start:.1f} s before step 1 (the plan took ~9 s for 10**6 steps)"


@pytest.mark.parametrize("front", ["sigmas", "k-diffusion"])
def test_the_plan_of_a_sigma_sequence_keeps_a_bounded_number_of_chunks(front, monkeypatch):
    """Across a run of 3,000 steps whose floats are made 64 steps at a time, what the run holds of Python
    objects does not grow from step 500 to step 2,900 (it shrank by a few KB here; mutation: every chunk kept,
    CHUNKS_KEPT = 10**9 -> 0.5 MB more in k-diffusion's convention, 1.2 MB in the reference's)."""
    monkeypatch.setattr(plan_module, "CHUNK", 64)
    sigmas = torch.cat([torch.linspace(50.0, 0.01, 3000), torch.zeros(1)])
    held = {}

    def callback(state):
        if state["i"] in (500, 2900):
            held[state["i"]] = tracemalloc.get_traced_memory()[0]

    tracemalloc.start()
    try:
        _long_run(front, sigmas, torch.neg, callback)
    finally:
        tracemalloc.stop()
    assert held[2900] - held[500] < 2**17, f"{(held[2900] - held[500]) / 2**20:.2f} MiB more at step 2,900"


def test_each_step_is_planned_once_on_the_fused_path(monkeypatch):
    made = []

    class CountingStep(plan_module.Step):
        __slots__ = ()

        def __init__(self, *args):
            made.append(args[0])
            super().__init__(*args)

        @classmethod
        def _of(cls, index, *args):  # (a step of a plan whose floats were computed for the whole sequence)
            made.append(index)
            return super()._of(index, *args)

    monkeypatch.setattr(plan_module, "Step", CountingStep)
    for backend in BACKENDS:
        made.clear()
        kve_fast.sample_karras_ve_sigmas(GaussianScore(8), torch.zeros(1, 3, 8, 8) + 20.0, SIGMAS, s_churn=2.0,
                                         backend=backend)
        assert made == [0, 1, 2, 3], f"{backend}: steps made {made}"


def test_step_memo_fits_its_byte_estimate():
    plan = plan_module.Plan(300, lambda k: torch.tensor(100.0 / (k + 1)), 10.0, 0.05, 50.0, memo=True)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for step in plan:
            pass
        used = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert used / 300 <= plan_module.STEP_BYTES, f"{used / 300:.0f} bytes per memoized step"


def test_the_plan_cache_stays_within_its_byte_bound(monkeypatch):
    monkeypatch.setattr(plan_module, "CACHE_BYTES", 2 * 2**20)
    plan_module.clear_plan_cache()
    stop_at_once = lambda s: {"stop": True}  # noqa: E731
    for n in range(300, 1300, 50):  # 20 plans of up to ~1.3 MB each, in a 2 MB cache
        kve_fast.sample_karras_ve(GaussianScore(4), kve_fast.KarrasVeScheduler(), (1, 3, 4, 4), n,
                                  callback=stop_at_once)
        info = plan_module.plan_cache_info()
        assert info["bytes"] <= info["max_bytes"] == 2 * 2**20
    assert info["plans"] >= 1
    plan_module.clear_plan_cache()
    assert plan_module.plan_cache_info()["plans"] == 0


def test_concurrent_calls_agree_with_sequential_ones():
    model = GaussianScore(8)
    jobs = [(n, seed) for n in (3, 4, 5, 6) for seed in (0, 1)]
    run = lambda n, seed: kve_fast.sample_karras_ve(  # noqa: E731
        model, kve_fast.KarrasVeScheduler(s_churn=5.0), (2, 3, 8, 8), n, torch.Generator().manual_seed(seed))
    plan_module.clear_plan_cache()
    results, errors = {}, []

    def worker(job):
        try:
            results[job] = run(*job)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(job,)) for job in jobs * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for job in jobs:
        assert_bitwise(results[job], run(*job), f"steps={job[0]} seed={job[1]}")
    assert plan_module.plan_cache_info()["plans"] == 4


# --- 6. settings whose float32 schedule is not finite and positive are rejected at construction -----------


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


def test_user_sigmas_that_overflow_float32_are_rejected():
    with pytest.raises(ValueError, match="sigmas"):
        kve_fast.sample_karras_ve_sigmas(GaussianScore(8), torch.zeros(1, 3, 8, 8), [1e30, 1.0, 0.0])
    with pytest.raises(ValueError, match="sigmas"):
        kve_fast.sample_karras_ve_sigmas(GaussianScore(8), torch.zeros(1, 3, 8, 8), [1.0, 1e-45, 0.0])


# --- 7. non-finite output is reported ----------------------------------------------------------------------


class _NanAfter(torch.nn.Module):
    def __init__(self, calls: int):
        super().__init__()
        self.base, self.calls, self.config = GaussianScore(8), calls, GaussianScore(8).config

    def forward(self, x, sigma):
        self.calls -= 1
        out = self.base(x, sigma).sample
        return out * float("nan") if self.calls < 0 else out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("output_type", ["np", "pil", "latent"])
def test_nan_output_is_reported(backend, output_type):
    pipe = kve_pipe(_NanAfter(3))
    with pytest.warns(RuntimeWarning, match="NaN"):
        pipe(1, 4, torch.Generator().manual_seed(0), output_type=output_type, backend=backend)


def test_finite_output_is_not_reported():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kve_pipe(GaussianScore(8))(1, 4, torch.Generator().manual_seed(0), output_type="np")


@pytest.mark.parametrize("front", ["sigmas", "k-diffusion"])
def test_fast_noise_keys_made_a_chunk_at_a_time_are_the_runs_keys(front, monkeypatch):
    """Fast noise makes its per-step keys KEY_CHUNK steps at a time: the same keys, so the same bits, as made at
    once (mutations: a chunk's first row taken as step 0's, or the chunk not renewed -> the bits move)."""
    sigmas = torch.cat([torch.linspace(8.0, 0.05, 7), torch.zeros(1)])

    def model(x):
        return x * 0.5

    torch.manual_seed(1)
    whole = _long_run(front, sigmas, model, noise="fast")
    monkeypatch.setattr(noise_module, "KEY_CHUNK", 2)
    torch.manual_seed(1)
    assert_bitwise(_long_run(front, sigmas, model, noise="fast"), whole, "keys made 2 steps at a time")
    src = noise_module.DeviceNoise((3, 1, 2, 2), torch.Generator().manual_seed(4), "cpu", 7)
    steps = [src.step().host for _ in range(7)]
    assert np.array_equal(np.stack(steps), src.keys[1:])
    word = noise_module._draw_word(torch.Generator().manual_seed(4))
    assert np.array_equal(src.keys, noise_module.sample_keys([word] * 3, [0, 1, 2], 7))

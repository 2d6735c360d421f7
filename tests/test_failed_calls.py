"""A call that fails leaves nothing behind: generators, the global RNG, the plan cache, the scheduler's step count
and threads as they were, and the next call gives the bits it gave before the failure, whatever failed (the model
raising, interrupted or returning the wrong thing, a callback raising or returning the wrong type, a progress bar);
what is refused is refused before any draw (a float64 model, a sample too large for the Triton kernels)."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import CAN_RUN_TRITON, GaussianScore, assert_bitwise, kve_pipe, make_generator, reference_test_unet

import kve_fast
from kve_fast import noise as noise_module
from kve_fast import plan as plan_module
from kve_fast import sampler as sampler_module

BACKENDS = ["torch"] + (["triton"] if CAN_RUN_TRITON else [])


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

"""The CUDA-graph runner on the CPU, with ``KVE_FAST_FAKE_GRAPHS=1`` (``kve_fast.fake_graph.FakeGraph``: it
records what a capture runs and reads and replays that record, failing where a real graph would read freed
memory or stale kernels), and real graphs where CUDA is available. Every per-step value must come from the
device feed, and every change to what a capture baked in must give a new capture: each graphed output
here is checked bit for bit against an eager run made with the same settings. Real capture and replay on
a GPU: bench/gpu_check.py and bench/graph_bench.py."""

from __future__ import annotations

import copy
import gc
import os
import threading
import time
import types
import warnings
import weakref

import numpy as np
import pytest
import torch
from conftest import (
    MODELS, GaussianScore, assert_bitwise, kve_pipe, make_generator, ncsnpp_unet, needs_triton, reference_test_unet,
)
from diffusers.utils import BaseOutput

import kve_fast
from kve_fast import _warn, graphs, ncsnpp
from kve_fast.fake_graph import CaptureRefused, FakeGraph, StaleCapture

pytestmark = needs_triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CHURN_AT_STEP_0 = {"sigma_max": 2.0, "sigma_min": 0.05, "s_churn": 10.0, "s_min": 0.01, "s_max": 1e4}


def _run(pipe, cuda_graph, **kw):
    kw.setdefault("output_type", "latent")
    steps = kw.pop("steps", 4)
    batch = kw.pop("batch", 2)
    return pipe(batch, steps, make_generator(kw.pop("form", "single"), kw.pop("seed", 0), batch), backend="triton",
                cuda_graph=cuda_graph, **kw).images


def _same_as_eager(pipe, what, **kw):
    """The graphed output equals the eager one made with the same settings now."""
    graphed = _run(pipe, True, **kw)
    eager = _run(pipe, False, **kw)
    assert_bitwise(graphed, eager, what)
    return graphed


class ScorePlus(torch.nn.Module):
    """The Gaussian score, its denoiser nudged by a small multiple of a module's output (as conftest's
    GaussianPlusUNet): every output bit depends on the module, and the samples stay in range."""

    def __init__(self, net: torch.nn.Module, scale: float = 0.05):
        super().__init__()
        self.net, self.scale = net, scale
        self.unet = hasattr(net, "config")  # a diffusers UNet: called with the noise level
        self.base = GaussianScore(8)
        self.config = self.base.config

    def forward(self, x, sigma):
        out = self.net(x, sigma).sample if self.unet else self.net(x)
        v = self.base.std**2 + torch.as_tensor(sigma, dtype=x.dtype, device=x.device) ** 2
        return BaseOutput(sample=self.base(x, sigma).sample + self.scale * out / v)


SMALL = {"sigma_min": 0.05, "sigma_max": 2.0, "s_churn": 10.0, "s_min": 0.1, "s_max": 1.0}


# --- the graphed path gives the eager bits --------------------------------------------------------------------


@pytest.mark.parametrize("noise", ["exact", "fast"])
@pytest.mark.parametrize("solver", ["heun", "euler"])
@pytest.mark.parametrize("output_type", ["latent", "np", "pil"])
def test_graphed_steps_give_the_eager_bits(fake_graphs, solver, output_type, noise):
    pipe = kve_pipe(GaussianScore(8).to(DEVICE), s_churn=20.0)
    eager = _run(pipe, False, solver=solver, output_type=output_type, noise=noise)
    graphed = _run(pipe, True, solver=solver, output_type=output_type, noise=noise)
    if output_type == "pil":
        eager, graphed = np.stack([np.asarray(i) for i in eager]), np.stack([np.asarray(i) for i in graphed])
    assert_bitwise(graphed, eager, f"graphed vs eager ({solver}, {output_type})")
    assert graphs.graph_info()["captures"] == 1


def test_one_capture_serves_every_step_count_and_later_calls(fake_graphs):
    unet = reference_test_unet(8).to(DEVICE)
    pipe = kve_pipe(unet)
    for steps, form in [(2, "single"), (5, "list"), (3, "global")]:
        eager = _run(pipe, False, steps=steps, form=form, seed=steps)
        assert_bitwise(_run(pipe, True, steps=steps, form=form, seed=steps), eager, f"{steps} steps, {form}")
    assert graphs.graph_info()["captures"] == 1


def test_callbacks_run_between_replays_and_may_replace_the_sample(fake_graphs):
    pipe = kve_pipe(GaussianScore(8).to(DEVICE))
    seen = {}

    def halve(p, i, t, kw):
        seen.setdefault(p._probe, []).append(kw["pred_original_sample"].clone())
        return {"sample": kw["sample"] * 0.5} if i == 1 else {}

    for noise in ("exact", "fast"):
        out = {}
        seen.clear()
        for mode in (False, True):
            pipe._probe = mode
            out[mode] = _run(pipe, mode, steps=4, callback_on_step_end=halve, noise=noise,
                             callback_on_step_end_tensor_inputs=["sample", "pred_original_sample"])
        assert_bitwise(out[True], out[False], f"graphed vs eager with a callback, {noise} noise")
        for a, b in zip(seen[True], seen[False]):
            assert_bitwise(a, b, "denoised handed to the callback")


# --- every value the first step reads comes from the call (mutation: the first churn's S_noise baked in) ---


@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_s_noise_may_change_between_graphed_calls(fake_graphs, solver):
    """Found by attack: on a cache hit the first step's churn ran with the first call's S_noise (every value
    differed wherever step 0 churns). Two pipelines sharing one UNet, with different schedulers."""
    model = GaussianScore(8).to(DEVICE)
    for s_noise in (1.0, 1.05, 0.9):
        pipe = kve_pipe(model, s_noise=s_noise, **CHURN_AT_STEP_0)
        _same_as_eager(pipe, f"S_noise {s_noise}", solver=solver)
    assert graphs.graph_info()["captures"] == 1, "S_noise is fed at every replay, not a new capture"


def test_sigmas_and_churn_may_change_between_graphed_calls(fake_graphs):
    model = GaussianScore(8).to(DEVICE)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    for sigmas, churn in (([3.0, 1.0, 0.2, 0.0], 0.5), ([5.0, 0.5, 0.0], 1.5), ([3.0, 1.0, 0.2, 0.0], 0.0)):
        run = lambda mode: kve_fast.sample_karras_ve_sigmas(  # noqa: E731
            model, x * sigmas[0], sigmas, s_churn=churn, s_noise=1.01, generator=torch.Generator().manual_seed(1),
            backend="triton", cuda_graph=mode)
        assert_bitwise(run(True), run(False), f"sigmas {sigmas}, churn {churn}")


# --- what a capture bakes in of the model: any change is a new capture (each failed on the old key) ------------


def test_a_model_converted_and_back_is_captured_anew(fake_graphs):
    """unet.half(); unet.float() puts new float32 storages in place: the old capture would read the freed ones
    (the fake graph raises StaleCapture where a GPU reads freed memory)."""
    unet = reference_test_unet(8).to(DEVICE)
    pipe = kve_pipe(ScorePlus(unet), **SMALL)
    _same_as_eager(pipe, "first")
    unet.half()
    unet.float()
    _same_as_eager(pipe, "after half() and float()")
    unet.to(memory_format=torch.channels_last)
    _same_as_eager(pipe, "after channels_last")
    assert graphs.graph_info()["captures"] == 1, "the stale captures are freed"


def test_weights_loaded_with_assign_are_captured_anew(fake_graphs):
    unet = reference_test_unet(8).to(DEVICE)
    pipe = kve_pipe(ScorePlus(unet, scale=0.2), **SMALL)
    first = _same_as_eager(pipe, "first")
    state = {k: v * 1.5 if v.is_floating_point() else v for k, v in unet.state_dict().items()}
    unet.load_state_dict(state, assign=True)
    second = _same_as_eager(pipe, "after load_state_dict(assign=True)")
    assert not torch.equal(first, second), "the new weights must change the sample"
    with torch.no_grad():  # in place: the same storages, read by the capture as they are now
        for p in unet.parameters():
            p.mul_(0.5)
    third = _same_as_eager(pipe, "after an in-place update")
    assert not torch.equal(third, second)


def test_hooks_and_forward_overrides_added_later_run(fake_graphs):
    unet = reference_test_unet(8).to(DEVICE)
    pipe = kve_pipe(ScorePlus(unet, scale=0.2), **SMALL)
    first = _same_as_eager(pipe, "no hook")
    handle = unet.conv_in.register_forward_hook(lambda m, i, o: o * 2)
    hooked = _same_as_eager(pipe, "a hook added after the capture")
    assert not torch.equal(first, hooked), "the hook must change the sample"
    handle.remove()
    assert_bitwise(_same_as_eager(pipe, "the hook removed"), first)
    original = unet.conv_out.forward
    unet.conv_out.forward = lambda x: original(x) * 0.5
    assert not torch.equal(_same_as_eager(pipe, "an instance forward"), first)


def test_train_and_eval_are_captured_apart(fake_graphs):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3)).to(DEVICE).eval()
    pipe = kve_pipe(ScorePlus(net, scale=0.2), **SMALL)
    evaluated = _same_as_eager(pipe, "eval")
    net.train()  # BatchNorm uses the batch's statistics: another computation, no random draws
    trained = _same_as_eager(pipe, "train")
    assert not torch.equal(evaluated, trained)


def test_a_model_that_draws_random_numbers_is_refused_before_it_draws(fake_graphs):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.Dropout(0.5)).to(DEVICE).train()
    pipe = kve_pipe(ScorePlus(net, scale=0.2), **SMALL)
    torch.manual_seed(4)
    with pytest.raises(ValueError, match="random numbers"):
        _run(pipe, True)
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(4).get_state()), "the refused capture drew"
    _warn.forget()
    with pytest.warns(RuntimeWarning, match="random numbers"):
        torch.manual_seed(4)
        auto = _run(pipe, "auto")
    torch.manual_seed(4)
    assert_bitwise(auto, _run(pipe, False), "eager fallback draws as eagerly")
    assert graphs.graph_info()["captures"] == 0


def test_ncsnpp_patches_undone_by_the_user_are_captured_anew(fake_graphs):
    """restore() after a capture frees the device FIR filters the capture reads; restore_fast switches the
    op: both must give a new capture (the fake graph raises on the freed filters)."""
    unet = ncsnpp_unet(8).to(DEVICE)
    pipe = kve_pipe(ScorePlus(unet, scale=0.01), **SMALL)
    ncsnpp.make_capturable(unet)
    first = _same_as_eager(pipe, "made capturable by the user", steps=2)
    assert ncsnpp.restore(unet) > 0
    assert_bitwise(_same_as_eager(pipe, "restored by the user", steps=2), first)
    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
        assert ncsnpp.make_fast(unet) > 0  # the user's own fast mode: every call runs the Triton FIR
        fast = _same_as_eager(pipe, "made fast by the user", steps=2, batch=1)
        assert ncsnpp.restore_fast(unet) > 0
        assert not torch.equal(_same_as_eager(pipe, "fast mode undone by the user", steps=2, batch=1), fast)


@pytest.fixture
def switches_back():
    b = torch.backends
    saved = (b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32, b.cudnn.benchmark)
    yield
    b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32, b.cudnn.benchmark = saved


def test_the_global_switches_are_part_of_the_key(fake_graphs, switches_back):
    """TF32 and cuDNN switches pick kernels; a graph keeps those it captured (the fake graph raises)."""
    pipe = kve_pipe(GaussianScore(8).to(DEVICE))
    _same_as_eager(pipe, "first")
    b = torch.backends
    for holder, name in ((b.cudnn, "allow_tf32"), (b.cuda.matmul, "allow_tf32"), (b.cudnn, "benchmark")):
        setattr(holder, name, not getattr(holder, name))
        _same_as_eager(pipe, f"{name} flipped")
    assert graphs.graph_info()["captures"] == 4


def test_cuda_without_an_index_is_resolved(monkeypatch):
    from kve_fast.spec import resolve_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert resolve_device(torch.device("cuda")) == torch.device("cuda", 3)
    assert resolve_device(torch.device("cuda:1")) == torch.device("cuda", 1)
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_the_key_is_every_setting_that_is_not_fed(fake_graphs):
    """A new RunSpec field is part of the key unless declared FED (mutation: leaving a field out of key())."""
    import dataclasses

    from kve_fast.spec import RunSpec

    fed = {f.name for f in dataclasses.fields(RunSpec) if f.metadata.get("fed")}
    assert fed == {"s_noise"}
    pipe = kve_pipe(GaussianScore(8).to(DEVICE))
    _run(pipe, True)
    (entry,) = graphs.graph_info()["entries"]
    assert set(entry) == {f.name for f in dataclasses.fields(RunSpec)} - fed | {"model", "switches", "graphs"}
    assert entry["backend"] == "triton" and entry["shape"] == (2, 3, 8, 8) and entry["noise"] == "exact"


# --- lifetime and threads ------------------------------------------------------------------------------------


def test_captures_are_bounded_and_freed(fake_graphs, monkeypatch):
    monkeypatch.setattr(graphs, "MAX_CAPTURES", 2)
    pipe = kve_pipe(GaussianScore(8).to(DEVICE))
    _run(pipe, True, batch=1, steps=2)
    (first,) = list(graphs._CACHE.values())
    assert first.graphs
    for batch in (2, 3):
        _run(pipe, True, batch=batch, steps=2)
    assert graphs.graph_info()["captures"] == 2
    assert not first.graphs, "an evicted capture's graphs (and pool) are freed"
    held = list(graphs._CACHE.values())
    pipe.to("cpu")
    assert graphs.graph_info()["captures"] == 0
    assert not any(c.graphs for c in held), "pipe.to() frees the captures"


def test_a_capture_does_not_keep_its_model_alive(fake_graphs):
    model = GaussianScore(8).to(DEVICE)
    _run(kve_pipe(model), True)
    assert graphs.graph_info()["captures"] == 1
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None, "the capture kept the model alive"
    assert graphs.graph_info()["captures"] == 0


def test_clear_graphs_during_a_call_is_not_undone(fake_graphs):
    pipe = kve_pipe(GaussianScore(8).to(DEVICE))

    def clear(p, i, t, kw):
        if i == 1:
            graphs.clear_graphs()
        return {}

    _run(pipe, True, callback_on_step_end=clear)
    assert graphs.graph_info()["captures"] == 0
    _run(pipe, True)
    assert graphs.graph_info()["captures"] == 1


def test_a_failed_run_caches_no_new_capture(fake_graphs):
    pipe = kve_pipe(GaussianScore(8).to(DEVICE))

    def boom(p, i, t, kw):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(pipe, True, callback_on_step_end=boom)
    assert graphs.graph_info()["captures"] == 0


class Gate(torch.nn.Module):
    """The Gaussian score, pausing its first call in a chosen thread until released."""

    def __init__(self):
        super().__init__()
        self.base = GaussianScore(8)
        self.config = self.base.config
        # (held one level below the module's attributes: the fingerprint compares a held object's own attributes,
        # and an Event's flag set by the test is not a change of the model)
        self.sync = types.SimpleNamespace(entered=threading.Event(), release=threading.Event(), thread=None)

    entered = property(lambda self: self.sync.entered)
    release = property(lambda self: self.sync.release)
    pause_in = property(lambda self: self.sync.thread, lambda self, thread: setattr(self.sync, "thread", thread))

    def forward(self, x, sigma):
        if threading.current_thread() is self.pause_in and not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(30)
        return self.base(x, sigma)


def _in_thread(fn):
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("out", fn()))
    t.start()
    return t, result


def test_a_busy_capture_makes_true_wait_and_auto_run_eagerly(fake_graphs):
    model = Gate().to(DEVICE)
    pipe = kve_pipe(model)
    noop = lambda p, i, t, kw: {}  # noqa: E731  (every call with a callback: one capture key)
    expected = _run(pipe, False, callback_on_step_end=noop)
    _run(pipe, True, callback_on_step_end=noop)  # captured

    def hold(p, i, t, kw):  # thread A holds the capture between replays
        if i == 0:
            model.entered.set()
            assert model.release.wait(30)
        return {}

    a, out_a = _in_thread(lambda: _run(pipe, True, callback_on_step_end=hold))
    assert model.entered.wait(30)
    _warn.forget()
    with pytest.warns(RuntimeWarning, match="in use by another thread"):
        auto = _run(pipe, "auto", callback_on_step_end=noop)  # runs eagerly now, same bits
    assert_bitwise(auto, expected, "auto while busy")
    started = time.monotonic()
    b, out_b = _in_thread(lambda: _run(pipe, True, callback_on_step_end=noop))
    b.join(0.5)
    assert b.is_alive(), "cuda_graph=True must wait for the busy capture, not run eagerly"
    model.release.set()
    a.join(30)
    b.join(30)
    assert_bitwise(out_b["out"], expected, "True after waiting")
    assert time.monotonic() - started >= 0.5
    assert graphs.graph_info()["captures"] == 1


def test_a_capture_does_not_roll_back_another_threads_draws(fake_graphs):
    """The old capture saved the global RNG and put it back afterwards: a draw another thread made in
    between was undone (its next draw repeated a value)."""
    model = Gate().to(DEVICE)
    pipe = kve_pipe(model)
    model.pause_in = None
    draws = []

    def other():
        assert model.entered.wait(30)
        draws.append(torch.randn(1))  # while the capture warms up in the main thread
        model.release.set()

    t = threading.Thread(target=other)
    t.start()
    model.pause_in = threading.current_thread()
    torch.manual_seed(0)
    _run(pipe, True)
    t.join(30)
    after = torch.randn(1)
    torch.manual_seed(0)
    torch.randn(1)
    assert torch.equal(after, torch.randn(1)), "the other thread's draw was rolled back"


def test_an_exact_and_a_fast_call_on_one_ncsnpp_unet_at_once(fake_graphs, monkeypatch):
    """Fast modes used to patch the caller's UNet for their whole call: an exact call in another thread ran
    the Triton FIR meanwhile. Each call now gives its own mode's bits (eager: graphs would serialize)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    unet = ncsnpp_unet(8).to(DEVICE)
    model = ScorePlus(unet, scale=0.01)
    pipe = kve_pipe(model)
    run = lambda noise: pipe(1, 2, torch.Generator().manual_seed(0), output_type="latent", solver="euler",  # noqa
                             backend="torch", noise=noise, cuda_graph=False).images
    alone = {"exact": run("exact"), "fast": run("fast")}
    entered, done = threading.Event(), threading.Event()

    def pause_fast_call(module, args):
        if threading.current_thread().name == "fast" and not entered.is_set():
            entered.set()  # inside the fast call (its FIR mode on), before its first forward
            assert done.wait(60)

    handle = unet.register_forward_pre_hook(pause_fast_call)
    try:
        out = {}
        fast = threading.Thread(target=lambda: out.setdefault("fast", run("fast")), name="fast")
        fast.start()
        assert entered.wait(60)
        out["exact"] = run("exact")
        done.set()
        fast.join(60)
    finally:
        handle.remove()
    assert not torch.equal(alone["exact"], alone["fast"]), "the two modes must differ for the test to mean anything"
    assert_bitwise(out["exact"], alone["exact"], "the exact call while a fast call was running")
    assert_bitwise(out["fast"], alone["fast"], "the fast call")
    assert not ncsnpp.is_fast(unet)


# --- fallbacks and argument checks ----------------------------------------------------------------------------


def test_a_model_that_cannot_be_captured_runs_eagerly_or_raises(fake_graphs):
    class HostSync(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base, self.config = GaussianScore(8), GaussianScore(8).config

        def forward(self, x, sigma):
            if float(x.mean()) > 1e9:  # a host sync: .item() on a device tensor breaks a capture
                x = x * 0
            return self.base(x, sigma)

    pipe = kve_pipe(HostSync().to(DEVICE))
    with pytest.raises(ValueError, match="cuda_graph"):
        _run(pipe, True)
    _warn.forget()
    with pytest.warns(RuntimeWarning, match="cannot be captured"):
        graphed = _run(pipe, "auto")
    assert_bitwise(graphed, _run(pipe, False))


def test_decisions_and_argument_checks(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(graphs.FAKE_ENV_VAR, raising=False)
    with pytest.raises(ValueError, match="cuda_graph"):
        graphs.decide("yes", cpu, "torch")
    with pytest.raises(ValueError, match="cuda_graph"):
        graphs.decide(True, cpu, "triton")  # not CUDA
    assert graphs.decide("auto", cpu, "triton") is False
    assert graphs.check_cuda_graph(None) == graphs.DEFAULT_MODE == "auto"  # on by default (confirmed on an H100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert graphs.decide("auto", cpu, "triton") is False  # on the CPU: no warning, nothing to gain
    monkeypatch.setenv(graphs.FAKE_ENV_VAR, "1")
    with pytest.raises(ValueError, match="triton"):
        graphs.decide(True, cpu, "torch")
    assert graphs.decide(True, cpu, "triton") is True
    monkeypatch.setenv(graphs.ENV_VAR, "0")
    assert graphs.decide("auto", cpu, "triton") is False
    assert graphs.decide(True, cpu, "triton") is False
    pipe = kve_pipe(GaussianScore(8))
    with pytest.raises(ValueError, match="cuda_graph"):
        pipe(1, 2, cuda_graph="sometimes")


# --- the stand-in fails like a graph ---------------------------------------------------------------------------


def test_the_fake_graph_replays_the_record_not_the_python():
    """A value read on the host at capture stays what it was (as in a real graph); a freed storage or a
    flipped switch raises; random draws and host syncs are refused."""
    buf, state = torch.zeros(4), {"scale": 2.0}
    weight = torch.ones(4)
    g = FakeGraph()
    g.capture(lambda: buf.copy_(weight * state["scale"]))
    state["scale"] = 3.0
    weight.fill_(5.0)  # in place: the graph reads the new values
    g.replay()
    assert torch.equal(buf, torch.full((4,), 10.0)), "the host value is the captured one, the storage the live one"
    del weight
    gc.collect()
    with pytest.raises(StaleCapture, match="freed"):
        g.replay()
    g2 = FakeGraph()
    x = torch.ones(4)
    g2.capture(lambda: buf.copy_(x + 1))
    flip = not torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = flip
    try:
        with pytest.raises(StaleCapture, match="allow_tf32"):
            g2.replay()
    finally:
        torch.backends.cudnn.allow_tf32 = not flip
    with pytest.raises(CaptureRefused, match="random"):
        FakeGraph().capture(lambda: torch.randn(4))
    with pytest.raises(CaptureRefused, match="host"):
        FakeGraph().capture(lambda: float(x.sum()))


def test_the_fake_graph_is_switched_on_by_its_environment_variable(monkeypatch):
    monkeypatch.setenv(graphs.FAKE_ENV_VAR, "1")
    graphs.clear_graphs()
    try:
        pipe = kve_pipe(copy.deepcopy(GaussianScore(8)))
        _run(pipe, None)  # the default mode, on the CPU
        assert graphs.graph_info()["captures"] == 1
        (cap,) = graphs._CACHE.values()
        assert all(isinstance(g, FakeGraph) for g in cap.graphs.values())
    finally:
        graphs.clear_graphs()


def test_a_capture_is_reused_after_its_warm_up_built_fir_filters(fake_graphs, monkeypatch):
    """A fast-mode (bf16 autocast) run of an NCSN++ UNet builds its device FIR filters for bf16 during the
    warm-up: the capture must still be reused by the next call (mutation: the model's state snapshot taken
    before the warm-up, which recaptured every call)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    unet = ncsnpp_unet(8).to(DEVICE)
    pipe = kve_pipe(ScorePlus(unet, scale=0.01), **SMALL)
    run = lambda: _run(pipe, True, steps=2, batch=1, solver="euler", unet_dtype=torch.bfloat16)  # noqa: E731
    first = run()
    assert not torch.isnan(first).any()
    (cap,) = graphs._CACHE.values()
    assert_bitwise(first, _run(pipe, False, steps=2, batch=1, solver="euler", unet_dtype=torch.bfloat16), "eager")
    assert_bitwise(run(), first, "the second graphed call")
    assert list(graphs._CACHE.values()) == [cap], "the second call recaptured"


# --- what a forward can read: attributes, classes, tensor metadata, global hooks -------------------------------


def test_an_attention_processor_swapped_after_a_capture_runs(fake_graphs):
    """diffusers' ``set_processor`` replaces a plain attribute, no tensor and no hook (mutation: the
    fingerprint's attribute check removed -> the old processor is replayed, most values differ)."""
    from diffusers.models.attention_processor import AttnProcessor

    unet = reference_test_unet(8).to(DEVICE)
    pipe = kve_pipe(ScorePlus(unet, scale=0.2), **SMALL)
    first = _same_as_eager(pipe, "the default processor")
    _set_processors(unet, AttnProcessor)
    swapped = _same_as_eager(pipe, "AttnProcessor set after the capture")
    assert not torch.equal(first, swapped), "the processors round differently: the swap must show"


def _set_processors(unet, kind) -> None:
    """Every attention module of ``unet`` given a new ``kind()`` processor (diffusers' ``set_processor``)."""
    attentions = [m for m in unet.modules() if hasattr(m, "set_processor")]
    assert attentions
    for m in attentions:
        m.set_processor(kind())


class Flagged(torch.nn.Module):
    """A module whose forward branches on a flag, calls an activation it holds, and reads a plain object."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)
        self.double, self.act = False, torch.nn.functional.silu
        self.settings = type("Settings", (), {})()
        self.settings.scale = 1.0

    def forward(self, x):
        y = self.act(self.conv(x)) * self.settings.scale
        return y * 2 if self.double else y


@pytest.mark.parametrize("change", ["flag", "activation", "object attribute", "class method"])
def test_plain_attributes_a_forward_reads_are_part_of_what_a_capture_baked_in(fake_graphs, change, monkeypatch):
    """Mutations: the fingerprint's module-attribute check removed (flag, activation), its second level removed
    (object attribute), its class check removed (class method): each replays the old choice."""
    net = Flagged().to(DEVICE)
    pipe = kve_pipe(ScorePlus(net, scale=0.2), **SMALL)
    first = _same_as_eager(pipe, "before")
    if change == "flag":
        net.double = True
    elif change == "activation":
        net.act = torch.nn.functional.gelu
    elif change == "object attribute":
        net.settings.scale = 3.0
    else:
        monkeypatch.setattr(Flagged, "forward", lambda self, x: self.conv(x) * 0.5)
    assert not torch.equal(_same_as_eager(pipe, f"{change} changed after the capture"), first)
    assert graphs.graph_info()["captures"] == 1, "the stale capture is freed"


def test_the_same_value_set_again_keeps_the_capture(fake_graphs):
    net = Flagged().to(DEVICE)
    pipe = kve_pipe(ScorePlus(net, scale=0.2), **SMALL)
    _run(pipe, True)
    (cap,) = graphs._CACHE.values()
    net.double = False
    net.settings.scale = float("1.0")
    _run(pipe, True)
    assert list(graphs._CACHE.values()) == [cap], "an equal value recaptured"


class Biased(torch.nn.Module):
    """The Gaussian score plus a small term read from ``bias``, a buffer that is a view into a larger storage."""

    def __init__(self):
        super().__init__()
        self.base, self.config = GaussianScore(8), GaussianScore(8).config
        store = torch.arange(1.0, 3 * 8 * 8 + 2)  # one value more than the view needs
        self.register_buffer("bias", store[1:].view(3, 8, 8))

    def forward(self, x, sigma):
        return BaseOutput(sample=self.base(x, sigma).sample + 1e-4 * self.bias.to(torch.float32))


@pytest.mark.parametrize("change", ["offset", "strides", "shape", "dtype"])
def test_a_buffer_changed_under_its_storage_is_captured_anew(fake_graphs, change):
    """The storage stays the same; only where and how a forward reads it changes (mutation: the fingerprint's
    data pointer / shape / strides / dtype comparison removed -> the capture replays the old view)."""
    model = Biased().to(DEVICE)
    pipe = kve_pipe(model, **SMALL)
    first = _same_as_eager(pipe, "before")
    bias = model.bias
    storage = bias.untyped_storage()
    with torch.no_grad():
        if change == "offset":
            bias.set_(storage, 0, bias.shape, bias.stride())
        elif change == "strides":
            bias.set_(storage, bias.storage_offset(), (3, 8, 8), (64, 1, 8))
        elif change == "shape":
            bias.set_(storage, bias.storage_offset(), (1, 8, 8), (64, 8, 1))
        else:
            model.bias = bias.view(torch.int32)  # the same bytes read as integers
    assert model.bias.untyped_storage().data_ptr() == storage.data_ptr()
    assert not torch.equal(_same_as_eager(pipe, f"{change} changed under the same storage"), first)


def test_a_global_module_hook_added_after_a_capture_runs(fake_graphs):
    """Mutation: the fingerprint's global-hook check removed -> the capture runs without the hook."""
    from torch.nn.modules.module import register_module_forward_hook

    unet = reference_test_unet(8).to(DEVICE)
    pipe = kve_pipe(ScorePlus(unet, scale=0.2), **SMALL)
    first = _same_as_eager(pipe, "no global hook")
    handle = register_module_forward_hook(lambda m, i, o: o * 1.5 if m is unet.conv_out else o)
    try:
        hooked = _same_as_eager(pipe, "a global hook")
    finally:
        handle.remove()
    assert not torch.equal(first, hooked)


def test_a_module_list_holding_none_is_captured(fake_graphs):
    """diffusers builds ``mid_block.attentions = ModuleList([None])`` with ``add_attention=False`` (the bundled
    digits model does): the fingerprint skips the None (827f2de crashed on it, outside the 'auto' fallback)."""
    from diffusers import UNet2DModel

    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                       add_attention=False, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).to(DEVICE).eval()
    assert any(m is None for m in unet.mid_block.attentions)
    pipe = kve_pipe(ScorePlus(unet, scale=0.2), **SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: it is captured
        _same_as_eager(pipe, "a ModuleList holding None")
    assert graphs.graph_info()["captures"] == 1


# --- what a callback may do: the graphed call gives the eager call's bits ---------------------------------------


def _both(pipe, callback, **kw):
    """(graphed, eager) outputs of the same call with ``callback_on_step_end``."""
    kw.setdefault("callback_on_step_end_tensor_inputs", ["sample", "pred_original_sample"])
    return (_run(pipe, True, callback_on_step_end=callback, **kw),
            _run(pipe, False, callback_on_step_end=callback, **kw))


@pytest.mark.parametrize("what", ["sample", "pred_original_sample"])
def test_a_callbacks_in_place_edit_counts_as_in_an_eager_call(fake_graphs, what):
    """The callback gets the live sample in an eager call (as in diffusers' newer pipelines): ``mul_`` on it
    changes the run; on the graph's copy it must too (mutation: the copy-back of edited tensors removed)."""
    pipe = kve_pipe(GaussianScore(8).to(DEVICE), **SMALL)

    def halve(p, i, t, kw):
        if i == 1:
            kw[what].mul_(0.5)
        return {}

    graphed, eager = _both(pipe, halve)
    assert_bitwise(graphed, eager, f"an in-place edit of {what}")
    untouched = _run(pipe, False, callback_on_step_end=lambda p, i, t, kw: {})
    assert torch.equal(untouched, eager) == (what == "pred_original_sample"), "only the sample is read on"


@pytest.mark.parametrize("change", ["hook", "parameter", "processor", "switch"])
def test_a_model_changed_inside_a_callback_runs_on_eagerly(fake_graphs, change, switches_back):
    """What the callback changes counts from the next model call on, graphed as eagerly; the stale capture is
    never replayed (a replaced parameter would be read freed) and the next call captures anew (mutation: the
    check after a callback removed -> the hook is missed, or StaleCapture)."""
    unet = reference_test_unet(8).to(DEVICE)
    pipe = kve_pipe(ScorePlus(unet, scale=0.2), **SMALL)
    handles = []

    def edit(p, i, t, kw):
        if i == 0:
            if change == "hook":
                handles.append(unet.conv_in.register_forward_hook(lambda m, inp, out: out * 2))
            elif change == "parameter":
                unet.conv_out.weight = torch.nn.Parameter(unet.conv_out.weight.detach() * 1.5)
            elif change == "processor":
                from diffusers.models.attention_processor import AttnProcessor

                _set_processors(unet, AttnProcessor)
            else:
                torch.backends.cudnn.benchmark = not torch.backends.cudnn.benchmark
        return {}

    from diffusers.models.attention_processor import AttnProcessor2_0

    saved = copy.deepcopy(unet.state_dict())
    out = {}
    for mode in (True, False):
        for h in handles:
            h.remove()
        handles.clear()
        unet.load_state_dict(saved, assign=True)
        _set_processors(unet, AttnProcessor2_0)
        _warn.forget()
        out[mode] = _run(pipe, mode, steps=3, callback_on_step_end=edit)
        if mode is True:
            assert graphs.graph_info()["captures"] == 0, "the stale capture was cached"
    assert_bitwise(out[True], out[False], f"{change} inside a callback")
    unchanged = _run(pipe, False, steps=3)
    if change != "switch":  # (cudnn.benchmark changes nothing on the CPU)
        assert not torch.equal(unchanged, out[False]), "the change must show"
    for h in handles:
        h.remove()


def test_a_callback_that_changes_nothing_keeps_the_graphs(fake_graphs):
    pipe = kve_pipe(GaussianScore(8).to(DEVICE), **SMALL)
    _run(pipe, True, callback_on_step_end=lambda p, i, t, kw: {})
    (cap,) = graphs._CACHE.values()
    _run(pipe, True, callback_on_step_end=lambda p, i, t, kw: {})
    assert list(graphs._CACHE.values()) == [cap]


# --- the README's main job and every model the tests know, graphed ---------------------------------------------


def test_the_main_job_runs_graphed_with_the_eager_bits(fake_graphs, tmp_path, monkeypatch):
    """``kve-fast sample`` with the bundled digits model (what the README's main job runs on a GPU, where
    'auto' picks Triton and graphs), and ``kve-fast generate``: graphed, the same PNG bytes as eagerly, and a
    capture really made (827f2de: a traceback, and 'auto' could not fall back)."""
    from kve_fast.cli import main

    monkeypatch.setattr(graphs, "MAX_CAPTURES", 4)
    made = []
    release = graphs.release
    monkeypatch.setattr(graphs, "release", lambda cap, completed: (made.append(completed), release(cap, completed)))
    common = ["--steps", "3", "--backend", "triton", "--quiet"]
    pngs = {}
    for mode in ("auto", "off"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning
            assert main(["sample", *common, "--batch-size", "2", "--cuda-graph", mode,
                         "--out", str(tmp_path / f"grid-{mode}.png")]) == 0
            assert main(["generate", *common, "--seeds", "0-2", "--batch", "2", "--cuda-graph", mode,
                         "--outdir", str(tmp_path / f"gen-{mode}")]) == 0
        pngs[mode] = [(tmp_path / f"grid-{mode}.png").read_bytes()] + [
            p.read_bytes() for p in sorted((tmp_path / f"gen-{mode}").glob("*.png"))]
    assert made and all(made), "the graphed runs captured and completed"
    assert len(pngs["auto"]) == 4 and pngs["auto"] == pngs["off"]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_the_tests_know_runs_graphed_with_the_eager_bits(fake_graphs, models, name):
    model = models(name).to(DEVICE)
    pipe = kve_pipe(model, **SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # captured, not a fallback
        _same_as_eager(pipe, f"{name} graphed", steps=2, batch=1)
    assert graphs.graph_info()["captures"] == 1


# --- a model compiled with torch.compile -------------------------------------------------------------------


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches emptied before and after (its compiles are cached per code object, and bounded)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class _Counting:
    """A ``torch.compile`` backend that counts compiles and runs of the compiled code, and records whether a
    compile happened during a capture or under a dispatch mode."""

    def __init__(self):
        self.compiles, self.runs, self.bad = 0, 0, []
        self.capturing = False

    def __call__(self, gm, inputs):
        from torch.utils._python_dispatch import _get_current_dispatch_mode

        self.compiles += 1
        if self.capturing or _get_current_dispatch_mode() is not None:
            self.bad.append("compiled inside a capture or a dispatch mode")

        def run(*args):
            self.runs += 1
            return gm.forward(*args)

        return run


def _compiled_models(backend):
    """A compiled module, a module compiled in place, a compiled instance forward, a compiled submodule."""
    a = torch.compile(Flagged(), backend=backend)
    b = Flagged()
    b.compile(backend=backend)
    c = Flagged()
    c.forward = torch.compile(c.forward, backend=backend)
    d = torch.nn.Sequential(torch.compile(Flagged(), backend=backend))
    return {"OptimizedModule": a, "compile()": b, "compiled forward": c, "compiled submodule": d}


@pytest.mark.parametrize("kind", ["OptimizedModule", "compile()", "compiled forward", "compiled submodule"])
def test_a_compiled_model_is_refused_by_the_cpu_stand_in_and_stays_compiled(fake_graphs, kind, fresh_dynamo):
    """The stand-in records operators through a dispatch mode, under which dynamo does not run compiled code
    and afterwards never does again for that frame: it must refuse before (mutation: the compiled check removed
    -> 'True' captures and the model silently runs uncompiled from then on)."""
    backend = _Counting()
    net = _compiled_models(backend)[kind]
    pipe = kve_pipe(ScorePlus(net, scale=0.2), **SMALL)
    with pytest.raises(ValueError, match="torch.compile"):
        _run(pipe, True)
    _warn.forget()
    with pytest.warns(RuntimeWarning, match="torch.compile"):
        auto = _run(pipe, "auto")
    assert_bitwise(auto, _run(pipe, False), "the eager fallback")
    runs = backend.runs
    net(torch.zeros(2, 3, 8, 8, device=DEVICE))
    assert backend.compiles >= 1 and backend.runs > runs, "the model no longer runs its compiled code"
    assert not backend.bad


class _FakeCuda:
    """Just enough of torch.cuda for ``graphs._capture``'s CUDA branch to run on the CPU: streams that do
    nothing, a graph context that marks the capture, the CUDA RNG state as a constant."""

    def __init__(self, monkeypatch, backend: _Counting):
        import contextlib

        cuda = torch.cuda
        nothing = contextlib.nullcontext
        stream = type("Stream", (), {"wait_stream": lambda self, other: None})
        monkeypatch.setattr(cuda, "Stream", lambda device=None: stream())
        monkeypatch.setattr(cuda, "current_stream", lambda device=None: stream())
        monkeypatch.setattr(cuda, "stream", lambda s: nothing())
        monkeypatch.setattr(cuda, "CUDAGraph", lambda: "graph")
        monkeypatch.setattr(cuda, "get_rng_state", lambda device=None: torch.zeros(1, dtype=torch.uint8))
        monkeypatch.setattr(cuda, "set_rng_state", lambda state, device=None: None)

        @contextlib.contextmanager
        def graph(g, pool=None, capture_error_mode=None):
            backend.capturing = True
            try:
                yield
            finally:
                backend.capturing = False

        monkeypatch.setattr(cuda, "graph", graph)


def test_on_cuda_a_compiled_model_compiles_before_the_capture_outside_any_dispatch_mode(monkeypatch, fresh_dynamo):
    """The CUDA branch of the capture, with torch.cuda's stream and graph calls stood in for: the first warm-up
    compiles, outside a dispatch mode (``fake_graph.watch`` would undo the compile for good), never inside the
    capture, and the compiled code is what the capture runs (mutation: the compiled model warmed up under
    ``watch``)."""
    monkeypatch.delenv(graphs.FAKE_ENV_VAR, raising=False)
    backend = _Counting()
    _FakeCuda(monkeypatch, backend)
    net = torch.compile(Flagged(), backend=backend)
    x = torch.ones(1, 3, 4, 4)
    with torch.no_grad():
        assert graphs._capture(lambda: net(x), torch.device("cuda"), None, compiled_model=True) == "graph"
    assert backend.compiles == 1 and backend.runs == 3 and not backend.bad


def test_on_cuda_a_compiled_model_that_draws_is_refused_with_the_rng_put_back(monkeypatch, fresh_dynamo):
    monkeypatch.delenv(graphs.FAKE_ENV_VAR, raising=False)
    backend = _Counting()
    _FakeCuda(monkeypatch, backend)
    noisy = torch.compile(lambda: torch.rand(3) * 2, backend=backend)
    torch.manual_seed(5)
    with pytest.raises(CaptureRefused, match="random numbers"):
        graphs._capture(noisy, torch.device("cuda"), None, compiled_model=True)
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(5).get_state())


def test_a_failure_to_fingerprint_the_model_falls_back_under_auto(fake_graphs, monkeypatch):
    """Whatever fails while the capture is set up (here the model's snapshot) is a reason 'auto' runs eagerly
    and True names (mutation: the checkout outside the fallback's try, as in 827f2de -> a traceback)."""
    pipe = kve_pipe(GaussianScore(8).to(DEVICE))
    eager = _run(pipe, False)

    def broken(model):
        raise AttributeError("a module tree the snapshot cannot read")

    monkeypatch.setattr(graphs, "ModelState", broken)
    with pytest.raises(ValueError, match="cannot read"):
        _run(pipe, True)
    _warn.forget()
    with pytest.warns(RuntimeWarning, match="cannot read"):
        assert_bitwise(_run(pipe, "auto"), eager, "the eager fallback")
    assert graphs.graph_info()["captures"] == 0

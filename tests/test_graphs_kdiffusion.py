"""The CUDA-graph runner in k-diffusion's convention (``kve_fast.k_diffusion``, ``cuda_graph=``), on the CPU
with ``KVE_FAST_FAKE_GRAPHS=1`` (``kve_fast.fake_graph.FakeGraph``, which replays what it recorded): every per-step value must come
from the capture's static buffers (scalars, the per-sample noise level, noise, ``extra_args``), so the
graphed output must be the eager output bit for bit, which tests/test_k_diffusion.py ties to the real
k-diffusion package. Real capture on a GPU: bench/kdiffusion_check.py."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import assert_bitwise, needs_triton, reference_test_unet

from kve_fast import _warn, graphs
from kve_fast import k_diffusion as kd

pytestmark = needs_triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CHURN = {"s_churn": 20.0, "s_tmin": 0.1, "s_tmax": 5.0, "s_noise": 1.003}  # gamma > 0 on some steps only


class Denoiser(torch.nn.Module):
    """A small denoiser: a UNet's output mixed with the input, with an optional conditioning tensor."""

    def __init__(self):
        super().__init__()
        self.unet = reference_test_unet(8)

    def forward(self, x, sigma, cond=None, scale=1.0):
        c = sigma.reshape(-1, 1, 1, 1)
        out = x / (1 + c**2) + 0.05 * scale * self.unet(x / (1 + c), sigma).sample
        return out if cond is None else out + 0.01 * cond


def _run(sampler, model, cuda_graph, seed=0, steps=6, layout="contiguous", **kw):
    sigmas = kd.get_sigmas_karras(steps, 0.02, 20.0, device=DEVICE)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed)).to(DEVICE) * sigmas[0]
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    torch.manual_seed(seed + 100)
    if DEVICE == "cuda":
        torch.cuda.manual_seed(seed + 100)
    out = sampler(model, x, sigmas, backend="triton", cuda_graph=cuda_graph, **kw)
    return out, torch.get_rng_state()


@pytest.mark.parametrize("sampler", [kd.sample_heun, kd.sample_euler])
@pytest.mark.parametrize("churn", [{}, CHURN])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_graphed_k_diffusion_gives_the_eager_bits(fake_graphs, sampler, churn, layout):
    model = Denoiser().to(DEVICE)
    eager, rng_eager = _run(sampler, model, False, layout=layout, **churn)
    graphed, rng_graphed = _run(sampler, model, True, layout=layout, **churn)
    assert_bitwise(graphed, eager, f"{sampler.__name__} graphed vs eager {churn} {layout}")
    assert torch.equal(rng_graphed, rng_eager), "the graphed run must consume the RNG exactly as the eager one"
    assert graphs.graph_info()["captures"] == 1


@pytest.mark.parametrize("sampler", [kd.sample_heun, kd.sample_euler])
def test_graphed_callbacks_see_what_eager_callbacks_see(fake_graphs, sampler):
    model = Denoiser().to(DEVICE)
    seen = {False: [], True: []}
    for cuda_graph in (False, True):
        def callback(d, out=seen[cuda_graph]):
            out.append((d["i"], d["x"].clone(), d["denoised"].clone(), d["sigma"].clone(), d["sigma_hat"].clone()))

        result = _run(sampler, model, cuda_graph, callback=callback, **CHURN)[0]
        seen[cuda_graph].append(result)
    assert len(seen[True]) == len(seen[False]) > 3
    for a, b in zip(seen[True][:-1], seen[False][:-1]):
        assert a[0] == b[0]
        for u, v, what in zip(a[1:], b[1:], ("x", "denoised", "sigma", "sigma_hat")):
            assert_bitwise(u, v, f"callback {what} at step {a[0]}")
    assert_bitwise(seen[True][-1], seen[False][-1], "result with a callback")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fast_noise_graphed_equals_eager(fake_graphs, layout):
    model = Denoiser().to(DEVICE).to(memory_format=torch.channels_last if layout == "channels_last" else
                                     torch.contiguous_format)
    assert_bitwise(_run(kd.sample_heun, model, True, noise="fast", layout=layout, **CHURN)[0],
                   _run(kd.sample_heun, model, False, noise="fast", layout=layout, **CHURN)[0], f"fast noise, {layout}")
    assert graphs.graph_info()["captures"] == 1


def test_extra_args_are_read_fresh_every_call(fake_graphs):
    model = Denoiser().to(DEVICE)
    for k in range(3):
        cond = torch.full((2, 3, 8, 8), float(k), device=DEVICE)
        extra = {"cond": cond, "scale": 0.5}
        assert_bitwise(_run(kd.sample_heun, model, True, extra_args=extra)[0],
                       _run(kd.sample_heun, model, False, extra_args=extra)[0], f"cond = {k}")
    assert graphs.graph_info()["captures"] == 1, "new tensors of the same shape reuse the capture"
    _run(kd.sample_heun, model, True, extra_args={"cond": cond, "scale": 2.0})
    assert graphs.graph_info()["captures"] == 2, "a new non-tensor value is a new capture"


def test_uncapturable_extra_args_run_eagerly(fake_graphs):
    model = Denoiser().to(DEVICE)
    bad = {"cond": [torch.zeros(2, 3, 8, 8, device=DEVICE)]}

    def listy(x, sigma, cond):
        return model(x, sigma, cond[0])

    with pytest.raises(ValueError, match="extra_args"):
        _run(kd.sample_heun, listy, True, extra_args=bad)
    _warn.forget(("extra_args",))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _run(kd.sample_heun, listy, "auto", extra_args=bad)[0]
    on_cuda = DEVICE == "cuda"
    assert any("extra_args" in str(w.message) for w in caught) or not on_cuda
    assert_bitwise(out, _run(kd.sample_heun, listy, False, extra_args=bad)[0], "eager fallback")
    assert graphs.graph_info()["captures"] == 0


def test_graphs_are_off_by_default_in_this_convention(fake_graphs):
    assert graphs.KDIFFUSION_DEFAULT_MODE is False  # until a GPU run confirms the graphed bits
    _run(kd.sample_heun, Denoiser().to(DEVICE), None)
    assert graphs.graph_info()["captures"] == 0
    with pytest.raises(ValueError, match="cuda_graph"):
        _run(kd.sample_heun, Denoiser().to(DEVICE), "sometimes")


def test_a_capture_is_never_shared_between_layouts(fake_graphs):
    """The graphs index their buffers linearly in x's layout: a channels_last call must not replay a
    contiguous call's capture (found by bench/kdiffusion_check.py; each layout gets its own)."""
    model = Denoiser().to(DEVICE)
    for layout in ("contiguous", "channels_last", "contiguous"):
        assert_bitwise(_run(kd.sample_heun, model, True, layout=layout, **CHURN)[0],
                       _run(kd.sample_heun, model, False, layout=layout, **CHURN)[0], f"{layout} after another layout")
    assert graphs.graph_info()["captures"] == 2


def test_a_failing_graphed_run_caches_nothing_and_moves_the_rng_as_eagerly(fake_graphs):
    model = Denoiser().to(DEVICE)

    def callback(d):
        if d["i"] == 3:  # after the capture, between replays
            raise RuntimeError("boom")

    sigmas = kd.get_sigmas_karras(6, 0.02, 20.0, device=DEVICE)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(DEVICE) * sigmas[0]
    states = []
    for mode in (False, True):
        torch.manual_seed(3)
        if DEVICE == "cuda":
            torch.cuda.manual_seed(3)
        with pytest.raises(RuntimeError, match="boom"):
            kd.sample_heun(model, x, sigmas, backend="triton", cuda_graph=mode, callback=callback, **CHURN)
        states.append(torch.cuda.get_rng_state() if DEVICE == "cuda" else torch.get_rng_state())
    assert torch.equal(states[1], states[0]), "the graphed run's draws are the eager run's (k-diffusion's)"
    assert graphs.graph_info()["captures"] == 0
    assert_bitwise(_run(kd.sample_heun, model, True)[0], _run(kd.sample_heun, model, False)[0], "after a failure")


def test_graph_info_names_each_key_field(fake_graphs):
    model = Denoiser().to(DEVICE)  # (held: a model's captures go when it is garbage-collected)
    _run(kd.sample_euler, model, True, layout="channels_last", noise="fast")
    (entry,) = graphs.graph_info()["entries"]
    assert entry["backend"] == "triton" and entry["shape"] == (2, 3, 8, 8) and entry["noise"] == "fast"
    assert entry["solver"] == "euler" and entry["hand_out"] is False and entry["strides"] == (192, 1, 24, 3)
    assert entry["convention"].name == "k-diffusion" and entry["extra"] == ()


@pytest.mark.parametrize("sampler", [kd.sample_heun, kd.sample_euler])
@pytest.mark.parametrize("edit", ["x", "denoised"])
def test_a_callbacks_in_place_edit_counts_graphed_as_eagerly(fake_graphs, sampler, edit):
    """k-diffusion's callback gets x_hat itself: ``d["x"].mul_`` moves the step (tests/test_k_diffusion_clients.py
    ties the eager run to k-diffusion); the graphed run hands out copies and must carry the edit over (mutation:
    the copy-back of edited tensors removed)."""

    def scale(d):
        if d["i"] in (1, 3):
            d[edit].mul_(0.9)

    graphed = _run(sampler, Denoiser().to(DEVICE), True, callback=scale, **CHURN)[0]
    model = Denoiser().to(DEVICE)
    eager = _run(sampler, model, False, callback=scale, **CHURN)[0]
    assert_bitwise(graphed, eager, f"{sampler.__name__}, an in-place edit of {edit}")
    untouched = _run(sampler, model, False, callback=lambda d: None, **CHURN)[0]
    assert torch.equal(untouched, eager) == (edit == "denoised")


def test_a_model_changed_inside_a_callback_runs_on_eagerly_from_that_step(fake_graphs):
    """The callback runs in the middle of k-diffusion's step (before line 8): a hook it adds counts from the
    Heun call of that very step, graphed as eagerly (mutation: the check after a callback removed)."""
    out = {}
    for mode in (True, False):
        model = Denoiser().to(DEVICE)

        def hook(d, model=model):
            if d["i"] == 2:
                model.unet.conv_in.register_forward_hook(lambda m, i, o: o * 2)

        _warn.forget()
        out[mode] = _run(kd.sample_heun, model, mode, callback=hook, **CHURN)[0]
    assert_bitwise(out[True], out[False], "a hook added inside the callback")
    assert graphs.graph_info()["captures"] == 0
    assert not torch.equal(out[False], _run(kd.sample_heun, Denoiser().to(DEVICE), False, **CHURN)[0])


@pytest.mark.parametrize("edit", ["sigmas", "sigma_hat", "last to 0"])
def test_a_callback_editing_the_sigmas_runs_on_eagerly_with_the_eager_bits(fake_graphs, edit):
    """k-diffusion reads its sigmas as it goes (tests/test_k_diffusion_clients.py ties the eager run to it): the
    graphs' feed was planned from the old ones, so the call goes on eagerly from the edit (mutation: the plan not
    read again after a callback -> the graphed run replays the old dt)."""
    def change(d, sigmas):
        if edit == "sigmas" and d["i"] == 1:
            sigmas[2:].mul_(0.5)
        elif edit == "sigma_hat" and d["i"] == 2:
            d["sigma_hat"].mul_(1.1)
        elif edit == "last to 0" and d["i"] == len(sigmas) - 2:
            sigmas[-1].zero_()

    out = {}
    for mode in (True, False):
        sigmas = kd.get_sigmas_karras(6, 0.02, 20.0, device=DEVICE)[:-1]  # ends at a nonzero sigma
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(DEVICE) * sigmas[0]
        torch.manual_seed(7)
        _warn.forget()
        out[mode] = kd.sample_heun(Denoiser().to(DEVICE), x, sigmas, backend="triton", cuda_graph=mode,
                                   callback=lambda d, sigmas=sigmas: change(d, sigmas), **CHURN)
    assert_bitwise(out[True], out[False], f"graphed vs eager, {edit} edited by the callback")
    assert graphs.graph_info()["captures"] == 0, "the stale capture was cached"

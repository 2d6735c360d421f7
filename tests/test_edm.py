"""``kve_fast.edm.edm_sampler`` against our reading of NVlabs' EDM ``edm_sampler`` (kve_fast/edm_reading.py), bit for bit
(``torch.equal``, dtype included), with the generators' states after the call; eagerly on the torch ops and the
Triton kernels (tests/test_graphs_edm.py: graphed). Each test names the mutation of the code it catches (applied,
seen to fail, reverted)."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import assert_bitwise, needs_triton
from edm_cases import SEEDS, Boom, Logged, RaisesAt, informative, names, same_states
from kve_fast.edm_reading import edm_sampler_reading

import kve_fast.edm
from kve_fast.edm_testing import RecordingNet, SeedGenerators, narrow_edm_net, script_inputs, tiny_edm2_net, tiny_edm_net

GRID = torch.linspace(0.002, 100, 2000, dtype=torch.float64)  # a round_sigma that moves every level
IMAGENET = dict(S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)  # EDM's ImageNet-64 settings
CASES = {
    # 3 channels, class labels, round_sigma on a grid, EDM's ImageNet churn (gamma at its cap)
    "labels-grid": (lambda: tiny_edm_net(3, 6, label_dim=4, grid=GRID), dict(num_steps=5, **IMAGENET)),
    # 1 channel, a net narrower than the call (20 .. 0.05), gamma = 1/5 below its cap, steps outside [S_min, S_max]
    "narrow": (lambda: narrow_edm_net(1, 6), dict(num_steps=5, S_churn=1, S_min=0.1, S_max=10, S_noise=1.003)),
    # 4 channels, the net float16 inside (EDM's use_fp16, here on the CPU too), EDM's defaults but for N
    "fp16": (lambda: tiny_edm_net(4, 6, use_fp16=True, fp16_devices=("cpu", "cuda")), dict(num_steps=4)),
}
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]


def _both(net, kwargs, backend, layout=None):
    """(our sample, the reading's) from the script's inputs, and whether the generators end in the same state."""
    theirs, latents, labels = script_inputs(net, SEEDS)
    ours, _, _ = script_inputs(net, SEEDS)  # (the same draws: the generators in the same state)
    if layout is not None:
        latents = latents.contiguous(memory_format=layout)
    got = kve_fast.edm.edm_sampler(net, latents, labels, ours.randn_like, backend=backend, **kwargs)
    expected = edm_sampler_reading(net, latents, labels, theirs.randn_like, **kwargs)
    return got, expected, same_states(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_the_sample_and_the_generators_are_edms(case, backend):
    """The float64 sample and every per-seed generator as EDM leaves them. Mutations caught: ``round_sigma`` dropped
    from the levels or from t_hat (labels-grid); gamma = min(S_churn, sqrt(2) - 1), not divided by N (narrow); the
    state in float32 (every case: the dtype); line 6 and its draw skipped where gamma is 0 (narrow: the generators)."""
    make, kwargs = CASES[case]
    got, expected, generators = _both(make(), kwargs, backend)
    assert_bitwise(got, expected, f"{case} on {backend}")
    assert got.dtype == torch.float64
    assert generators, "the generators' states"
    informative(expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_randn_like_on_the_global_rng_with_channels_last_latents(backend):
    """EDM's default ``randn_like=torch.randn_like`` draws from the global RNG in the strides of the tensor it is given:
    the drop-in hands it one in the state's layout, which is the latents' (channels_last here). Mutation caught: the
    state (and so the tensor randn_like gets) contiguous whatever the latents' layout (``layout =
    torch.empty(x.shape, dtype=dtype)`` in ``kve_fast.edm.make_run``)."""
    net = tiny_edm_net(3, 6)
    latents = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    latents = latents.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(7)
    expected = edm_sampler_reading(net, latents, num_steps=4, **IMAGENET)
    state = torch.get_rng_state()
    torch.manual_seed(7)
    got = kve_fast.edm.edm_sampler(net, latents, num_steps=4, backend=backend, **IMAGENET)
    assert_bitwise(got, expected, "torch.randn_like on channels_last latents")
    assert torch.equal(torch.get_rng_state(), state), "the global RNG as EDM leaves it"


def test_the_net_is_called_as_edm_calls_it_and_the_draws_come_where_edms_do():
    """``net(x, t, class_labels)``: the float64 sample, a 0-d float64 t, the labels object itself, positionally; the
    sequence of net calls and draws (each draw of a float64 tensor shaped like the state) as EDM's. Mutations
    caught: the labels passed by keyword; the net handed a float32 sample."""
    net = tiny_edm_net(3, 6, label_dim=4)
    runs = {}
    for who in ("ours", "theirs"):
        log = []
        rnd, latents, labels = script_inputs(net, SEEDS)
        recording = RecordingNet(net, "net", log)
        if who == "ours":
            kve_fast.edm.edm_sampler(recording, latents, labels, Logged(log, rnd), num_steps=4, backend="torch")
        else:
            edm_sampler_reading(recording, latents, labels, Logged(log, rnd), num_steps=4)
        runs[who] = log, labels
    (ours, labels), (theirs, _) = runs["ours"], runs["theirs"]
    assert names(ours) == names(theirs) == ["randn_like", "net", "net"] * 3 + ["randn_like", "net"]
    for a, b in zip(ours, theirs):
        if a["name"] == "net":
            assert len(a["args"]) == 1 and a["args"][0] is labels and a["kwargs"] == {}
            assert a["x"].dtype == torch.float64 and a["sigma"].dtype == torch.float64 and a["sigma"].dim() == 0
            assert_bitwise(a["x"], b["x"], "the net's input")
            assert_bitwise(a["sigma"], b["sigma"], "the net's sigma")
        else:
            assert a == b


def _rng_states(rnd) -> list:
    return [torch.get_rng_state()] if rnd is None else rnd.get_state()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("at", [1, 4])
@pytest.mark.parametrize("rng", ["per-seed", "global"])
def test_a_net_that_raises_leaves_the_generators_where_edm_does(rng, at, backend):
    """The drop-in rule: the generators (the script's per-seed ones, or the global RNG of ``torch.randn_like``) keep
    the draws made before the net raised (EDM draws before its first call, and before each step's), not rewound.
    Mutation caught: ``restore_rng=True`` in ``kve_fast.edm.make_run`` (the global RNG put back, kve_fast's own rule
    for its own fronts: the global case)."""
    net = tiny_edm_net(3, 6)
    states = []
    for sampler in (kve_fast.edm.edm_sampler, edm_sampler_reading):
        rnd, latents, _ = script_inputs(net, SEEDS)
        rnd = None if rng == "global" else rnd
        kwargs = {"backend": backend} if sampler is kve_fast.edm.edm_sampler else {}
        torch.manual_seed(5)
        with pytest.raises(Boom):
            sampler(RaisesAt(net, at), latents, None, torch.randn_like if rnd is None else rnd.randn_like,
                    num_steps=4, **kwargs)
        states.append(_rng_states(rnd))
    assert all(torch.equal(a, b) for a, b in zip(*states))
    fresh, _, _ = script_inputs(net, SEEDS)
    torch.manual_seed(5)
    before = _rng_states(None if rng == "global" else fresh)
    assert not all(torch.equal(a, b) for a, b in zip(states[0], before)), "draws were made"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_randn_like_returning_the_wrong_tensor_is_caught_at_its_first_draw(backend):
    """A ``randn_like`` that returns float32 for the float64 state (EDM's arithmetic would promote it silently), or
    another shape: a TypeError / ValueError naming it at the first draw. Mutation caught: ``CallerNoise.step``
    returning what it drew unchecked."""
    net = tiny_edm_net(3, 6)
    latents = torch.randn(2, 3, 6, 6)
    for wrong, error in ((lambda x: torch.randn(x.shape), TypeError), (lambda x: torch.randn_like(x)[:1], ValueError)):
        with pytest.raises(error, match="`randn_like`"):
            kve_fast.edm.edm_sampler(net, latents, randn_like=wrong, num_steps=3, backend=backend)


def test_bad_arguments_are_refused_before_any_work():
    """Each bad argument is a TypeError or ValueError naming it, before the net is called or a generator draws.
    Mutation caught: ``num_steps`` checked against 1 (N = 1 divides by N - 1 = 0: NaN in EDM)."""
    log = []
    net = RecordingNet(tiny_edm_net(3, 6, label_dim=4), "net", log)
    rnd, latents, labels = script_inputs(net, SEEDS)
    before = rnd.get_state()
    edm2_net = tiny_edm2_net(3, 6)
    bad = [
        (TypeError, "`net`", dict(net=edm2_net)),  # EDM2's nets have no round_sigma
        (TypeError, "`latents`", dict(latents=latents.to(torch.int64))),
        (ValueError, "`latents`", dict(latents=latents[:0])),
        (ValueError, "`class_labels`", dict(class_labels=labels[:1])),
        (TypeError, "`class_labels`", dict(class_labels=labels.tolist())),
        (TypeError, "`randn_like`", dict(randn_like=None)),
        (ValueError, "`num_steps`", dict(num_steps=1)),
        (TypeError, "`num_steps`", dict(num_steps=18.0)),
        (ValueError, "`sigma_min`", dict(sigma_min=0)),
        (ValueError, "`sigma_max`", dict(sigma_max=float("inf"))),
        (ValueError, "`rho`", dict(rho=-1)),
        (ValueError, "`S_churn`", dict(S_churn=-1)),
        (ValueError, "`S_min`", dict(S_min=2, S_max=1)),
        (ValueError, "`S_noise`", dict(S_noise=float("nan"))),
        (ValueError, "`backend`", dict(backend="cuda")),
        (ValueError, "`backend`", dict(backend="fast")),
        (ValueError, "`cuda_graph`", dict(cuda_graph="yes")),
        (TypeError, "`progress`", dict(progress="bar")),
    ]
    for error, name, change in bad:
        args = {"net": net, "latents": latents, "class_labels": labels, "randn_like": rnd.randn_like, **change}
        with pytest.raises(error, match=re.escape(name)):
            kve_fast.edm.edm_sampler(**args)
    assert log == [], "the net was called"
    assert all(torch.equal(a, b) for a, b in zip(before, rnd.get_state())), "a generator drew"


def test_a_call_range_outside_the_nets_is_refused():
    """EDM clamps its range to the net's; where they do not meet, the clamped range is empty: refused."""
    with pytest.raises(ValueError, match="`sigma_min`"):
        kve_fast.edm.edm_sampler(narrow_edm_net(1, 6), torch.randn(1, 1, 6, 6), sigma_min=30, sigma_max=80)


def test_inference_only():
    """No autograd tape, whatever the net's parameters say (EDM's pickled nets need none; kve_fast's entry points
    never record one). Mutation caught: ``@torch.no_grad()`` removed from ``edm_sampler``."""
    net = tiny_edm_net(3, 6).requires_grad_(True)
    out = kve_fast.edm.edm_sampler(net, torch.randn(1, 3, 6, 6), num_steps=3, backend="torch")
    assert not out.requires_grad and out.grad_fn is None

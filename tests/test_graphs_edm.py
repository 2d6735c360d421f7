"""``kve_fast.edm`` and ``kve_fast.edm2`` graphed (``cuda_graph=True``), on the CPU with ``KVE_FAST_FAKE_GRAPHS=1``
(``kve_fast.fake_graph.FakeGraph``, which replays what it recorded and fails where a real graph would): every value
that changes per step or per call must come through the capture's feed (the step's scalars, the noise drawn from the
caller's ``randn_like`` between two replays, the labels), so the graphed sample must be our reading of the original
(kve_fast/edm_reading.py) bit for bit, with the generators where the original leaves them. The input layouts (eager and
graphed) are here too. Each test names the mutation of the code it catches (applied, seen to fail, reverted)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_bitwise, needs_triton
from edm_cases import SEEDS, Boom, RaisesAt, informative, same_states
from kve_fast.edm_reading import edm2_sampler_reading, edm_sampler_reading

import kve_fast.edm
import kve_fast.edm2
from kve_fast import graphs
from kve_fast.edm_testing import RecordingNet, narrow_edm_net, script_inputs, tiny_edm2_net, tiny_edm_net

pytestmark = needs_triton
IMAGENET = dict(S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)  # EDM's ImageNet-64 settings
GRID = torch.linspace(0.002, 100, 2000, dtype=torch.float64)
EDM_CASES = {
    "labels-grid": (lambda: tiny_edm_net(3, 6, label_dim=4, grid=GRID), dict(num_steps=5, **IMAGENET)),
    "narrow": (lambda: narrow_edm_net(1, 6), dict(num_steps=4, S_churn=1, S_min=0.1, S_max=10, S_noise=1.003)),
}


def _randn(rng: str, rnd):
    return torch.randn_like if rng == "global" else rnd.randn_like


def _states(rng: str, rnd) -> list:
    return [torch.get_rng_state()] if rng == "global" else rnd.get_state()


def _edm_pair(net, kwargs, rng: str, cuda_graph, latents_of=lambda x: x):
    """(our sample, the reading's, the generators in the same state) from the script's inputs."""
    theirs, latents, labels = script_inputs(net, SEEDS)
    ours, _, _ = script_inputs(net, SEEDS)
    latents = latents_of(latents)
    torch.manual_seed(11)
    got = kve_fast.edm.edm_sampler(net, latents, labels, _randn(rng, ours), backend="triton", cuda_graph=cuda_graph,
                                   **kwargs)
    after = _states(rng, ours)
    torch.manual_seed(11)
    expected = edm_sampler_reading(net, latents, labels, _randn(rng, theirs), **kwargs)
    same = all(torch.equal(a, b) for a, b in zip(after, _states(rng, theirs)))
    return got, expected, same


@pytest.mark.parametrize("rng", ["per-seed", "global"])
@pytest.mark.parametrize("case", list(EDM_CASES))
def test_graphed_edm_is_edm(fake_graphs, case, rng):
    """One capture replayed every step gives EDM's float64 sample and leaves the generators (the script's or the
    global RNG) where EDM does. Mutation caught: the graph engine drawing at its churn segments as for the other
    conventions as well as at ``HostDraw`` (``not self.schedule.host_draws and`` dropped in ``GraphEngine._replay``:
    two draws a step)."""
    make, kwargs = EDM_CASES[case]
    got, expected, same = _edm_pair(make(), kwargs, rng, True)
    assert_bitwise(got, expected, f"{case} graphed, {rng}")
    assert got.dtype == torch.float64
    assert same, "the generators' states"
    informative(expected)
    assert graphs.graph_info()["captures"] == 1


def test_a_second_graphed_call_replays_with_its_own_labels_and_noise(fake_graphs):
    """The capture is reused by a call with other seeds and labels: the labels are copied into the capture's static
    buffer and the noise drawn anew. Mutation caught: the labels of the capturing call baked in (``set_extra``
    skipped in ``GraphEngine.__init__``)."""
    net = tiny_edm_net(3, 6, label_dim=4)
    for seeds in (SEEDS, [5, 6]):
        theirs, latents, labels = script_inputs(net, seeds)
        ours, _, _ = script_inputs(net, seeds)
        got = kve_fast.edm.edm_sampler(net, latents, labels, ours.randn_like, num_steps=4, backend="triton",
                                       cuda_graph=True, **IMAGENET)
        expected = edm_sampler_reading(net, latents, labels, theirs.randn_like, num_steps=4, **IMAGENET)
        assert_bitwise(got, expected, f"seeds {seeds}")
        assert same_states(ours, theirs)
    assert graphs.graph_info()["captures"] == 1


def _edm2_pair(net, gnet, guidance, cuda_graph, **kwargs):
    theirs, noise, labels = script_inputs(net, SEEDS)
    ours, _, _ = script_inputs(net, SEEDS)
    got = kve_fast.edm2.edm_sampler(net=net, noise=noise, labels=labels, gnet=gnet, guidance=guidance,
                                    randn_like=ours.randn_like, backend="triton", cuda_graph=cuda_graph, **kwargs)
    expected = edm2_sampler_reading(net=net, noise=noise, labels=labels, gnet=gnet, guidance=guidance,
                                    randn_like=theirs.randn_like, **kwargs)
    return got, expected, same_states(ours, theirs)


@pytest.mark.parametrize("churn", [{}, IMAGENET], ids=["no-churn", "churn"])
@pytest.mark.parametrize("guidance", [1, 2.5])
def test_graphed_edm2_is_edm2(fake_graphs, guidance, churn):
    """4 channels, labels, the net float16 inside; with a guiding net both forwards and the lerp are captured.
    Mutation caught: the graph runner not splitting at ``HostDraw`` (``_host`` true for ``HandOut`` only: the draw
    stage captured, the noise of the capturing call replayed)."""
    net = tiny_edm2_net(4, 6, 3, fp16_devices=("cpu", "cuda"))
    gnet = net if guidance == 1 else tiny_edm2_net(4, 6, 3, seed=1)
    got, expected, same = _edm2_pair(net, gnet, guidance, True, num_steps=5, **churn)
    assert_bitwise(got, expected, f"guidance {guidance} graphed")
    assert got.dtype == torch.float32
    assert same
    informative(expected)
    assert graphs.graph_info()["captures"] == 1


def test_graphed_guidance_1_never_calls_the_guiding_net(fake_graphs):
    """EDM2's script hands its sampler a ``gnet`` also at guidance 1; the capture must not run it either. Mutation
    caught: ``Nets((net, gnet))`` whenever a gnet is given (in ``kve_fast.edm2``)."""
    log = []
    net = tiny_edm2_net(4, 6, 3)
    gnet = RecordingNet(tiny_edm2_net(4, 6, 3, seed=1), "gnet", log)
    got, expected, _ = _edm2_pair(net, gnet, 1, True, num_steps=4)
    assert_bitwise(got, expected, "guidance 1 graphed")
    assert log == []


def test_the_guiding_nets_state_is_part_of_the_capture(fake_graphs):
    """A capture bakes in both nets: replacing a parameter of the guiding net between two calls must not replay the
    old one (``ModelState`` covers every net of a ``Nets``). Mutation caught: ``fingerprint._modules`` walking the
    first net only (the second call then replays a capture whose guiding-net weight was freed: stale)."""
    net, gnet = tiny_edm2_net(4, 6, 3), tiny_edm2_net(4, 6, 3, seed=1)
    _edm2_pair(net, gnet, 2.0, True, num_steps=4)
    inner = gnet.model
    inner.conv_out = torch.nn.Parameter(inner.conv_out.detach() * 0.5, requires_grad=False)
    got, expected, _ = _edm2_pair(net, gnet, 2.0, True, num_steps=4)
    assert_bitwise(got, expected, "after the guiding net changed")
    assert graphs.graph_info()["captures"] == 1, "the stale capture is replaced, not kept beside"


def test_graphed_edm_is_inference_only(fake_graphs):
    net = tiny_edm_net(3, 6).requires_grad_(True)
    out = kve_fast.edm.edm_sampler(net, torch.randn(1, 3, 6, 6), num_steps=3, backend="triton", cuda_graph=True)
    assert not out.requires_grad and out.grad_fn is None
    out = kve_fast.edm2.edm_sampler(tiny_edm2_net(4, 6).requires_grad_(True), torch.randn(1, 4, 6, 6), num_steps=3,
                                    backend="triton", cuda_graph=True)
    assert not out.requires_grad and out.grad_fn is None


def _sliced(x: torch.Tensor) -> torch.Tensor:
    """``x``'s values in a tensor that skips every other column of a wider one (not dense)."""
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
    wide[..., ::2] = x
    return wide[..., ::2]


LAYOUTS = {
    "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
    "permuted": lambda x: x.transpose(2, 3).contiguous().transpose(2, 3),
    "sliced": _sliced,
}


@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "graphed"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_any_latents_layout_gives_edms_bits(fake_graphs, layout, cuda_graph):
    """Latents in any layout: the same bits as EDM with ``torch.randn_like`` on the global RNG (which draws in the
    strides of the tensor it gets: ours is the original's state's layout). Mutation caught: the state contiguous
    whatever the latents (``layout = torch.empty(x.shape, dtype=dtype)`` in ``kve_fast.edm.make_run``)."""
    net = tiny_edm_net(3, 6)
    got, expected, same = _edm_pair(net, dict(num_steps=4, **IMAGENET), "global", cuda_graph, LAYOUTS[layout])
    assert_bitwise(got, expected, f"{layout} latents")
    assert same
    assert got.stride() == expected.stride(), "the sample in the original's layout"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_any_noise_layout_gives_edm2s_bits(layout):
    """EDM2 likewise (eager, Triton; the script's per-seed generators), guided and churning."""
    net, gnet = tiny_edm2_net(4, 6, 3), tiny_edm2_net(4, 6, 3, seed=1)
    theirs, noise, labels = script_inputs(net, SEEDS)
    ours, _, _ = script_inputs(net, SEEDS)
    noise = LAYOUTS[layout](noise)
    kwargs = dict(num_steps=4, guidance=2.0, **IMAGENET)
    got = kve_fast.edm2.edm_sampler(net, noise, labels, gnet, randn_like=ours.randn_like, backend="triton", **kwargs)
    expected = edm2_sampler_reading(net, noise, labels, gnet, randn_like=theirs.randn_like, **kwargs)
    assert_bitwise(got, expected, f"{layout} noise")
    assert same_states(ours, theirs)


@pytest.mark.filterwarnings("ignore:kve_fast. this model cannot be captured")
def test_a_net_that_fails_in_the_capture(fake_graphs):
    """docs/edm.md's promise: ``cuda_graph="auto"`` runs the call eagerly, so the net's own error comes after the
    draw EDM makes before its first call (the generators where EDM leaves them); ``cuda_graph=True`` is a ValueError
    before any draw. Mutation caught: ``sampler._graphed`` not catching the net's RuntimeError (no eager run: "auto"
    leaves the generators untouched)."""
    net = RaisesAt(tiny_edm_net(3, 6), None)
    for mode, error in (("auto", RuntimeError), (True, ValueError)):
        ours, latents, _ = script_inputs(net, SEEDS)
        theirs, _, _ = script_inputs(net, SEEDS)
        with pytest.raises(error, match="the net fails"):
            kve_fast.edm.edm_sampler(net, latents, None, ours.randn_like, num_steps=3, backend="triton",
                                     cuda_graph=mode)
        with pytest.raises(Boom):
            edm_sampler_reading(net, latents, None, theirs.randn_like, num_steps=3)
        fresh, _, _ = script_inputs(net, SEEDS)
        assert same_states(ours, theirs if mode == "auto" else fresh), mode

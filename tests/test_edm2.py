"""``kve_fast.edm2.edm_sampler`` against our reading of NVlabs' EDM2 ``edm_sampler`` (kve_fast/edm_reading.py), bit for
bit (``torch.equal``, dtype included), with the generators' states after the call; eagerly on the torch ops and the
Triton kernels (tests/test_graphs_edm.py: graphed). Each test names the mutation of the code it catches (applied,
seen to fail, reverted)."""

from __future__ import annotations

import importlib
import re

import pytest
import torch
from conftest import assert_bitwise, needs_triton
from edm_cases import SEEDS, Logged, informative, names, same_states
from kve_fast.edm_reading import edm2_sampler_reading

import kve_fast.edm2
from kve_fast.edm_testing import RecordingNet, script_inputs, tiny_edm2_net, tiny_edm_net

CHURN = dict(S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)  # churning the middle steps only
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]


def _nets(channels: int = 4, label_dim: int = 3):
    return tiny_edm2_net(channels, 6, label_dim), tiny_edm2_net(channels, 6, label_dim, seed=1)


def _both(net, gnet, backend, **kwargs):
    """(our sample, the reading's, the generators in the same state) from the script's inputs, passed by keyword as
    EDM2's ``generate_images`` passes them."""
    theirs, noise, labels = script_inputs(net, SEEDS)
    ours, _, _ = script_inputs(net, SEEDS)
    got = kve_fast.edm2.edm_sampler(net=net, noise=noise, labels=labels, gnet=gnet, randn_like=ours.randn_like,
                                    backend=backend, **kwargs)
    expected = edm2_sampler_reading(net=net, noise=noise, labels=labels, gnet=gnet, randn_like=theirs.randn_like,
                                    **kwargs)
    return got, expected, same_states(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("churn", [{}, CHURN], ids=["no-churn", "churn"])
@pytest.mark.parametrize("guidance", [1, 2.5, 0.3])
def test_the_sample_and_the_generators_are_edm2s(guidance, churn, backend):
    """4 channels (EDM2's latents), class labels, float32 state, the net float16 inside on the CPU too; guidance 1
    (the guiding net is EDM2's script's: the net itself), and 2.5 and 0.3 (``torch.lerp``'s two branches). Mutations
    caught: the lerp's direction (``torch.lerp(out, ref, w)``); EDM2 drawing where it does not churn
    (``every_step=True`` in ``kve_fast.edm2``: the generators)."""
    net = tiny_edm2_net(4, 6, 3, fp16_devices=("cpu", "cuda"))
    gnet = net if guidance == 1 else tiny_edm2_net(4, 6, 3, seed=1)
    got, expected, generators = _both(net, gnet, backend, num_steps=5, guidance=guidance, **churn)
    assert_bitwise(got, expected, f"guidance {guidance}, {backend}")
    assert got.dtype == torch.float32
    assert generators, "the generators' states"
    informative(expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes(dtype):
    """EDM2's ``dtype``: the levels, the state and the draws in it (float16: the torch ops, which ``"auto"`` picks;
    Triton keeps float32 or float64 states and refuses float16 by name). 3 channels, no labels. Mutation caught: the
    levels made in float32 whatever ``dtype`` (``levels(..., torch.float32, ...)`` in ``kve_fast.edm2``)."""
    net, gnet = _nets(3, 0)
    got, expected, generators = _both(net, gnet, "auto", num_steps=4, guidance=1.5, dtype=dtype, **CHURN)
    assert_bitwise(got, expected, f"{dtype}")
    assert generators
    informative(expected.float())


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_refuses_a_half_precision_state(dtype):
    with pytest.raises(ValueError, match="`backend`='triton'"):
        kve_fast.edm2.edm_sampler(tiny_edm2_net(4, 6), torch.randn(1, 4, 6, 6), dtype=dtype, backend="triton")


def _logged_run(sampler, net, gnet, guidance, **kwargs):
    log = []
    rnd, noise, labels = script_inputs(net, SEEDS)
    a, b = RecordingNet(net, "net", log), RecordingNet(gnet, "gnet", log)
    sampler(net=a, noise=noise, labels=labels, gnet=b, randn_like=Logged(log, rnd), guidance=guidance, **kwargs)
    return log, labels


@pytest.mark.parametrize("guidance", [1, 2.0])
def test_the_nets_are_called_as_edm2_calls_them(guidance):
    """``net(x, t, labels)`` then, unless guidance is 1, ``gnet`` with the very same x and t objects and the labels,
    positionally; with guidance 1 the guiding net is never called (EDM2's script passes one anyway); draws only where
    it churns, interleaved as EDM2's. Mutations caught: the guiding net called at guidance 1 (``Nets((net, gnet))``
    whenever a gnet is given, in ``kve_fast.edm2``); the guiding net called before the net."""
    net, gnet = _nets()
    ours, labels = _logged_run(kve_fast.edm2.edm_sampler, net, gnet, guidance, num_steps=4, backend="torch", **CHURN)
    theirs, _ = _logged_run(edm2_sampler_reading, net, gnet, guidance, num_steps=4, **CHURN)
    assert names(ours) == names(theirs)
    assert ("gnet" in names(ours)) == (guidance != 1)
    assert 0 < names(ours).count("randn_like") < 4, "draws where it churns only"
    for k, (a, b) in enumerate(zip(ours, theirs)):
        if a["name"] == "randn_like":
            assert a == b
            continue
        assert len(a["args"]) == 1 and a["args"][0] is labels and a["kwargs"] == {}
        assert_bitwise(a["x"], b["x"], f"call {k}: x")
        assert_bitwise(a["sigma"], b["sigma"], f"call {k}: sigma")
        if a["name"] == "gnet":
            assert ours[k - 1]["name"] == "net"
            assert a["x_id"] == ours[k - 1]["x_id"] and a["sigma_id"] == ours[k - 1]["sigma_id"]


def test_no_churn_draws_nothing():
    """EDM2's default S_churn = 0: not one draw (the global RNG untouched). Mutation caught: EDM2 planned with
    ``every_step=True`` (EDM's rule: a draw every step)."""
    net, noise = tiny_edm2_net(4, 6), torch.randn(2, 4, 6, 6)
    torch.manual_seed(3)
    state = torch.get_rng_state()
    kve_fast.edm2.edm_sampler(net, noise, num_steps=4, backend="torch")
    assert torch.equal(torch.get_rng_state(), state)


def _call_func_by_name(func_name, **kwargs):
    """EDM2's ``dnnlib.util.call_func_by_name`` as its ``generate_images`` uses it (docs/edm-reading.md): a callable,
    or a dotted name imported, called with keyword arguments only."""
    if isinstance(func_name, str):
        module, _, name = func_name.rpartition(".")
        func_name = getattr(importlib.import_module(module), name)
    return func_name(**kwargs)


@pytest.mark.parametrize("sampler_fn", [kve_fast.edm2.edm_sampler, "kve_fast.edm2.edm_sampler"])
def test_usable_as_generate_images_sampler_fn(sampler_fn):
    """``generate_images(..., sampler_fn=...)``: every argument by keyword, ``gnet`` the net itself at guidance 1 (no
    guiding net loaded), the script's per-seed ``randn_like``; also as the dotted name."""
    net = tiny_edm2_net(4, 6, 3)
    rnd, noise, labels = script_inputs(net, SEEDS)
    ours, _, _ = script_inputs(net, SEEDS)
    sampler_kwargs = dict(num_steps=4, guidance=1, S_churn=1, S_max=10)  # what its command line and presets set
    got = _call_func_by_name(sampler_fn, net=net, noise=noise, labels=labels, gnet=net, randn_like=ours.randn_like,
                             **sampler_kwargs)
    expected = edm2_sampler_reading(net, noise, labels, net, randn_like=rnd.randn_like, **sampler_kwargs)
    assert_bitwise(got, expected, "through call_func_by_name")
    assert same_states(ours, rnd)


def test_bad_arguments_are_refused_before_any_work():
    """Each bad argument is a TypeError or ValueError naming it, before a net is called or a generator draws (EDM2
    itself calls the net once before it finds ``gnet`` missing). Mutation caught: ``_check_guidance`` accepting a
    missing ``gnet`` (the TypeError then comes from the loop, after the net's first call)."""
    log = []
    net, gnet = RecordingNet(_nets()[0], "net", log), RecordingNet(_nets()[1], "gnet", log)
    rnd, noise, labels = script_inputs(net, SEEDS)
    before = rnd.get_state()
    bad = [
        (TypeError, "`net`", dict(net="net")),
        (TypeError, "`gnet`", dict(gnet=None, guidance=2)),
        (ValueError, "`guidance`", dict(guidance=float("nan"))),
        (TypeError, "`noise`", dict(noise=noise.numpy())),
        (ValueError, "`labels`", dict(labels=labels[:, :2])),
        (TypeError, "`dtype`", dict(dtype=torch.int32)),
        (TypeError, "`dtype`", dict(dtype="float32")),
        (ValueError, "`num_steps`", dict(num_steps=1)),
        (ValueError, "`sigma_min`", dict(sigma_min=90)),
        (ValueError, "`S_churn`", dict(S_churn=-0.5)),
        (ValueError, "`S_noise`", dict(S_noise=-1)),
        (ValueError, "`backend`", dict(backend="cuda")),
    ]
    for error, name, change in bad:
        args = {"net": net, "noise": noise, "labels": labels, "gnet": gnet, "randn_like": rnd.randn_like,
                "guidance": 1.5, **change}
        with pytest.raises(error, match=re.escape(name)):
            kve_fast.edm2.edm_sampler(**args)
    assert log == [], "a net was called"
    assert all(torch.equal(a, b) for a, b in zip(before, rnd.get_state())), "a generator drew"


def test_an_edm_net_runs_too():
    """EDM2's sampler reads nothing of the net but its call: an EDM-interface net (whose ``round_sigma`` and range EDM2
    ignores) gives the reading's sample."""
    net = tiny_edm_net(1, 6, sigma_min=1.0, sigma_max=10.0)
    got, expected, _ = _both(net, None, "torch", num_steps=4)
    assert_bitwise(got, expected, "an EDM net in EDM2's sampler")


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_randn_like_on_the_global_rng_with_channels_last_noise(backend):
    """EDM2's default ``randn_like=torch.randn_like``, churning: the global RNG draws in the strides of the tensor it
    gets, which is the state's, the noise's layout (channels_last here); the RNG ends where EDM2 leaves it. Mutation
    caught (Triton; the torch ops hand ``randn_like`` the state itself): the state contiguous whatever the noise's
    layout (``layout = torch.empty(x.shape, dtype=dtype)`` in ``kve_fast.edm.make_run``)."""
    net, gnet = _nets(4, 0)
    noise = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    noise = noise.contiguous(memory_format=torch.channels_last)
    kwargs = dict(num_steps=4, guidance=1.7, **CHURN)
    torch.manual_seed(4)
    expected = edm2_sampler_reading(net, noise, None, gnet, **kwargs)
    state = torch.get_rng_state()
    torch.manual_seed(4)
    got = kve_fast.edm2.edm_sampler(net, noise, None, gnet, backend=backend, **kwargs)
    assert_bitwise(got, expected, "torch.randn_like on channels_last noise")
    assert torch.equal(torch.get_rng_state(), state)

"""kve_fast.edm_testing: the EDM-interface stand-in nets and the scripts' per-seed generators behave as
docs/edm-reading.md says EDM's and EDM2's do; each test names the mutation it catches."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_bitwise

from kve_fast.edm_testing import (
    NARROW_RANGE, EDMNet, RecordingNet, SeedGenerators, TinyInner, cifar_standin, narrow_edm_net, script_inputs,
    tiny_edm2_net, tiny_edm_net,
)
from kve_fast.testing import ncsnpp_unet


def test_seed_generators_draw_each_sample_from_its_own_seed():
    """Sample b is ``torch.randn(size[1:])`` of a generator seeded with seeds[b] alone, whatever the batch around
    it. Mutation: one generator for the batch (or the batch drawn at once)."""
    rnd = SeedGenerators("cpu", [5, 9])
    got = rnd.randn([2, 3, 4, 4])
    expected = torch.stack([torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(s)) for s in (5, 9)])
    assert_bitwise(got, expected, "per-seed draws")
    assert_bitwise(SeedGenerators("cpu", [9]).randn([1, 3, 4, 4])[0], got[1], "seed 9 alone")
    ints = SeedGenerators("cpu", [5, 9]).randint(10, size=[2])
    assert ints.tolist() == [int(torch.randint(10, (), generator=torch.Generator().manual_seed(s))) for s in (5, 9)]


def test_seed_generators_randn_like_keeps_dtype_not_strides():
    """``randn_like(x)``: x's shape, dtype, layout and device; a contiguous result (the samples are stacked), unlike
    ``torch.randn_like``. Mutation: the dtype not passed on (float32 draws for a float64 state)."""
    x = torch.zeros(2, 3, 4, 4, dtype=torch.float64).to(memory_format=torch.channels_last)
    eps = SeedGenerators("cpu", [1, 2]).randn_like(x)
    assert eps.dtype == torch.float64 and eps.shape == x.shape and eps.is_contiguous()
    assert_bitwise(eps, SeedGenerators("cpu", [1, 2]).randn([2, 3, 4, 4], dtype=torch.float64), "randn_like")
    with pytest.raises(ValueError, match="size"):
        SeedGenerators("cpu", [1, 2]).randn([3, 4])


def test_script_inputs_draw_latents_then_labels():
    """Both scripts draw the float32 latents first, then one class per seed from the same generators. Mutation:
    the labels drawn first (the latents would come from other generator states)."""
    net = tiny_edm_net(1, 4, label_dim=5)
    rnd, latents, labels = script_inputs(net, [4, 8])
    mine = SeedGenerators("cpu", [4, 8])
    assert_bitwise(latents, mine.randn([2, 1, 4, 4]), "latents")
    assert_bitwise(labels, torch.eye(5)[mine.randint(5, size=[2])], "one-hot labels")
    assert all(torch.equal(a, b) for a, b in zip(rnd.get_state(), mine.get_state()))
    fixed = script_inputs(net, [4, 8], class_idx=2)[2]
    assert fixed.tolist() == [[0, 0, 1, 0, 0]] * 2
    assert script_inputs(tiny_edm_net(), [4])[2] is None


def _inner_dtypes(net) -> list:
    seen = []
    net.model.register_forward_hook(lambda module, args, out: seen.append((args[0].dtype, out.dtype)))
    return seen


def test_use_fp16_runs_the_inner_model_in_float16_where_edm_would():
    """EDM's rule: float16 inside with ``use_fp16``, not ``force_fp32``, on a device it allows (CUDA in EDM;
    ``fp16_devices`` adds the CPU); D is float32 always. Mutations: use_fp16, force_fp32 or the device ignored."""
    x, sigma = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    cases = [(dict(use_fp16=True, fp16_devices=("cpu",)), {}, torch.float16),
             (dict(use_fp16=True, fp16_devices=("cpu",)), {"force_fp32": True}, torch.float32),
             (dict(use_fp16=True), {}, torch.float32),  # EDM's default: float16 on CUDA only
             (dict(use_fp16=False, fp16_devices=("cpu",)), {}, torch.float32)]
    for settings, call, inside in cases:
        net = tiny_edm_net(**settings)
        seen = _inner_dtypes(net)
        assert net(x, sigma, None, **call).dtype == torch.float32
        assert seen == [(inside, inside)], (settings, call)
    half = tiny_edm2_net(3, fp16_devices=("cpu",))  # EDM2's Precond: use_fp16 on by default
    seen = _inner_dtypes(half)
    assert half(x, sigma).dtype == torch.float32 and seen == [(torch.float16, torch.float16)]


class _Ones(torch.nn.Module):
    """An inner model returning ones, recording what it is called with."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        self.calls.append((x, noise_labels))
        return torch.ones_like(x)


@pytest.mark.parametrize("sigma", [0.01, 0.5, 30.0])
def test_preconditioning_is_karras_table_1(sigma):
    """D = c_skip x + c_out F(c_in x, c_noise), with c_skip = s_d^2 / (sigma^2 + s_d^2), c_out = sigma s_d /
    sqrt(sigma^2 + s_d^2), c_in = 1 / sqrt(sigma^2 + s_d^2), c_noise = ln(sigma) / 4, s_d = 0.5. Compared with
    those formulas in float64: the net computes in float32, so to float32's rounding (rel 1e-6). Mutations: any
    weight changed or two swapped."""
    inner = _Ones()
    net = EDMNet(inner, 4, 2)
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    out = net(x, torch.tensor(sigma))
    total = sigma**2 + 0.25
    expected = 0.25 / total * x.double() + sigma * 0.5 / math.sqrt(total)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    x_in, c_noise = inner.calls[0]
    torch.testing.assert_close(x_in.double(), x.double() / math.sqrt(total), rtol=1e-6, atol=0)
    assert c_noise.shape == (1,) and float(c_noise) == pytest.approx(math.log(sigma) / 4, rel=1e-6, abs=1e-7)


def test_class_labels_reach_the_inner_model():
    """Labels change D; None with ``label_dim`` is all-zero labels, as EDM's preconditioner makes them. Mutation:
    the labels not passed on."""
    net = tiny_edm_net(label_dim=4)
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor(1.5)
    one_hot = torch.eye(4)[[1, 3]]
    assert not torch.equal(net(x, sigma, one_hot), net(x, sigma, torch.eye(4)[[0, 2]]))
    assert_bitwise(net(x, sigma, None), net(x, sigma, torch.zeros(2, 4)), "no labels")


def test_round_sigma():
    """``EDMNet.round_sigma`` is the identity (a tensor); ``GridEDMNet``'s the nearest grid level, in sigma's dtype
    and shape. Mutation: the grid's dtype returned (float64 for a float32 sigma)."""
    sigma = torch.tensor(0.3, dtype=torch.float64)
    assert torch.equal(tiny_edm_net().round_sigma(sigma), sigma)
    assert isinstance(tiny_edm_net().round_sigma(0.3), torch.Tensor)
    grid = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    net = tiny_edm_net(grid=grid)
    got = net.round_sigma(torch.tensor([0.2, 0.9, 7.0], dtype=torch.float32))
    assert got.dtype == torch.float32 and got.tolist() == [pytest.approx(0.1), 1.0, 10.0]
    scalar = net.round_sigma(torch.tensor(3.0, dtype=torch.float64))
    assert scalar.dim() == 0 and scalar.dtype == torch.float64 and float(scalar) == 1.0


def test_edm2_net_has_edm2s_interface():
    """No sigma range and no round_sigma (EDM2's Precond has neither); ``return_logvar`` adds a log-variance per
    sample. Mutation: EDM's attributes on it (a drop-in could then read them where EDM2 does not)."""
    net = tiny_edm2_net(label_dim=2)
    for name in ("round_sigma", "sigma_min", "sigma_max"):
        assert not hasattr(net, name)
    x = torch.randn(3, 4, 8, 8)
    out, logvar = net(x, torch.tensor(0.7), torch.eye(2)[[0, 1, 1]], return_logvar=True)
    assert out.dtype == torch.float32 and out.shape == x.shape and logvar.shape == (1, 1, 1, 1)
    assert_bitwise(net(x, torch.tensor(0.7), torch.eye(2)[[0, 1, 1]]), out, "D with and without the log-variance")


def test_narrow_net_and_the_cifar_standin():
    """The narrow net's range; the bench stand-in wraps a diffusers UNet (here kve_fast.testing's small NCSN++)
    behind a float32 preconditioner, with its parameters and none requiring grad (the scripts' EMA copies have
    none). Mutation: the UNet called at c_noise itself (negative: NCSN++ takes its log, NaN)."""
    narrow = narrow_edm_net()
    assert (narrow.sigma_min, narrow.sigma_max) == NARROW_RANGE
    unet = ncsnpp_unet(8)
    net = cifar_standin(unet)
    assert (net.img_resolution, net.img_channels, net.label_dim, net.use_fp16) == (8, 3, 0, False)
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in unet.parameters())
    assert not any(p.requires_grad for p in net.parameters())
    out = net(torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor(0.05, dtype=torch.float64))
    assert out.dtype == torch.float32 and out.shape == (2, 3, 8, 8) and bool(torch.isfinite(out).all())


def test_recording_net_logs_calls_and_forwards_attributes():
    """Mutation: an attribute the net lacks invented (EDM2's net must not seem to have round_sigma)."""
    log = []
    net = RecordingNet(tiny_edm_net(sigma_max=5.0), "net", log)
    x, sigma = torch.randn(1, 3, 8, 8), torch.tensor(1.0)
    assert_bitwise(net(x, sigma, None), net.net(x, sigma, None), "recorded call")
    assert net.sigma_max == 5.0 and callable(net.round_sigma)
    assert log[0]["name"] == "net" and log[0]["x_id"] == id(x) and log[0]["args"] == (None,)
    assert not hasattr(RecordingNet(tiny_edm2_net(), "g", log), "round_sigma")
    assert isinstance(TinyInner(1), torch.nn.Module)

"""Properties of our reading of NVlabs' EDM and EDM2 samplers (kve_fast/edm_reading.py), the oracles the drop-ins
will be compared with: each test checks one thing docs/edm-reading.md says the originals do, and names the
mutation of the reading it catches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_bitwise
from kve_fast.edm_reading import (
    GAMMA_CAP, edm2_guided_denoiser, edm2_levels_reading, edm2_sampler_reading, edm_levels_reading, edm_sampler_reading,
)

from kve_fast.edm_testing import (
    NARROW_RANGE, RecordingNet, narrow_edm_net, script_inputs, tiny_edm2_net, tiny_edm_net,
)

SEEDS = [3, 7]
STEPS = 5


def _states_after(net, draws) -> list:
    """The generators' states after the script's inputs for ``net`` and then ``draws`` (tensors to draw like)."""
    rnd = script_inputs(net, SEEDS)[0]
    for like in draws:
        rnd.randn_like(like)
    return rnd.get_state()


def _global_state_after(seed: int, draws) -> torch.Tensor:
    """The global CPU generator's state after seeding it with ``seed`` and drawing like each of ``draws``."""
    torch.manual_seed(seed)
    for like in draws:
        torch.randn_like(like)
    return torch.get_rng_state()


def _same_states(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _counting(randn_like, seen: list):
    """``randn_like``, recording the dtype of each tensor it is called with."""

    def draw(x):
        seen.append(x.dtype)
        return randn_like(x)

    return draw


def _edm(net, **kwargs):
    rnd, latents, labels = script_inputs(net, SEEDS)
    seen = []
    out = edm_sampler_reading(net, latents, labels, randn_like=_counting(rnd.randn_like, seen), num_steps=STEPS,
                              **kwargs)
    return out, rnd, latents, seen


def _edm2(net, **kwargs):
    rnd, noise, labels = script_inputs(net, SEEDS)
    seen = []
    out = edm2_sampler_reading(net, noise, labels, randn_like=_counting(rnd.randn_like, seen), num_steps=STEPS,
                               **kwargs)
    return out, rnd, noise, seen


def test_edm_draws_noise_every_step_also_where_gamma_is_0():
    """Mutations: the draw skipped where gamma = 0 (the generators end elsewhere); the noise drawn like a float32
    state (a float64 draw uses the generators differently)."""
    net = tiny_edm_net()
    out, rnd, latents, seen = _edm(net)  # S_churn = 0: gamma is 0 at every step
    assert seen == [torch.float64] * STEPS
    assert _same_states(rnd.get_state(), _states_after(net, [latents.double()] * STEPS))
    # gamma = 0 multiplies the noise by 0: another stream gives the same sample, and draws as many
    torch.manual_seed(11)
    other = edm_sampler_reading(net, latents, num_steps=STEPS)
    assert torch.equal(torch.get_rng_state(), _global_state_after(11, [latents.double()] * STEPS))
    assert_bitwise(other, out, "EDM without churn, global RNG vs per-seed generators")


def test_edm2_draws_only_where_it_churns():
    """Mutations: a draw at every step (as EDM), or where S_churn is 0; the range test dropped."""
    net = tiny_edm2_net()
    _, rnd, noise, seen = _edm2(net)
    assert seen == [] and _same_states(rnd.get_state(), _states_after(net, []))
    levels = edm2_levels_reading(STEPS)[:-1]
    s_min, s_max = float(levels[3]), float(levels[1])  # steps 1, 2 and 3 churn
    _, rnd, noise, seen = _edm2(net, S_churn=10, S_min=s_min, S_max=s_max)
    assert seen == [torch.float32] * 3
    assert _same_states(rnd.get_state(), _states_after(net, [noise] * 3))


def test_edm2_range_test_compares_in_the_state_dtype():
    """``S_min <= t_cur <= S_max`` compares a float32 0-d tensor with Python floats: torch rounds the float to
    float32 first. S_max one double below a float32 level rounds to that level, so that step churns. Mutation:
    the test read as ``S_min <= float(t_cur) <= S_max`` (in float64): one draw fewer."""
    level = float(edm2_levels_reading(STEPS)[2])
    s_max = float(np.nextafter(level, 0.0))
    assert s_max < level and float(torch.tensor(s_max, dtype=torch.float32)) == level
    _, _, _, seen = _edm2(tiny_edm2_net(), S_churn=10, S_max=s_max)
    assert len(seen) == STEPS - 2  # steps 2, 3, 4


@pytest.mark.parametrize("reading", ["edm", "edm2"])
@pytest.mark.parametrize("s_churn, capped", [(0.9, False), (40.0, True)])
def test_gamma_is_s_churn_over_num_steps_up_to_its_cap(reading, s_churn, capped):
    """The first model call is at t_hat = t_0 + gamma t_0 with gamma = min(S_churn / N, sqrt(2) - 1). Mutation:
    gamma = min(S_churn, cap) (not divided by N: 0.9 would be capped too)."""
    log = []
    if reading == "edm":
        net = RecordingNet(tiny_edm_net(), "net", log)
        _edm(net, S_churn=s_churn)
        sigma = edm_levels_reading(net, STEPS)[0]
    else:
        net = RecordingNet(tiny_edm2_net(), "net", log)
        _edm2(net, S_churn=s_churn)
        sigma = edm2_levels_reading(STEPS)[0]
    gamma = GAMMA_CAP if capped else s_churn / STEPS
    assert (gamma == GAMMA_CAP) == capped and gamma > 0
    assert torch.equal(log[0]["sigma"], sigma + gamma * sigma)
    if not capped:  # the values tell the mutation apart: min(S_churn, cap) is the cap here
        assert not torch.equal(log[0]["sigma"], sigma + GAMMA_CAP * sigma)


def test_edm_rounds_every_noise_level_through_the_net():
    """Every sigma a net that rounds to a grid is called at lies on its grid: the levels (round_sigma on t_steps)
    and the churned t_hat (round_sigma on t_cur + gamma t_cur), and the sample differs from the same weights'
    without rounding. Mutations: either round_sigma dropped."""
    grid = torch.logspace(-3, 2, 41, dtype=torch.float64)
    log = []
    net = RecordingNet(tiny_edm_net(grid=grid), "net", log)
    out, *_ = _edm(net, S_churn=1.0)  # gamma = 0.2 at every step
    for sigma in edm_levels_reading(net, STEPS)[:-1]:
        assert not bool((grid == sigma + 0.2 * sigma).any()), "an unrounded t_hat must be off the grid"
    assert len(log) == 2 * STEPS - 1
    for call in log:
        assert bool((grid == call["sigma"]).any()), f"sigma {float(call['sigma'])!r} is not on the grid"
    plain, *_ = _edm(tiny_edm_net(), S_churn=1.0)
    assert not torch.equal(out, plain)


def test_edm_state_is_float64_and_the_net_is_called_with_it():
    """Mutation: the state kept in float32 (latents not cast, or the net's output not cast back)."""
    log = []
    net = RecordingNet(tiny_edm_net(label_dim=3), "net", log)
    out, _, latents, seen = _edm(net, S_churn=2.0)
    assert latents.dtype == torch.float32 and out.dtype == torch.float64 and set(seen) == {torch.float64}
    for call in log:
        assert call["x"].dtype == call["sigma"].dtype == torch.float64 and call["sigma"].dim() == 0
        assert len(call["args"]) == 1 and call["args"][0] is not None and not call["kwargs"]  # class_labels, positional


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_edm2_state_is_in_dtype(dtype):
    """Mutations: ``dtype`` ignored (the state and the levels in float32, or the noise's own dtype); the net's
    float32 output not cast to ``dtype`` (bfloat16 - float32 promotes the state to float32)."""
    log = []
    net = RecordingNet(tiny_edm2_net(), "net", log)
    out, _, noise, seen = _edm2(net, S_churn=2.0, dtype=dtype)
    assert noise.dtype == torch.float32 and out.dtype == dtype and set(seen) == {dtype}
    assert all(c["x"].dtype == c["sigma"].dtype == dtype and c["sigma"].dim() == 0 for c in log)


@pytest.mark.parametrize("reading", ["edm", "edm2"])
def test_heun_correction_on_all_but_the_last_step(reading):
    """2N - 1 model calls, the last one at t_{N-1} (the final step is Euler's, to 0). Mutation: the correction on
    the last step too (a call at sigma 0)."""
    log = []
    if reading == "edm":
        net = RecordingNet(tiny_edm_net(), "net", log)
        _edm(net)
        levels = edm_levels_reading(net, STEPS)
    else:
        net = RecordingNet(tiny_edm2_net(), "net", log)
        _edm2(net)
        levels = edm2_levels_reading(STEPS)
    assert [float(c["sigma"]) for c in log] == [float(s) for i in range(STEPS) for s in levels[i:i + 2]][:-1]


def test_edm2_guidance_1_never_calls_the_guiding_net():
    """Mutation: the guiding net called (and its output combined) also at guidance 1."""

    class Raises(torch.nn.Module):
        def forward(self, *args):
            raise AssertionError("the guiding net must not be called at guidance 1")

    net = tiny_edm2_net(label_dim=3)
    for guidance in (1, 1.0):
        rnd, noise, labels = script_inputs(net, SEEDS)
        edm2_sampler_reading(net, noise, labels, gnet=Raises(), guidance=guidance, num_steps=STEPS)


def test_edm2_guidance_calls_the_net_then_the_guiding_net_with_the_same_arguments():
    """Each denoise calls ``net(x, t, labels)`` and then ``gnet(x, t, labels)`` with the same tensors (the newest
    generate_images.py passes the labels to both). Mutations: gnet first; gnet without the labels."""
    log = []
    net = RecordingNet(tiny_edm2_net(label_dim=3), "net", log)
    gnet = RecordingNet(tiny_edm2_net(label_dim=3, seed=1), "gnet", log)
    rnd, noise, labels = script_inputs(net, SEEDS)
    edm2_sampler_reading(net, noise, labels, gnet=gnet, guidance=1.5, num_steps=STEPS, S_churn=3.0,
                         randn_like=rnd.randn_like)
    assert [c["name"] for c in log] == ["net", "gnet"] * (2 * STEPS - 1)
    for main, guide in zip(log[::2], log[1::2]):
        assert main["x_id"] == guide["x_id"] and main["sigma_id"] == guide["sigma_id"]
        assert main["args"][0] is labels and guide["args"][0] is labels and not main["kwargs"] and not guide["kwargs"]


class _Constant(torch.nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x, sigma, labels=None):
        return torch.full_like(x, self.value, dtype=torch.float32)


def test_edm2_guidance_extrapolates_away_from_the_guiding_net():
    """``ref_Dx.lerp(Dx, guidance)``: guidance 2 gives 2 D - D_ref. Mutation: the lerp's arguments swapped
    (2 D_ref - D)."""
    x, t = torch.zeros(1, 2, 2, 2), torch.tensor(1.0)
    for guidance, expected in ((2.0, 5.0), (0.5, 2.0), (1.0, 3.0)):
        denoise = edm2_guided_denoiser(_Constant(3.0), _Constant(1.0), None, guidance, torch.float32)
        assert_bitwise(denoise(x, t), torch.full_like(x, expected), f"guidance {guidance}")


def test_edm2_guidance_is_torch_lerp_itself():
    """torch's lerp is a fused multiply-add on CUDA and in its vectorized CPU kernels; spelled out
    (``ref + w * (D - ref)``) it rounds twice. Mutation: the lerp written as that formula."""
    g = torch.Generator().manual_seed(0)
    main, reference = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    spelled = reference + 1.4 * (main - reference)
    if torch.equal(torch.lerp(reference, main, 1.4), spelled):
        pytest.skip("this CPU's lerp rounds like the spelled-out formula on these values")
    nets = {"main": main, "reference": reference}

    class Fixed(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x, sigma, labels=None):
            return nets[self.name]

    got = edm2_guided_denoiser(Fixed("main"), Fixed("reference"), None, 1.4, torch.float32)(main, torch.tensor(1.0))
    assert_bitwise(got, torch.lerp(reference, main, 1.4), "guided denoiser")


@pytest.mark.parametrize("net, first, last", [
    (narrow_edm_net(), NARROW_RANGE[1], NARROW_RANGE[0]),
    (tiny_edm_net(sigma_min=0.0001, sigma_max=1000.0), 80.0, 0.002),  # a wider range leaves the call's
])
def test_edm_clamps_the_levels_to_the_nets_range(net, first, last):
    """EDM runs from min(sigma_max, net.sigma_max) down to max(sigma_min, net.sigma_min); the first model input is
    the latents times the first level. Mutations: the clamp dropped, or min and max swapped."""
    log = []
    recorded = RecordingNet(net, "net", log)
    _, _, latents, _ = _edm(recorded)
    levels = edm_levels_reading(net, STEPS)
    # the levels are (a + i / (N - 1) * (b - a)) ** rho: their ends are sigma_max and sigma_min up to pow's rounding
    assert float(levels[0]) == pytest.approx(first, rel=1e-12) and float(levels[-2]) == pytest.approx(last, rel=1e-12)
    assert torch.equal(log[0]["sigma"], levels[0])
    assert_bitwise(log[0]["x"], latents.double() * levels[0], "first model input")


def test_edm2_does_not_clamp_to_a_range():
    """EDM2's nets have no range: the levels run from the call's sigma_max. Mutation: EDM's clamp copied into it."""
    log = []
    net = RecordingNet(tiny_edm2_net(), "net", log)
    _edm2(net, sigma_max=150.0)
    assert float(log[0]["sigma"]) == pytest.approx(150.0, rel=1e-6)  # float32 pow's rounding


def test_edm2_in_float64_without_churn_is_edm():
    """Without churn and with round_sigma the identity, EDM's arithmetic is EDM2's in float64 (EDM adds 0 times
    its noise): the two readings give the same bits, though only EDM draws. Mutations: EDM's initial state
    changed (the latents scaled before the cast to float64), EDM2's ``dtype`` ignored, EDM's draw skipped at
    gamma = 0 or a draw added to EDM2."""
    net = tiny_edm_net(label_dim=3)
    rnd, latents, labels = script_inputs(net, SEEDS)
    edm = edm_sampler_reading(net, latents, labels, randn_like=rnd.randn_like, num_steps=STEPS)
    rnd2, latents2, labels2 = script_inputs(net, SEEDS)
    edm2 = edm2_sampler_reading(net, latents2, labels2, num_steps=STEPS, dtype=torch.float64,
                                randn_like=rnd2.randn_like)
    assert_bitwise(edm2, edm, "EDM2 in float64 vs EDM")
    assert not _same_states(rnd.get_state(), rnd2.get_state())

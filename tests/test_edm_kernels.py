"""The EDM/EDM2 step kernels (``kve_fast.ops.edm_triton``) in Triton's interpreter: bit for bit against torch's ops
(``step_torch.edm_*``) and against our reading of NVlabs' samplers (kve_fast/edm_reading.py), float32 and float64.

The interpreter never forms FMAs and divides exactly, so a pass here shows the kernels do the originals'
operations in their order and dtype, not that a GPU rounds the same: ``test_compiled_gpu_arithmetic`` compiles
the kernels for an NVIDIA GPU (no GPU needed) and checks the instructions; bench/gpu_check.py must still run them.
Each test's docstring names the mutation of the code it catches (each was applied and seen to fail).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HAS_TRITON, assert_bitwise, needs_triton
from kve_fast.edm_reading import (
    GAMMA_CAP, _heun_step, edm2_guided_denoiser, edm2_levels_reading, edm2_sampler_reading, edm_levels_reading,
    edm_sampler_reading, karras_levels,
)

from kve_fast import fake_graph
from kve_fast.edm_testing import script_inputs, tiny_edm2_net, tiny_edm_net
from kve_fast.ops import step_torch

if HAS_TRITON:  # with Triton installed, a broken kernel module fails here instead of skipping
    from kve_fast.ops import edm_triton
pytestmark = needs_triton

DTYPES = [torch.float32, torch.float64]
LAYOUTS = ["contiguous", "channels_last"]
SHAPES = [(1, 3, 5, 7), (3, 3, 16, 24)]  # batch 1 in one block; batch 3 over two (the second partial)
N = 6  # levels of the test steps: 80 ... 0.002, then 0
S_NOISE = 1.003  # EDM's ImageNet-64 setting


def _values(shape, seed: int, dtype, layout: str = "contiguous") -> torch.Tensor:
    """Normals scaled by 10^u, u uniform in (-3, 3): every op rounds, over several orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(shape, generator=g, dtype=torch.float64)
    v = (normal * 10 ** (6 * torch.rand(shape, generator=g, dtype=torch.float64) - 3)).to(dtype)
    return v.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else v


def _step(dtype, i: int, gamma: float):
    """Step i's ``(t_cur, t_hat, t_next, cs)``, 0-d in ``dtype``, computed as EDM2 computes them (EDM's add
    ``round_sigma``): t_hat = t + gamma t, cs = sqrt(t_hat^2 - t^2) * S_noise."""
    levels = torch.cat([karras_levels(N, 0.002, 80, 7, dtype, "cpu"), torch.zeros(1, dtype=dtype)])
    t_cur, t_next = levels[i], levels[i + 1]
    t_hat = t_cur + gamma * t_cur
    return t_cur, t_hat, t_next, step_torch.edm_churn_scale(t_cur, t_hat, S_NOISE)


def _assert_same(actual, expected, what: str) -> None:
    """The same values (NaN where NaN) and the same sign of every zero; the kernels' output in its input's layout."""
    assert_bitwise(actual, expected, what)
    real = ~actual.isnan()
    assert torch.equal(actual.signbit() & real, expected.signbit() & real), f"{what}: the sign of a zero differs"


STEPS = [(0, 0.4), (3, 0.4), (3, 0.0), (N - 1, 0.0)]  # gamma > 0 at t = 80 and mid-way; gamma = 0; the last step


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("i, gamma", STEPS[:3])
def test_churn_matches_torch(dtype, layout, shape, i, gamma):
    """Mutation caught: the float64 kernel's product in float32 (``cs * eps.to(tl.float32)``)."""
    _, _, _, cs = _step(dtype, i, gamma)
    x, eps = _values(shape, 1, dtype, layout), _values(shape, 2, dtype, layout)
    hat = edm_triton.churn(x, eps, cs)
    _assert_same(hat, step_torch.edm_churn(x, eps, cs), "x_hat")
    assert hat.stride() == x.stride(), "x_hat in the state's layout"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("i, gamma", [STEPS[0], STEPS[1], STEPS[3]])
def test_euler_matches_torch(dtype, layout, shape, i, gamma):
    """Mutation caught: the division by t_hat as a multiplication by its reciprocal (``(hat - D) * (1 / t_hat)``)."""
    _, t_hat, t_next, _ = _step(dtype, i, gamma)
    x_hat, denoised = _values(shape, 3, dtype, layout), _values(shape, 4, dtype, layout)
    x_next, d = edm_triton.euler(denoised, x_hat, t_hat, t_next, want_derivative=i < N - 1)
    r_next, r_d = step_torch.edm_euler(denoised, x_hat, t_hat, t_next)
    _assert_same(x_next, r_next, "x_next")
    assert x_next.stride() == x_hat.stride()
    if i < N - 1:
        _assert_same(d, r_d, "d")
    else:
        assert d is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("then", [None, 0.4, 0.0])  # no churn fused; the next step's, gamma > 0 or 0
def test_heun_matches_torch(dtype, layout, shape, then):
    """Mutation caught: the Heun launch dividing by t_hat (the slot read for t_next is ``t_hat``'s)."""
    _, t_hat, t_next, _ = _step(dtype, 2, 0.4)
    x_hat, x_next = _values(shape, 5, dtype, layout), _values(shape, 6, dtype, layout)
    d, denoised, eps = _values(shape, 7, dtype, layout), _values(shape, 8, dtype, layout), _values(shape, 9, dtype)
    next_churn = None if then is None else (eps, _step(dtype, 3, then)[3])
    x, hat_next = edm_triton.heun(denoised, x_hat, x_next, d, t_hat, t_next, want_sample=then != 0.4,
                                  next_churn=next_churn)
    r_x = step_torch.edm_heun(denoised, x_hat, x_next, d, t_hat, t_next)
    if then != 0.4:
        _assert_same(x, r_x, "x")
        assert x.stride() == x_hat.stride()
    else:
        assert x is None, "x written only where asked"
    if then is not None:
        _assert_same(hat_next, step_torch.edm_churn(r_x, eps, next_churn[1]), "the next step's x_hat")
        assert hat_next.stride() == x_hat.stride()


def _queue(*outputs):
    """A stand-in denoiser returning ``outputs`` in turn, whatever it is called with."""
    it = iter(outputs)
    return lambda x, sigma: next(it)


@pytest.mark.parametrize("dtype", DTYPES)
def test_heun_halves_where_their_sum_overflows_or_underflows(dtype):
    """0.5 d + 0.5 d' differs from (d + d') / 2 only where d + d' overflows or a half is subnormal: here both, and a
    normal element. Mutations caught: ``(d + d') / 2`` or ``0.5 * (d + d')`` for ``0.5 * d + 0.5 * d'`` in the
    kernel, and in ``step_torch.edm_heun`` (against the reading's ``_heun_step``)."""
    big = math.ldexp(1.0, math.frexp(torch.finfo(dtype).max)[1] - 1)  # P: the largest power of 2
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps  # the smallest subnormal
    # t_hat = 2, t_next = 1 (dt = -1). Column 0: d = 0.75 P, d' = 1.5 P (their sum overflows); column 1: d = d' =
    # the smallest subnormal (each half rounds to 0); column 2: normal values.
    t_hat, t_next = torch.tensor(2.0, dtype=dtype), torch.tensor(1.0, dtype=dtype)
    x_hat = torch.tensor([0.5 * big, 0.0, 0.3], dtype=dtype).reshape(1, 1, 1, 3)
    d1 = torch.tensor([-big, -2 * tiny, -1.7], dtype=dtype).reshape(1, 1, 1, 3)  # D at (x_hat, t_hat)
    d2 = torch.tensor([-1.75 * big, -2 * tiny, 0.9], dtype=dtype).reshape(1, 1, 1, 3)  # D' at (x_next, t_next)
    x_next, d = edm_triton.euler(d1, x_hat, t_hat, t_next)
    x, _ = edm_triton.heun(d2, x_hat, x_next, d, t_hat, t_next)
    reading = _heun_step(_queue(d1, d2), x_hat, t_hat, t_next, True)
    reference = step_torch.edm_heun(d2, x_hat, *step_torch.edm_euler(d1, x_hat, t_hat, t_next), t_hat, t_next)
    _assert_same(reference, reading, "step_torch.edm_heun vs the reading")
    _assert_same(x, reading, "the kernels vs the reading")
    d_prime = (x_next - d2) / t_next
    for other in ((d + d_prime) / 2, 0.5 * (d + d_prime)):
        changed = x_hat + (t_next - t_hat) * other != reading
        assert changed[..., :2].all() and not changed[..., 2], "the columns must tell the halves from the other forms"


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply")  # 0 * inf, in the interpreter's numpy
@pytest.mark.parametrize("dtype", DTYPES)
def test_gamma_zero_adds_zero_as_torch_does(dtype):
    """At gamma = 0 the originals still add cs * eps with cs = 0: -0.0 + 0 * eps is +0.0 where eps > 0 and -0.0
    where eps < 0, and an infinite or NaN draw gives NaN. Mutation caught: skipping the add where cs is 0
    (``tl.where(cs == 0, x, x + cs * eps)``), in the churn kernel and in the Heun launch's fused churn."""
    t_cur, t_hat, t_next, cs = _step(dtype, 3, 0.0)
    assert cs == 0
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([-0.0, -0.0, 0.0, -0.0, 1.5, -0.0, 2.0], dtype=dtype).reshape(1, 1, 1, 7)
    eps = torch.tensor([1.0, -1.0, -1.0, inf, -inf, nan, 0.5], dtype=dtype).reshape(1, 1, 1, 7)
    expected = step_torch.edm_churn(x, eps, cs)
    assert expected[0, 0, 0, 0].signbit() == 0 and expected[0, 0, 0, 1].signbit() == 1
    assert expected[0, 0, 0, 3:6].isnan().all()
    _assert_same(edm_triton.churn(x, eps, cs), expected, "x_hat")
    # the same through the Heun launch: d = 0 and D' = x_next make the corrected sample x_hat itself (-0.0 included)
    zero = torch.zeros_like(x)
    x_new, hat_next = edm_triton.heun(zero, x, zero, zero, t_hat, t_next, next_churn=(eps, cs))
    _assert_same(x_new, x, "the corrected sample")
    _assert_same(hat_next, expected, "the next step's x_hat")


@pytest.mark.parametrize("state", DTYPES)
@pytest.mark.parametrize("net", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_net_output_read_in_its_own_dtype(state, net):
    """D read in the net's dtype and widened in the kernel, as ``.to(dtype)`` does (a float64 D for a float32 state
    is refused: torch rounds it first). Mutation caught: D through float32 in the float64 kernel
    (``raw.to(tl.float32).to(like.dtype)``: a float64 D loses its low bits)."""
    if net not in edm_triton.READS[state]:
        with pytest.raises(TypeError, match="denoised"):
            edm_triton.euler(torch.zeros(1, 1, 2, 2, dtype=net), torch.zeros(1, 1, 2, 2, dtype=state), 1.0, 0.5)
        return
    _, t_hat, t_next, _ = _step(state, 2, 0.4)
    shape = (3, 3, 5, 7)
    x_hat, x_next, d = _values(shape, 10, state), _values(shape, 11, state), _values(shape, 12, state)
    denoised = _values(shape, 13, torch.float64).to(net)
    got, got_d = edm_triton.euler(denoised, x_hat, t_hat, t_next)
    ref, ref_d = step_torch.edm_euler(denoised, x_hat, t_hat, t_next)
    _assert_same(got, ref, "x_next")
    _assert_same(got_d, ref_d, "d")
    x, _ = edm_triton.heun(denoised, x_hat, x_next, d, t_hat, t_next)
    _assert_same(x, step_torch.edm_heun(denoised, x_hat, x_next, d, t_hat, t_next), "x")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("correct", [True, False])
def test_chained_kernels_are_the_readings_step(dtype, correct):
    """Euler then Heun (or Euler alone: the last step) with a stand-in denoiser, against the reading's
    ``_heun_step``. Mutation caught: ``step_scalars`` writing dt as ``t_hat - t_next``."""
    _, t_hat, t_next, _ = _step(dtype, 2, 0.4)
    x_hat = _values((3, 3, 5, 7), 14, dtype)

    def denoise(x, sigma):  # a float32 net output, cast to the state dtype by the reading
        return (0.9 * x / (1 + sigma) + 0.01 * x.square()).to(torch.float32)

    expected = _heun_step(lambda x, s: denoise(x, s).to(dtype), x_hat, t_hat, t_next, correct)
    x_next, d = edm_triton.euler(denoise(x_hat, t_hat), x_hat, t_hat, t_next, want_derivative=correct)
    if correct:
        x_next, _ = edm_triton.heun(denoise(x_next, t_next), x_hat, x_next, d, t_hat, t_next)
    _assert_same(x_next, expected, "the step")


# -- the launchers as a stage runner and a graph use them -------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_graph_replays_read_each_steps_scalars(dtype):
    """One capture of a whole step (churn, Euler, Heun fused with the next churn, in place where a runner would
    reuse buffers), replayed for two steps after writing each one's ``SLOTS`` with ``step_scalars(out=...)``: each
    replay computes that step, as torch's ops do. Mutation caught: the kernels reading their scalars as launch
    arguments (Python floats, baked into the capture) instead of from the slots."""
    shape = (2, 3, 5, 7)
    x, eps, eps_next = _values(shape, 20, dtype), _values(shape, 21, dtype), _values(shape, 22, dtype)
    d1, d2 = _values(shape, 23, dtype).float(), _values(shape, 24, dtype)  # the net outputs (float32, state dtype)
    slots = torch.zeros(len(edm_triton.SLOTS), dtype=dtype)
    hat, x_next, d = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)

    def step():
        edm_triton.launch_churn(x, eps, slots, hat=hat)
        edm_triton.launch_euler(d1, hat, slots, x_next=x_next, d=d)
        edm_triton.launch_heun(d2, hat, x_next, d, slots, x=x_next, eps_next=eps_next, hat_next=hat)

    graph = fake_graph.FakeGraph()
    for k, (i, gamma) in enumerate([(1, 0.4), (3, 0.0)]):
        t_cur, t_hat, t_next, cs = _step(dtype, i, gamma)
        cs_next = _step(dtype, i + 1, 0.4)[3]
        edm_triton.step_scalars(x, cs=cs, t_hat=t_hat, t_next=t_next, cs_next=cs_next, out=slots)
        graph.capture(step) if k == 0 else graph.replay()
        r_hat = step_torch.edm_churn(x, eps, cs)
        r_next, r_d = step_torch.edm_euler(d1, r_hat, t_hat, t_next)
        r_x = step_torch.edm_heun(d2, r_hat, r_next, r_d, t_hat, t_next)
        _assert_same(x_next, r_x, f"step {i}: x (written over x_next)")
        _assert_same(hat, step_torch.edm_churn(r_x, eps_next, cs_next), f"step {i}: the next x_hat (over x_hat)")


def test_step_scalars_layout():
    """``SLOTS`` in its documented order, dt the 0-d difference, 0 where not given, into ``out`` or a row of a table
    (the launchers read a view where it starts). Mutation caught: dt written as ``t_hat - t_next``."""
    t_hat, t_next = torch.tensor(1.7, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    got = edm_triton.step_scalars(t_hat, cs=0.25, t_hat=t_hat, t_next=t_next)
    assert edm_triton.SLOTS == ("cs", "t_hat", "dt", "t_next", "cs_next")
    assert_bitwise(got, torch.stack([torch.tensor(0.25, dtype=torch.float64), t_hat, t_next - t_hat, t_next,
                                     torch.tensor(0.0, dtype=torch.float64)]))
    table = torch.zeros(3, len(edm_triton.SLOTS), dtype=torch.float64)
    edm_triton.step_scalars(t_hat, cs=0.5, out=table[1])
    x, eps = _values((1, 1, 2, 3), 25, torch.float64), _values((1, 1, 2, 3), 26, torch.float64)
    hat = torch.empty_like(x)
    edm_triton.launch_churn(x, eps, table[1], hat=hat)
    _assert_same(hat, x + 0.5 * eps, "churn with a table's row")


def test_public_ops_check_their_inputs():
    """Each wrong argument is a TypeError or ValueError naming it, before any work (``out`` left as it was); other
    strides are copied into the state's layout, never misread. Mutation caught: ``fused.in_layout`` returning its
    tensor whatever its strides."""
    x = _values((2, 3, 4, 5), 30, torch.float64)
    eps, d = _values((2, 3, 4, 5), 31, torch.float64), _values((2, 3, 4, 5), 32, torch.float64)
    one = torch.tensor(1.0, dtype=torch.float64)
    bad = [
        (TypeError, "`x`", lambda: edm_triton.churn(x.half(), eps, one)),
        (TypeError, "`x`", lambda: edm_triton.churn(x.numpy(), eps, one)),
        (TypeError, "`eps`", lambda: edm_triton.churn(x, eps.float(), one)),
        (ValueError, "`eps`", lambda: edm_triton.churn(x, eps[:1], one)),
        (ValueError, "`eps`", lambda: edm_triton.churn(x, eps.to("meta"), one)),
        (TypeError, "`cs`", lambda: edm_triton.churn(x, eps, one.reshape(1))),
        (TypeError, "`cs`", lambda: edm_triton.churn(x, eps, one.float())),
        (TypeError, "`cs`", lambda: edm_triton.churn(x, eps, "0.5")),
        (ValueError, "`cs`", lambda: edm_triton.churn(x, eps, one.to("meta"))),
        (ValueError, "`x`", lambda: edm_triton.churn(torch.zeros(1, dtype=torch.float64).expand(2**31), eps, one)),
        (TypeError, "`denoised`", lambda: edm_triton.euler(d.to(torch.int32), x, one, one)),
        (TypeError, "`denoised`", lambda: edm_triton.euler(d, x.float(), 1.0, 0.5)),
        (TypeError, "`t_next`", lambda: edm_triton.euler(d, x, one, True)),
        (ValueError, "`d`", lambda: edm_triton.heun(d, x, x, d[:, :1], one, one)),
        (TypeError, "`next_churn`", lambda: edm_triton.heun(d, x, x, d, one, one, next_churn=(eps,))),
        (TypeError, "`eps_next`", lambda: edm_triton.heun(d, x, x, d, one, one, next_churn=(eps.float(), one))),
    ]
    for error, name, call in bad:
        with pytest.raises(error, match=re.escape(name)):
            call()
    out = torch.full((len(edm_triton.SLOTS),), 7.0, dtype=torch.float64)
    with pytest.raises(TypeError, match="`t_hat`"):
        edm_triton.step_scalars(x, cs=one, t_hat=one.float(), out=out)
    with pytest.raises(ValueError, match="`out`"):
        edm_triton.step_scalars(x, cs=one, out=out[:4])
    assert (out == 7).all(), "`out` untouched by a call that failed"
    # strides: a non-dense state is made contiguous; an operand of other strides is copied into the state's layout
    wide = _values((2, 3, 4, 10), 33, torch.float64)[..., ::2]
    assert not wide.is_contiguous()
    _assert_same(edm_triton.churn(wide, eps, 0.5), edm_triton.churn(wide.contiguous(), eps, 0.5), "a strided x")
    cl = x.contiguous(memory_format=torch.channels_last)
    hat = edm_triton.churn(cl, eps, 0.5)
    assert hat.stride() == cl.stride()
    _assert_same(hat, step_torch.edm_churn(x, eps, 0.5), "a channels_last x with a contiguous eps")
    empty = torch.zeros(0, 3, 4, 5, dtype=torch.float64)
    assert edm_triton.euler(empty, empty, one, one)[0].shape == empty.shape, "an empty batch: nothing to launch"


# -- a sampler loop on the kernels, against the readings of EDM's and EDM2's samplers ------------------------


def _kernel_loop(denoise, levels, x, randn_like, plan):
    """The originals' loop on the kernels as a stage runner would run it: step i's churn fused into step i - 1's
    Heun launch, its noise drawn just before that launch (after step i - 1's last net call, where the originals
    draw it); ``plan[i]``: step i's ``(t_hat, cs)``, or None where it neither churns nor draws (EDM2)."""
    steps = len(levels) - 1
    t_hat, cs = plan[0] or (levels[0], None)
    hat = x if cs is None else edm_triton.churn(x, randn_like(x), cs)
    for i in range(steps):
        t_next = levels[i + 1]
        x_next, d = edm_triton.euler(denoise(hat, t_hat), hat, t_hat, t_next, want_derivative=i < steps - 1)
        if i == steps - 1:
            return x_next
        denoised = denoise(x_next, t_next)
        if plan[i + 1] is None:
            hat, _ = edm_triton.heun(denoised, hat, x_next, d, t_hat, t_next)
            t_hat = t_next
        else:
            eps = randn_like(x_next)  # x_next: the corrected sample's shape, dtype, layout and device
            _, hat = edm_triton.heun(denoised, hat, x_next, d, t_hat, t_next, want_sample=False,
                                     next_churn=(eps, plan[i + 1][1]))
            t_hat = plan[i + 1][0]


def _gamma(s_churn, s_min, s_max, t, steps):
    # both samplers: gamma = min(S_churn / N, sqrt(2) - 1) where S_min <= t <= S_max (the readings' GAMMA_CAP)
    return min(s_churn / steps, GAMMA_CAP) if s_min <= t <= s_max else 0


LOOP = dict(num_steps=18, S_min=0.05, S_max=50, S_noise=S_NOISE)  # EDM's default N; churning where 0.05 <= t <= 50


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("s_churn", [0, 40])
def test_edm_loop_on_the_kernels_is_the_reading(layout, s_churn):
    """EDM: float64 state, float32 net output read by the kernels, a draw every step (also at gamma = 0),
    ``round_sigma`` on a grid; the sample and the generators' states as the reading's. Mutation caught: the Heun
    launch's fused churn reading this step's coefficient (slot ``cs``) instead of the next step's (``cs_next``)."""
    net = tiny_edm_net(3, 6, label_dim=4, grid=torch.linspace(0.002, 100, 2000, dtype=torch.float64))
    rnd, latents, labels = script_inputs(net, [3, 9])
    ours, _, _ = script_inputs(net, [3, 9])
    if layout == "channels_last":
        latents = latents.contiguous(memory_format=torch.channels_last)
    expected = edm_sampler_reading(net, latents, labels, rnd.randn_like, S_churn=s_churn, **LOOP)
    levels = edm_levels_reading(net, LOOP["num_steps"])
    plan = []
    for t in levels[:-1]:
        t_hat = net.round_sigma(t + _gamma(s_churn, LOOP["S_min"], LOOP["S_max"], t, LOOP["num_steps"]) * t)
        plan.append((t_hat, step_torch.edm_churn_scale(t, t_hat, S_NOISE)))
    x = latents.to(torch.float64) * levels[0]
    got = _kernel_loop(lambda x, t: net(x, t, labels), levels, x, ours.randn_like, plan)
    _assert_same(got, expected, "EDM's sample")
    assert all(torch.equal(a, b) for a, b in zip(ours.get_state(), rnd.get_state())), "the generators' states"


@pytest.mark.parametrize("guidance", [1, 2.5])
@pytest.mark.parametrize("s_churn", [0, 40])
def test_edm2_loop_on_the_kernels_is_the_reading(guidance, s_churn):
    """EDM2: float32 state, no draw where it does not churn, the guiding net's ``lerp`` kept in torch (an FMA)
    before the kernels. Mutations caught: the churn's coefficient rounded otherwise (``edm_churn_scale`` as
    ``((t_hat**2 - t_cur**2) * s_noise**2).sqrt()``); the churn kernel computing in float64 for a float32 state
    (x_hat rounded once instead of twice: ``(x.to(tl.float64) + cs * eps).to(x.dtype)``)."""
    net, gnet = tiny_edm2_net(4, 6, label_dim=3), tiny_edm2_net(4, 6, label_dim=3, seed=1)
    rnd, noise, labels = script_inputs(net, [5, 6, 7])
    ours, _, _ = script_inputs(net, [5, 6, 7])
    expected = edm2_sampler_reading(net, noise, labels, gnet, guidance=guidance, S_churn=s_churn,
                                    randn_like=rnd.randn_like, **LOOP)
    levels = edm2_levels_reading(LOOP["num_steps"])
    plan = []
    for t in levels[:-1]:
        if s_churn > 0 and LOOP["S_min"] <= t <= LOOP["S_max"]:
            t_hat = t + _gamma(s_churn, LOOP["S_min"], LOOP["S_max"], t, LOOP["num_steps"]) * t
            plan.append((t_hat, step_torch.edm_churn_scale(t, t_hat, S_NOISE)))
        else:
            plan.append(None)
    assert (s_churn > 0) == any(plan) and None in plan, "steps that churn and steps that do not"
    denoise = edm2_guided_denoiser(net, gnet, labels, guidance, torch.float32)
    got = _kernel_loop(denoise, levels, noise.to(torch.float32) * levels[0], ours.randn_like, plan)
    _assert_same(got, expected, "EDM2's sample")
    assert all(torch.equal(a, b) for a, b in zip(ours.get_state(), rnd.get_state())), "the generators' states"


# -- what a GPU would run: the kernels compiled for one, with their launch options ------------------------------

# Run in a fresh interpreter without TRITON_INTERPRET (which this process set before importing Triton): every
# launch of the public ops is recorded instead of run (``fake_graph.launch``), compiled for an H100 (sm_90) with
# its launch options, and the float instructions of the PTX counted. Prints JSON: one row per launch.
_COMPILE = r"""
import collections, json, re, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kve_fast import fake_graph
from kve_fast.ops import edm_triton

launches = []
fake_graph.launch = lambda kernel, grid, args, meta: launches.append((kernel, args, meta))
for state in (torch.float32, torch.float64):
    x = torch.zeros(2, 3, 4, 4, dtype=state)
    edm_triton.churn(x, x, 0.5)
    edm_triton.euler(x, x, 1.0, 0.5)
    edm_triton.euler(x, x, 1.0, 0.0, want_derivative=False)
    for net in edm_triton.READS[state]:
        edm_triton.heun(x.to(net), x, x, x, 1.0, 0.5)
    edm_triton.heun(x, x, x, x, 1.0, 0.5, want_sample=False, next_churn=(x, 0.3))
names = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16"}
options = ("num_warps", "enable_fp_fusion")
rows = []
for kernel, args, meta in launches:
    signature = {n: "*" + names[a.dtype] if isinstance(a, torch.Tensor) else "i32"
                 for n, a in zip(kernel.arg_names, args)}
    constexprs = {k: v for k, v in meta.items() if k not in options}
    signature.update({k: "constexpr" for k in constexprs})
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={k: meta[k] for k in options}).asm["ptx"]
    instructions = (m.group(1) for m in re.finditer(r"^\s*(\w+(?:\.\w+)*)\s", ptx, re.M))
    ops = collections.Counter(i for i in instructions
                              if re.search(r"\.(f16|bf16|f32|f64)\b", i) and not i.startswith(("ld", "st", "mov")))
    rows.append({"kernel": kernel.__name__, "pointers": [names[a.dtype] for a in args if isinstance(a, torch.Tensor)],
                 "meta": constexprs, "ops": ops})
print(json.dumps(rows))
"""

# Per element: the originals' operations, one instruction each (a multiply-add contracted, an approximate division or
# a reciprocal shows up here as another instruction or count).
_PER_ELEMENT = {"_edm_churn_kernel": {"mul": 1, "add": 1},
                "_edm_euler_kernel": {"sub": 1, "div": 1, "mul": 1, "add": 1},
                "_edm_heun_kernel": {"sub": 1, "div": 1, "mul": 3, "add": 2}}


@pytest.mark.skipif(HAS_TRITON and importlib.util.find_spec("triton.backends.nvidia") is None,
                    reason="Triton has no NVIDIA backend here to compile for")
def test_compiled_gpu_arithmetic():
    """The kernels as Triton compiles them for an NVIDIA GPU (sm_90, with ``_LAUNCH``'s options): every float
    operation IEEE and rounded to nearest (``add/sub/mul/div.rn`` in the state's width), no FMA, no approximate
    division, the only conversions exact widenings of D, and as many of each as the originals' expressions have.
    Mutations caught: ``enable_fp_fusion=True`` (fma.rn), float32 ``/`` for ``tl.div_rn`` (div.full.f32), D through
    float32 in the float64 kernel (cvt.rn.f32.f64)."""
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-c", _COMPILE], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout)
    assert len(rows) == sum(4 + len(edm_triton.READS[s]) for s in edm_triton.STATE_DTYPES), "every launch compiled"
    for row in rows:
        width = "f64" if "fp64" in row["pointers"][1:] else "f32"  # the state's (the first pointer may be D)
        per = dict(_PER_ELEMENT[row["kernel"]])
        if row["meta"].get("CHURN"):
            per["mul"], per["add"] = per["mul"] + 1, per["add"] + 1
        arithmetic = {op: n for op, n in row["ops"].items() if not op.startswith("cvt.")}
        assert set(arithmetic) == {f"{op}.rn.{width}" for op in per}, row
        elements = arithmetic[f"mul.rn.{width}"] // per["mul"]  # per thread
        assert arithmetic == {f"{op}.rn.{width}": n * elements for op, n in per.items()}, row
        for op in set(row["ops"]) - set(arithmetic):  # D widened: cvt.f32.f16, cvt.f64.bf16, ...: no rounding mode
            assert re.fullmatch(rf"cvt\.{width}\.(f16|bf16|f32)", op), (op, row)

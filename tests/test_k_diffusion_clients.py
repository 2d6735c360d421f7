"""The k-diffusion drop-in as ComfyUI and stable-diffusion-webui call it, against the real k-diffusion
0.1.1.post1 (``real_sampling()``, tests/test_k_diffusion.py): every call runs, with k-diffusion's bits and
side effects: the output and its dtype, every tensor the callback sees (and what its in-place edits do),
every input and noise level the model sees, and the global RNG afterwards (also after an interrupt).

The patterns (written here from how those projects call the samplers; nothing of theirs is copied):
ComfyUI's sigma nodes (SplitSigmas, FlipSigmas, a single sigma), classifier-free guidance wrappers (cond and
uncond batched, a scale in ``extra_args``), partial denoise (img2img: the schedule's tail), an inpainting mask
applied in the denoiser, a preview callback, in-place callback edits, an interrupt raised from the callback,
a ControlNet-style wrapper that keeps the inputs it was given, and other dtypes."""

from __future__ import annotations

import pytest
import torch
from conftest import GaussianScore, assert_bitwise
from test_k_diffusion import BACKENDS, DEVICE, UNetDenoiser, real_sampling

from kve_fast import _warn
from kve_fast import k_diffusion as kd
from kve_fast import plan as plan_module

CHURN = {"s_churn": 1.5, "s_tmin": 0.05, "s_tmax": 30.0, "s_noise": 1.003}
SAMPLERS = ["sample_heun", "sample_euler"]


class Recorder:
    """A denoiser wrapper that records what it is called with (clones, and the tensors themselves)."""

    def __init__(self, model, keep_inputs: bool = False):
        self.model, self.keep_inputs, self.calls, self.kept = model, keep_inputs, [], []

    def __call__(self, x, sigma, **kwargs):
        self.calls.append((x.clone(), sigma.clone(), sorted(kwargs)))
        if self.keep_inputs:
            self.kept.append((x, x.clone()))
        return self.model(x, sigma, **kwargs)


def _compare(sampler, model, x, sigmas, backend, callback=None, extra_args=None, seed=3, **kw):
    """Run k-diffusion's ``sampler`` and kve_fast's on the same inputs and global seed; assert the same
    output (values and dtype), callback tensors, model calls and RNG state after. Returns kve_fast's output."""
    results = {}
    for name, fn in (("real", getattr(real_sampling(), sampler)),
                     ("ours", lambda *a, **k: getattr(kd, sampler)(*a, backend=backend, **k))):
        rec = Recorder(model)
        seen = []
        cb = None if callback is None else (lambda d, seen=seen: seen.append(
            {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in d.items()}) or callback(d))
        torch.manual_seed(seed)
        out = fn(rec, x.clone() if x is not None else None, sigmas, extra_args=extra_args, callback=cb, disable=True,
                 **kw)
        results[name] = (out, rec.calls, seen, torch.get_rng_state())
    (out, calls, seen, rng), (r_out, r_calls, r_seen, r_rng) = results["ours"], results["real"]
    assert_bitwise(out, r_out, f"{sampler} output ({backend})")
    assert len(calls) == len(r_calls), "model calls"
    for k, ((a, s, kw_a), (b, t, kw_b)) in enumerate(zip(calls, r_calls)):
        assert_bitwise(a, b, f"model input {k}")
        assert_bitwise(s, t, f"model noise level {k}")
        assert kw_a == kw_b
    assert len(seen) == len(r_seen), "callback calls"
    for a, b in zip(seen, r_seen):
        assert sorted(a) == sorted(b)
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert_bitwise(a[key], b[key], f"callback {key} at step {a['i']}")
            else:
                assert a[key] == b[key]
    assert torch.equal(rng, r_rng), "the global RNG must end where k-diffusion leaves it"
    return out


def _denoiser():
    return kd.score_to_denoiser(GaussianScore(8).to(DEVICE))


def _x(batch=2, scale=10.0, dtype=torch.float32):
    return (torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(batch)) * scale).to(DEVICE, dtype)


# -- ComfyUI's sigma nodes --------------------------------------------------------------------------------------


def _karras(n=8):
    return real_sampling().get_sigmas_karras(n, 0.03, 20.0, device=DEVICE)


SEQUENCES = {
    "split high": lambda: _karras()[:5],  # SplitSigmas' first part: ends at a nonzero sigma (a Heun last step)
    "split low": lambda: _karras()[4:],
    "flip": lambda: _flip(_karras()),  # FlipSigmas: ascending ("unsampling" an image back to noise)
    "non-monotonic": lambda: torch.tensor([1.0, 3.0, 0.5, 0.0], device=DEVICE),
}


def _flip(sigmas):
    """What ComfyUI's FlipSigmas does: reversed, a first 0 replaced by 1e-4 (it would divide by 0)."""
    sigmas = sigmas.flip(0)
    if sigmas[0] == 0:
        sigmas[0] = 0.0001
    return sigmas


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("sequence", list(SEQUENCES))
def test_sigma_sequences_comfyui_makes(sequence, sampler, backend, monkeypatch):
    monkeypatch.setattr(plan_module, "CHUNK", 2)  # (the steps' host floats made two steps at a time)
    sigmas = SEQUENCES[sequence]()
    x = _x(scale=float(sigmas[0]) if float(sigmas[0]) > 0 else 0.5)
    _compare(sampler, _denoiser(), x, sigmas, backend, callback=lambda d: None, **CHURN)
    _compare(sampler, _denoiser(), x, sigmas, backend, **CHURN)  # the fused path, no callback


@pytest.mark.parametrize("sigmas", [[0.0], [3.0], []])
def test_a_single_sigma_returns_x_itself(sigmas):
    x = _x()
    state = torch.get_rng_state()
    for fn in (real_sampling().sample_heun, kd.sample_heun, kd.sample_euler):
        assert fn(_denoiser(), x, torch.tensor(sigmas, device=DEVICE), disable=True) is x
    assert torch.equal(torch.get_rng_state(), state)


# -- classifier-free guidance, partial denoise, inpainting -----------------------------------------------------


class CondModel(torch.nn.Module):
    """A conditional denoiser: the Gaussian denoiser nudged by a conditioning tensor."""

    def __init__(self):
        super().__init__()
        self.base = UNetDenoiser()

    def forward(self, x, sigma, cond):
        return self.base(x, sigma) + 0.02 * cond


class CFGDenoiser(torch.nn.Module):
    """ComfyUI/webui-style guidance: cond and uncond in one batch, ``uncond + (cond - uncond) * scale``."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, x, sigma, cond, uncond, cond_scale):
        x_in, sigma_in = torch.cat([x] * 2), torch.cat([sigma] * 2)
        c_in = torch.cat([uncond, cond])
        uncond_out, cond_out = self.inner(x_in, sigma_in, cond=c_in).chunk(2)
        return uncond_out + (cond_out - uncond_out) * cond_scale


@pytest.mark.parametrize("backend", BACKENDS)
def test_classifier_free_guidance_and_partial_denoise(backend):
    model = CFGDenoiser(CondModel()).to(DEVICE)
    cond, uncond = torch.randn(2, 3, 8, 8).to(DEVICE), torch.zeros(2, 3, 8, 8, device=DEVICE)
    extra = {"cond": cond, "uncond": uncond, "cond_scale": 5.0}
    sigmas = _karras(10)[4:]  # img2img at denoise 0.6: the schedule's tail, from a noised image
    latent = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(9)).to(DEVICE) * 2 - 1
    x = latent + torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(8)).to(DEVICE) * sigmas[0]
    for sampler in SAMPLERS:
        _compare(sampler, model, x, sigmas, backend, extra_args=extra, **CHURN)
        _compare(sampler, model, x, sigmas, backend, callback=lambda d: None, extra_args=extra)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_inpainting_mask_in_the_denoiser(backend):
    latent = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1)).to(DEVICE) * 2 - 1
    mask = torch.zeros(1, 1, 8, 8, device=DEVICE)
    mask[..., 2:6, 2:6] = 1
    inner = UNetDenoiser().to(DEVICE)

    def masked(x, sigma):
        return inner(x, sigma) * mask + latent * (1 - mask)

    _compare("sample_heun", masked, _x(1, 20.0), _karras(), backend, **CHURN)


# -- callbacks: previews, in-place edits, interrupts ------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_preview_callback(backend):
    previews = []

    def preview(d):  # reads only: an image of the denoised estimate
        previews.append(((d["denoised"] / 2 + 0.5).clamp(0, 1) * 255).to(torch.uint8))

    _compare("sample_heun", UNetDenoiser().to(DEVICE), _x(), _karras(), backend, callback=preview, **CHURN)
    assert len(previews) == 2 * 8  # both runs, 8 steps each


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("edit", ["x", "denoised"])
def test_in_place_edits_in_the_callback_act_as_in_k_diffusion(edit, backend):
    """k-diffusion computes d before the callback and x_{i+1} after it: editing d["x"] in place moves the step,
    editing d["denoised"] does not (mutations: the callback before d, or x_{i+1} before the callback)."""

    def scale(d):
        d[edit].mul_(0.9)

    for sampler in SAMPLERS:
        out = _compare(sampler, UNetDenoiser().to(DEVICE), _x(), _karras(), backend, callback=scale, **CHURN)
        model = UNetDenoiser().to(DEVICE)  # (its constructor seeds the global RNG)
        torch.manual_seed(3)
        plain = getattr(kd, sampler)(model, _x(), _karras(), disable=True, backend=backend, **CHURN)
        assert torch.equal(out, plain) == (edit == "denoised"), "an edit of x must change the result, of D not"


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_interrupt_from_the_callback_leaves_the_rng_as_k_diffusion_does(backend):
    class Interrupted(Exception):
        pass

    def interrupt(d):
        if d["i"] == 2:
            raise Interrupted

    states = []
    for fn in (real_sampling().sample_heun, kd.sample_heun):
        torch.manual_seed(0)
        kwargs = {} if fn is real_sampling().sample_heun else {"backend": backend}
        with pytest.raises(Interrupted):
            fn(UNetDenoiser().to(DEVICE), _x(), _karras(), callback=interrupt, disable=True, **CHURN, **kwargs)
        states.append(torch.get_rng_state())
    assert torch.equal(states[1], states[0])


# -- what the model is handed -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_callback", [False, True])
def test_the_model_s_inputs_are_never_overwritten_later(backend, with_callback):
    """A ControlNet-style wrapper keeps the inputs it was given: k-diffusion hands each call its own tensor,
    and so must an eager run (the Triton backend used to reuse its buffers: 12 of 15 kept inputs changed)."""
    rec = Recorder(UNetDenoiser().to(DEVICE), keep_inputs=True)
    kd.sample_heun(rec, _x(), _karras(), disable=True, backend=backend, cuda_graph=False,
                   callback=(lambda d: None) if with_callback else None, **CHURN)
    assert len(rec.kept) == 2 * 8 - 1
    for k, (kept, at_call) in enumerate(rec.kept):
        assert_bitwise(kept, at_call, f"model input {k}, after the run")


# -- other dtypes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("x_dtype, sigmas_dtype", [
    (torch.float64, torch.float32), (torch.float16, torch.float32), (torch.bfloat16, torch.float32),
    (torch.float32, torch.float64), (torch.float32, torch.float16),
])
def test_other_dtypes_run_with_k_diffusions_bits(x_dtype, sigmas_dtype, backend):
    def denoiser(x, sigma):
        return x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)

    sigmas = _karras().to(sigmas_dtype)
    # (_compare checks the output's dtype too: k-diffusion's state takes the sigmas' dtype where it is wider)
    _compare("sample_heun", denoiser, _x(dtype=x_dtype), sigmas, backend, callback=lambda d: None, **CHURN)
    _compare("sample_euler", denoiser, _x(dtype=x_dtype), sigmas, backend, **CHURN)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_a_float64_or_float16_denoiser_keeps_its_dtype(backend):
    """k-diffusion promotes with the model's output: a float64 D makes the state float64 (the fused kernels
    hand over to the torch ops, one warning); a float16 D reaches the callback as float16."""
    inner = UNetDenoiser().to(DEVICE)
    _warn.forget()
    for dtype in (torch.float64, torch.float16):
        def typed(x, sigma, dtype=dtype):  # (k-diffusion's state becomes float64 too: the UNet gets float32)
            return inner(x.float(), sigma.float()).to(dtype)

        out = _compare("sample_heun", typed, _x(), _karras(), backend, callback=lambda d: None, **CHURN)
        assert out.dtype == torch.promote_types(dtype, torch.float32)
        _compare("sample_heun", typed, _x(), _karras(), backend, **CHURN)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton")
def test_an_explicit_fused_backend_that_cannot_give_the_bits_is_a_clear_error():
    with pytest.raises(ValueError, match="backend"):
        kd.sample_heun(_denoiser(), _x(dtype=torch.float64), _karras(), disable=True, backend="triton")
    inner = UNetDenoiser().to(DEVICE)
    with pytest.raises(ValueError, match="backend.*float64"):
        kd.sample_heun(lambda x, s: inner(x, s).double(), _x(), _karras(), disable=True, backend="triton")


def test_the_schedule_helpers_take_what_k_diffusion_takes():
    real = real_sampling()
    for n in (1, 2, 7):
        for args in ((0.03, 20.0), (0.1, 1.0, 3.0)):
            assert_bitwise(kd.get_sigmas_karras(n, *args), real.get_sigmas_karras(n, *args), f"karras {n} {args}")
        assert_bitwise(kd.get_sigmas_exponential(n, 0.03, 20.0), real.get_sigmas_exponential(n, 0.03, 20.0))


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton")
def test_auto_hands_a_float64_denoiser_over_to_the_torch_ops(monkeypatch):
    """backend="auto" where it picks the fused kernels (CUDA; here the interpreter stands in): a denoiser that
    returns float64 makes k-diffusion's state float64 at the first Euler stage, so the torch ops run the rest
    of the call, with one warning (mutation: reading the float64 output into the float32 kernels)."""
    from kve_fast import backends

    real = backends.check_backend
    monkeypatch.setattr(backends, "check_backend", lambda name, device: "triton" if name == "auto" else
                        real(name, device))
    inner = UNetDenoiser().to(DEVICE)

    def typed(x, sigma):
        return inner(x.float(), sigma.float()).double()

    _warn.forget()
    with pytest.warns(RuntimeWarning, match="torch ops run the rest"):
        out = _compare("sample_heun", typed, _x(), _karras(), "auto", **CHURN)
    assert out.dtype == torch.float64
    _compare("sample_euler", typed, _x(), _karras(), "auto", callback=lambda d: None, **CHURN)


EDITS = {
    # k-diffusion's loop reads ``sigmas`` as it goes: an in-place edit by the callback counts from the step's
    # dt (sigma_hat was made before it) and for every later step; editing d["sigma_hat"] moves the step's dt
    "all halved": (lambda d, sigmas: sigmas.mul_(0.5) if d["i"] == 1 else None, lambda: _karras()),
    "this sigma": (lambda d, sigmas: d["sigma"].mul_(0.9), lambda: _karras()),  # read again by nothing after
    "sigma_hat": (lambda d, sigmas: d["sigma_hat"].mul_(1.1) if d["i"] in (1, 4) else None, lambda: _karras()),
    "into the range": (lambda d, sigmas: sigmas[3:].clamp_(max=0.5) if d["i"] == 1 else None, lambda: _karras()),
    # the last step's kind changes: a Heun step to a nonzero sigma (SplitSigmas' first part) made an Euler step
    # to 0, and an Euler step to 0 made a Heun step
    "next to 0": (lambda d, sigmas: sigmas[-1].zero_() if d["i"] == len(sigmas) - 2 else None,
                  lambda: _karras()[:5]),
    "next from 0": (lambda d, sigmas: sigmas[-1].fill_(0.01) if d["i"] == len(sigmas) - 2 else None,
                    lambda: _karras()),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("edit", list(EDITS))
def test_a_callback_editing_sigmas_in_place_acts_as_in_k_diffusion(edit, backend):
    """Mutation: the plan not read again after a callback (``KPlan.reread`` returning None) -> the edited
    sigma_{i+1} reaches the model but dt, the Heun division and later steps keep the old values."""
    churn = {"s_churn": 1.5, "s_tmin": 0.05, "s_tmax": 0.6, "s_noise": 1.003}
    for sampler in SAMPLERS:
        outs = []
        for name, fn in (("real", getattr(real_sampling(), sampler)),
                         ("ours", lambda *a, **k: getattr(kd, sampler)(*a, backend=backend, **k))):
            change, make = EDITS[edit]
            sigmas = make()
            seen = []

            def callback(d, sigmas=sigmas, seen=seen, change=change):
                seen.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in d.items()})
                change(d, sigmas)

            torch.manual_seed(3)
            out = fn(UNetDenoiser().to(DEVICE), _x(), sigmas, callback=callback, disable=True, **churn)
            outs.append((out, sigmas, seen, torch.get_rng_state()))
        (r_out, r_sig, r_seen, r_rng), (out, sig, seen, rng) = outs
        assert torch.isfinite(r_out).all()
        assert_bitwise(out, r_out, f"{sampler}, {edit}")
        assert_bitwise(sig, r_sig, "the edited sigmas")
        assert len(seen) == len(r_seen)
        for a, b in zip(seen, r_seen):
            for key in ("x", "denoised", "sigma", "sigma_hat"):
                assert_bitwise(a[key], b[key], f"callback {key} at step {a['i']}")
        assert torch.equal(rng, r_rng)
        torch.manual_seed(3)
        plain = getattr(kd, sampler)(UNetDenoiser().to(DEVICE), _x(), make(), disable=True, backend=backend,
                                     **churn)
        assert not torch.equal(out, plain) or edit == "this sigma", "the edit must change the result"

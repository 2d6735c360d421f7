"""Models, the diffusers reference and a verbose bitwise assertion shared by the tests."""

from __future__ import annotations

import math
import os
import types

import numpy as np
import pytest
import torch

if "OMP_NUM_THREADS" not in os.environ:
    # The tests' tensors are tiny: intra-op threads only add overhead, and when other processes share the
    # cores, their spin-waits made the suite several times slower (measured: 6 minutes instead of 1 on 2
    # busy cores). Parity is unaffected: both sides of every comparison run in this process.
    torch.set_num_threads(1)
if not torch.cuda.is_available():
    # No GPU: Triton kernels run in its interpreter (numpy on the CPU). Must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
try:
    import triton  # noqa: F401
except ImportError as _exc:  # not installed (or installed without what it needs): Triton tests skip, with this reason
    TRITON_MISSING = f"needs Triton, which does not import here ({type(_exc).__name__}: {_exc})"
else:
    TRITON_MISSING = None
HAS_TRITON = TRITON_MISSING is None
# Skip marker for every test that runs the Triton backend or its kernels. Only a missing Triton (or neither a
# GPU nor the interpreter) skips: with Triton present, a kve_fast Triton module that fails to import fails.
CAN_RUN_TRITON = HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
needs_triton = pytest.mark.skipif(
    not CAN_RUN_TRITON, reason=TRITON_MISSING or "needs a GPU or TRITON_INTERPRET=1 for the Triton backend"
)
from diffusers.pipelines.deprecated.stochastic_karras_ve import KarrasVePipeline as RefPipeline
from diffusers.schedulers.deprecated.scheduling_karras_ve import KarrasVeScheduler as RefScheduler

import kve_fast
from kve_fast.oracle import GaussianScore as OracleScore
# The models and the diffusers reference runners live in kve_fast.testing (bench/ scripts use them too)
from kve_fast.testing import (  # noqa: F401
    BELOW_CAP, CUSTOM, MODELS, SMALL_SIGMAS, SMALL_SIGMAS_NO_CHURN, UNET_TERM_SCALE, FoldChannels, GaussianPlusUNet, GaussianScore, inside_share, make_generator, ncsnpp_unet,
    reference_latent, reference_pipe, reference_test_unet, run_reference,
)


def assert_bitwise(actual, expected, what: str = "output") -> None:
    """``torch.equal`` / ``np.array_equal``, and on failure: how many differ, where, and by how much."""
    a = actual if isinstance(actual, torch.Tensor) else torch.from_numpy(np.array(actual))
    e = expected if isinstance(expected, torch.Tensor) else torch.from_numpy(np.array(expected))
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert a.dtype == e.dtype, f"{what}: dtype {a.dtype} != {e.dtype}"
    if torch.equal(a, e):
        return
    a, e = a.detach().cpu(), e.detach().cpu()
    diff = a != e
    if a.is_floating_point():
        diff &= ~(torch.isnan(a) & torch.isnan(e))  # NaN where the reference has NaN is a match
        if not diff.any():
            return
    idx = diff.nonzero()[:5].tolist()
    worst = (a.double() - e.double()).abs().max().item()
    raise AssertionError(f"{what}: {int(diff.sum())} of {a.numel()} elements differ; first at {idx}; max |diff| {worst:g}")


def assert_mostly_inside(images, what: str = "images", at_least: float = 0.9) -> float:
    """Image equality proves little when pixels sit at 0 or 1 (clamped): require most strictly inside."""
    share = inside_share(images)
    assert share > at_least, f"{what}: only {share:.1%} of pixels strictly inside the image range, want > {at_least:.0%}"
    return share


# The schedule of the low-precision and channels_last tests (tests/test_precision.py, tests/test_layouts.py). Small
# noise levels keep the tiny random UNet's activations far from fp16's range (65504): at the reference's
# sigma_max = 100 its activations overflow fp16 and every pixel turns NaN, which would make equality checks vacuous.
CHURN_EVERY_STEP = {"sigma_min": 0.02, "sigma_max": 2.0, "s_churn": 10.0, "s_min": 1e-4}  # s_min: churn on every step


def assert_meaningful(x: torch.Tensor) -> None:
    """Equality of NaNs or of saturated values proves little: most values must be finite and varied."""
    assert x.dtype == torch.float32
    assert torch.isfinite(x).float().mean() > 0.99
    assert x.std() > 0.1


@pytest.fixture
def fake_graphs(monkeypatch):
    """The CUDA-graph runner on the CPU: ``KVE_FAST_FAKE_GRAPHS=1`` (``kve_fast.fake_graph.FakeGraph``, which
    records what a capture runs and reads and fails where a real graph would), real graphs where CUDA is
    available; no captures before or after the test."""
    from kve_fast import graphs

    if not torch.cuda.is_available():
        monkeypatch.setenv(graphs.FAKE_ENV_VAR, "1")
    graphs.clear_graphs()
    yield
    graphs.clear_graphs()


@pytest.fixture(scope="session")
def models():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = MODELS[name]()
        return cache[name]

    return get


def kve_pipe(unet, **scheduler_config) -> kve_fast.KarrasVePipeline:
    pipe = kve_fast.KarrasVePipeline(unet=unet, scheduler=kve_fast.KarrasVeScheduler(**scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_image_parity(unet, form: str, batch_size: int, steps: int, config: dict, seed: int,
                       backend: str = "torch") -> float:
    """kve_fast's ``np`` and ``pil`` images equal diffusers' real pipeline's, bit for bit, and most pixels
    are strictly inside the image range (so equality is about values, not about clamping). For a
    ``GaussianPlusUNet`` the images must also differ from the Gaussian score's alone (the UNet counts).
    Returns the share of float pixels strictly inside (0, 1)."""
    pipe = kve_pipe(unet, **config)
    ours = {}
    for output_type in ("np", "pil"):
        ref, _ = run_reference(unet, config, batch_size, steps, make_generator(form, seed, batch_size), output_type)
        got = pipe(batch_size, steps, make_generator(form, seed, batch_size), output_type=output_type,
                   backend=backend).images
        if output_type == "pil":
            assert len(got) == len(ref) == batch_size
            assert all(o.mode == r.mode == "RGB" and o.size == r.size for o, r in zip(got, ref))
            got, ref = np.stack([np.asarray(o) for o in got]), np.stack([np.asarray(r) for r in ref])
        else:
            assert isinstance(got, np.ndarray) and got.dtype == np.float32
        assert_bitwise(got, ref, f"{backend} backend vs diffusers, {output_type} images")
        assert_mostly_inside(ref, f"{output_type} images")
        ours[output_type] = got
    if isinstance(unet, GaussianPlusUNet):
        pure = {t: run_reference(unet.gaussian, config, batch_size, steps, make_generator(form, seed, batch_size), t)[0]
                for t in ("np", "pil")}
        pure["pil"] = np.stack([np.asarray(r) for r in pure["pil"]])
        for t in ("np", "pil"):
            changed = float((ours[t] != pure[t]).mean())
            assert changed > 0.5, f"the UNet term changes only {changed:.1%} of the {t} pixels"
    return inside_share(ours["np"])



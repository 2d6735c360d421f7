"""Each front door decides how a call runs in one place and hands the decision down: the ``backend`` argument
resolved once for the device (``backends.check_backend``), the step backend made from that resolved name, graphs
decided once (``graphs.decide``), with the mode the front checked. (That the outputs, warnings and errors are the
originals' is tested in tests/test_pipeline.py, tests/test_sampler.py and tests/test_k_diffusion*.py.)"""

from __future__ import annotations

import pytest
import torch

import kve_fast
from kve_fast import backends, graphs, k_diffusion, sampler
from kve_fast.testing import NearFreeScore


@pytest.fixture
def decisions(monkeypatch):
    """What the fronts ask of the modules below them during a call, in order."""
    seen = {"check_backend": [], "make_backend": [], "decide": []}
    check, decide = backends.check_backend, graphs.decide

    def counted_check(name, device):
        seen["check_backend"].append(name)
        return check(name, device)

    def counted_decide(mode, *args, **kwargs):
        seen["decide"].append(mode)
        return decide(mode, *args, **kwargs)

    monkeypatch.setattr(backends, "check_backend", counted_check)
    monkeypatch.setattr(graphs, "decide", counted_decide)
    for module in (sampler, k_diffusion):
        def counted_make(name, *args, _make=module.make_backend, **kwargs):
            seen["make_backend"].append(name)
            return _make(name, *args, **kwargs)

        monkeypatch.setattr(module, "make_backend", counted_make)
    return seen


def _denoiser(x, sigma):
    return x * 0.5


FRONTS = {
    "sample_karras_ve": lambda: kve_fast.sample_karras_ve(
        NearFreeScore(4), kve_fast.KarrasVeScheduler(), (1, 3, 4, 4), 3, cuda_graph="auto"),
    "sample_karras_ve_sigmas": lambda: kve_fast.sample_karras_ve_sigmas(
        NearFreeScore(4), torch.ones(1, 3, 4, 4), [2.0, 1.0, 0.0], s_churn=1.0, cuda_graph=False),
    "KarrasVePipeline": lambda: kve_fast.KarrasVePipeline(NearFreeScore(4), kve_fast.KarrasVeScheduler())(
        1, 3, output_type="latent"),
    "k_diffusion.sample_heun": lambda: k_diffusion.sample_heun(
        _denoiser, torch.ones(1, 3, 4, 4), k_diffusion.get_sigmas_karras(3, 0.1, 2.0), disable=True, s_churn=1.0),
    "k_diffusion.sample_euler": lambda: k_diffusion.sample_euler(
        _denoiser, torch.ones(1, 3, 4, 4), k_diffusion.get_sigmas_karras(3, 0.1, 2.0), disable=True,
        cuda_graph="auto"),
}
MODES = {"sample_karras_ve": "auto", "sample_karras_ve_sigmas": False, "KarrasVePipeline": "auto",
         "k_diffusion.sample_heun": graphs.KDIFFUSION_DEFAULT_MODE, "k_diffusion.sample_euler": "auto"}


@pytest.mark.parametrize("front", sorted(FRONTS))
def test_each_front_decides_backend_and_graphs_once(decisions, front):
    """Mutations (each fails): make_backend resolving its name again (check_backend twice); the k-diffusion
    front handing make_backend its ``backend`` argument unresolved; graphs decided with the ``cuda_graph``
    argument instead of the front's mode (None for the default)."""
    FRONTS[front]()
    assert decisions == {"check_backend": ["auto"], "make_backend": ["torch"], "decide": [MODES[front]]}

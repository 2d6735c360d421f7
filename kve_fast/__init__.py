"""kve_fast: the stochastic sampler of Karras et al. (2022), Algorithm 2, for VE score models.

Fast and, in float32, bit-exact with diffusers' ``KarrasVePipeline``.

Importing the package is cheap: torch, Triton and diffusers load when a name below is first used
(``kve_fast.KarrasVePipeline`` and ``kve_fast.KarrasVeScheduler`` bring diffusers in, the sampler
functions only torch).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "KarrasVePipeline": "pipeline",
    "KarrasVeScheduler": "karras_ve_scheduler",
    "KarrasVeOutput": "karras_ve_scheduler",
    "sample_karras_ve": "sampler",
    "sample_karras_ve_sigmas": "sampler",
    "load_model": "loading",
}
__all__ = list(_EXPORTS) + ["load_pipeline"]


def load_pipeline(name_or_path="digits", device=None, *, download: bool = False, **scheduler_settings):
    """A ``KarrasVePipeline`` for a bundled model name, a local folder or a Hugging Face Hub id (from the local
    cache; ``download=True`` fetches it first): ``KarrasVePipeline.from_pretrained``, see ``load_model``."""
    from .pipeline import KarrasVePipeline

    return KarrasVePipeline.from_pretrained(name_or_path, device=device, download=download, **scheduler_settings)


_SUBMODULES = ("k_diffusion", "ncsnpp", "graphs", "threads")
_MOVED = {
    "sample_heun": "kve_fast.sample_heun was a score-convention sampler under k-diffusion's name; use "
                   "kve_fast.sample_karras_ve_sigmas(model, x, sigmas) (the reference pipeline's score models) or "
                   "kve_fast.k_diffusion.sample_heun (k-diffusion's denoisers, its exact signature and bits)",
}


def __getattr__(name: str):
    if name in _MOVED:
        raise AttributeError(_MOVED[name])
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kve_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))

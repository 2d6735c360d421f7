"""kve_fast: the stochastic sampler of Karras et al. (2022), Algorithm 2, for VE score models.

Fast and, in float32, bit-exact with diffusers' ``KarrasVePipeline``.
"""

from .loading import load_model, load_pipeline
from .pipeline import KarrasVePipeline
from .sampler import sample_heun, sample_karras_ve
from .scheduler import KarrasVeOutput, KarrasVeScheduler

__all__ = ["KarrasVePipeline", "KarrasVeScheduler", "KarrasVeOutput", "sample_karras_ve", "sample_heun",
           "load_model", "load_pipeline"]
__version__ = "0.1.0"

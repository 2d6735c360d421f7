"""The names every entry point accepts, in one place (the CLI reads them too).

Import-light on purpose: no torch, no diffusers, so ``kve-fast --help`` answers at once.
"""

SCHEDULES = ("diffusers", "ve", "edm")
BACKENDS = ("auto", "torch", "triton", "cuda")
NOISE_MODES = ("exact", "fast")
SOLVERS = ("heun", "euler")
OUTPUT_TYPES = ("pil", "np", "numpy", "pt", "latent")
CALLBACK_TENSOR_INPUTS = ("sample", "pred_original_sample")
# The reference schedule (sigma from sigma_max**2 down to sigma_min**2) needs about this many steps
# before its images stop being noise (the digits model: 10 steps pure noise, 20 still noisy).
REFERENCE_SCHEDULE_MIN_STEPS = 30

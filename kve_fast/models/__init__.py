"""Small models bundled with kve_fast, for offline sampling and quality checks.

``DIGITS_MODEL_DIR`` is a diffusers-format folder (``UNet2DModel`` + ``KarrasVeScheduler`` config) of a
1-channel 8x8 VE score model trained on scikit-learn's handwritten digits (see ``digits/TRAINING.md``).
"""

from __future__ import annotations

import os

DIGITS_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits")

__all__ = ["DIGITS_MODEL_DIR"]

"""The one conversion from samples to images: ``(x / 2 + 0.5).clamp(0, 1)``, then PIL's rounding.

The Triton kernels fuse the same arithmetic into their last step (``ops/step_triton.py``); the tests
hold them to these functions bit for bit.
"""

from __future__ import annotations


def to_image(sample, kind: str = "float"):
    """The pipeline's final map from [-1, 1] to a clamped [0, 1] image (BCHW float32).

    ``kind="uint8"`` continues as diffusers' ``numpy_to_pil`` does, ``(image * 255).round()`` as uint8,
    BHWC (torch rounds half to even like numpy, and multiplies by 255 in float32 like numpy).
    """
    import torch

    image = (sample / 2 + 0.5).clamp(0, 1)
    if kind == "uint8":
        image = (image.permute(0, 2, 3, 1) * 255).round().to(torch.uint8)
    return image


def uint8_to_pil(images) -> list:
    """BHWC uint8 images (numpy or torch) to PIL images, as ``numpy_to_pil`` does (1 channel: mode L)."""
    import numpy as np
    from PIL import Image

    images = np.asarray(images.cpu() if hasattr(images, "cpu") else images)
    if images.shape[-1] == 1:
        return [Image.fromarray(image.squeeze(-1), mode="L") for image in images]
    return [Image.fromarray(image) for image in images]

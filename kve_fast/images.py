"""The one conversion from samples to images: ``(x / 2 + 0.5).clamp(0, 1)``, then PIL's rounding; the channel
counts images are made of; images tiled into a grid.

The Triton kernels fuse the same arithmetic into their last step (``ops/step_triton.py``); the tests
hold them to these functions bit for bit.
"""

from __future__ import annotations

import math


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


IMAGE_CHANNELS = (1, 3, 4)  # grey, RGB, RGBA


def check_channels(channels: int) -> None:
    """The rule every image output follows (``kve-fast sample`` and ``generate``, ``generate_images``): a model's
    images have 1, 3 or 4 channels. ``ValueError`` otherwise."""
    if channels not in IMAGE_CHANNELS:
        raise ValueError(f"the model's images have {channels} channels; only 1 (grey), 3 (RGB) or 4 (RGBA) make "
                         "image files")


def grid_size(n: int, ncols: int, height: int, width: int, scale: int, pad: int = 2) -> tuple[int, int]:
    """The (width, height) of ``make_grid`` for ``n`` images of ``height`` x ``width`` at ``scale``."""
    nrows = math.ceil(n / ncols)
    return ncols * (width * scale + pad) + pad, nrows * (height * scale + pad) + pad


def make_grid(arrays, ncols: int, scale: int, pad: int = 2):
    """Images (BHWC uint8, numpy or torch) tiled into one PIL image, ``ncols`` per row, on white."""
    from PIL import Image

    tiles = [scaled(tile, scale) for tile in uint8_to_pil(arrays)]
    w, h = tiles[0].size
    width, height = grid_size(len(tiles), ncols, h, w, 1, pad)
    grid = Image.new(tiles[0].mode, (width, height), color=(255,) * len(tiles[0].getbands()))
    for k, tile in enumerate(tiles):
        r, c = divmod(k, ncols)
        grid.paste(tile, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def scaled(image, scale: int):
    """A PIL image upscaled ``scale`` times, nearest neighbour."""
    from PIL import Image

    return image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image

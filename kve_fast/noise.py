"""Noise sources: objects the sampler loop asks for noise (EDM's and k-diffusion's "randomness is an input").

``ReferenceNoise`` draws exactly the stream diffusers' pipeline draws: the same generator(s), in the
same order, on the same device, so results are bit-identical to the reference.
"""

from __future__ import annotations

import torch


def draw_randn(shape, generator=None, device=None) -> torch.Tensor:
    """``torch.randn`` as diffusers' ``randn_tensor`` draws it, on the generator's device.

    ``generator`` is None (the global RNG of ``device``, the CPU by default), a ``torch.Generator``, or
    a list with one generator per sample (each sample drawn on its own, then concatenated). CPU
    generators always draw on the CPU; a CUDA generator draws on its own device (the reference rejects
    it). The result is *not* moved: callers move it like the reference does.
    """
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, (list, tuple)):
        one = (1,) + tuple(shape[1:])
        return torch.cat([torch.randn(one, generator=g, device=g.device) for g in generator], dim=0)
    if generator is not None:
        return torch.randn(shape, generator=generator, device=generator.device)
    return torch.randn(shape, device=device)


def generator_device(generator) -> torch.device | None:
    if generator is None:
        return None
    if isinstance(generator, (list, tuple)):
        return generator[0].device
    return generator.device


class ReferenceNoise:
    """The reference's noise stream ("exact" mode).

    The initial sample is ``randn_tensor(shape, generator, device)``: with ``generator=None`` it is
    drawn by ``device``'s global RNG, else by the generator(s) and moved to ``device``. Every step then
    draws ``randn(shape)`` from the same generator(s) (the global *CPU* RNG when ``generator=None``) and
    moves it to ``device``. Noise is drawn every step, also where gamma_i = 0, as the reference does.
    """

    mode = "exact"

    def __init__(self, shape, generator, device):
        self.shape = tuple(shape)
        self.generator = generator
        self.device = torch.device(device)

    def initial(self) -> torch.Tensor:
        """Unscaled x_0 noise, on ``device``."""
        device = self.device if self.generator is None else None
        return draw_randn(self.shape, self.generator, device).to(self.device)

    def step(self) -> torch.Tensor:
        """Unscaled churn noise for the next step (Algorithm 2, line 5: eps ~ N(0, I)), on ``device``."""
        return draw_randn(self.shape, self.generator).to(self.device)

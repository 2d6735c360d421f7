"""Noise sources: objects the sampler loop asks for noise (EDM's and k-diffusion's "randomness is an input").

- ``ReferenceNoise`` ("exact"): exactly the stream diffusers' pipeline draws: the same generator(s),
  in the same order, on the same device, so results are bit-identical to the reference. On CUDA with
  explicit generators, a background thread draws the next steps' noise into pinned memory while the
  GPU works, and copies it without blocking.
- ``DeviceNoise`` ("fast"): one int seed per step, from which the step backend generates the noise on
  the device (Philox inside the Triton churn kernel; torch's device RNG in the torch backend). Nothing
  is drawn on the host. Deterministic for a given seed, batch, device and backend; not the reference's
  stream.
"""

from __future__ import annotations

import queue
import threading

import numpy as np
import torch

from .options import NOISE_MODES

__all__ = ["NOISE_MODES", "draw_randn", "ReferenceNoise", "DeviceNoise", "make_noise"]
PREFETCH = True  # exact mode on CUDA with CPU generators: draw ahead on a thread (False: draw in the loop)


def draw_randn(shape, generator=None, device=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.randn`` as diffusers' ``randn_tensor`` draws it, on the generator's device.

    ``generator`` is None (the global RNG of ``device``, the CPU by default), a ``torch.Generator``, or
    a list with one generator per sample (each sample drawn on its own, then concatenated). CPU
    generators always draw on the CPU; a CUDA generator draws on its own device (the reference rejects
    it). The result is *not* moved: callers move it like the reference does. ``out`` (same shape, on
    the generator's device) receives the values instead of a new tensor.
    """
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, (list, tuple)):
        one = (1,) + tuple(shape[1:])
        if out is not None:
            for i, g in enumerate(generator):
                torch.randn(one, generator=g, out=out[i : i + 1])
            return out
        return torch.cat([torch.randn(one, generator=g, device=g.device) for g in generator], dim=0)
    if generator is not None:
        if out is not None:
            return torch.randn(tuple(shape), generator=generator, out=out)
        return torch.randn(shape, generator=generator, device=generator.device)
    return torch.randn(shape, device=device)


def _generators(generator) -> list[torch.Generator]:
    if generator is None:
        return []
    return list(generator) if isinstance(generator, (list, tuple)) else [generator]


class ReferenceNoise:
    """The reference's noise stream ("exact" mode).

    The initial sample is ``randn_tensor(shape, generator, device)``: with ``generator=None`` it is
    drawn by ``device``'s global RNG, else by the generator(s) and moved to ``device``. Every step then
    draws ``randn(shape)`` from the same generator(s) (the global *CPU* RNG when ``generator=None``) and
    moves it to ``device``. Noise is drawn every step, also where gamma_i = 0, as the reference does.

    ``prefetch`` (CUDA, CPU generators only) draws up to ``depth`` steps ahead on a thread into pinned
    memory; ``close()`` then rewinds the generators to where the consumed draws left them, so their
    state after a run (also an interrupted one) is the reference's.
    """

    mode = "exact"

    def __init__(self, shape, generator, device, steps: int = 0, prefetch: bool | None = None, depth: int = 2):
        self.shape = tuple(shape)
        self.generator = generator
        self.device = torch.device(device)
        gens = _generators(generator)
        if prefetch is None:
            prefetch = PREFETCH and self.device.type == "cuda" and bool(gens) and all(g.device.type == "cpu" for g in gens)
        self._prefetch = prefetch and steps > 0
        self._steps, self._depth = steps, depth
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._consumed_state = None

    def initial(self) -> torch.Tensor:
        """Unscaled x_0 noise, on ``device``."""
        device = self.device if self.generator is None else None
        x = draw_randn(self.shape, self.generator, device).to(self.device)
        if self._prefetch:
            self._start()
        return x

    def step(self) -> torch.Tensor:
        """Unscaled churn noise for the next step (Algorithm 2, line 5: eps ~ N(0, I)), on ``device``."""
        if self._thread is None:
            return draw_randn(self.shape, self.generator).to(self.device)
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        host, state = item
        self._consumed_state = state
        return host.to(self.device, non_blocking=True)

    # -- prefetching ---------------------------------------------------------------------------------

    def _states(self):
        return [g.get_state() for g in _generators(self.generator)]

    def _start(self) -> None:
        self._consumed_state = self._states()
        self._queue = queue.Queue(maxsize=self._depth)
        self._thread = threading.Thread(target=self._run, name="kve_fast-noise", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for _ in range(self._steps):
                if self._stop.is_set():
                    return
                host = torch.empty(self.shape, dtype=torch.float32, pin_memory=self.device.type == "cuda")
                draw_randn(self.shape, self.generator, out=host)
                self._put((host, self._states()))
        except BaseException as exc:  # surfaced to the sampler at its next draw
            self._put(exc)

    def _put(self, item) -> None:
        """Queue ``item`` unless the run has stopped (so a full queue never blocks ``close``)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Stop prefetching and leave the generators as the consumed draws left them."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        for g, state in zip(_generators(self.generator), self._consumed_state):
            g.set_state(state)


class DeviceNoise:
    """Fast mode: x_0 from torch's RNG on ``device``, then one int seed per step for on-device noise.

    A base seed is drawn from ``generator`` (each generator of a list, combined) or, for None, from
    the global CPU RNG, so ``torch.manual_seed`` and seeded generators make runs reproducible.
    """

    mode = "fast"

    def __init__(self, shape, generator, device, steps: int = 0):
        self.shape = tuple(shape)
        self.device = torch.device(device)
        gens = _generators(generator)
        if gens:
            words = [int(torch.randint(0, 2**31 - 1, (1,), generator=g, device=g.device)) for g in gens]
        else:
            words = [int(torch.randint(0, 2**31 - 1, (1,)))]
        seeds = np.random.SeedSequence(words).generate_state(steps + 1, dtype=np.uint32) & 0x7FFFFFFF
        self._seeds = [int(s) for s in seeds]
        self._next = 1

    def initial(self) -> torch.Tensor:
        g = torch.Generator(self.device).manual_seed(self._seeds[0])
        return torch.randn(self.shape, generator=g, device=self.device)

    def step(self) -> int:
        seed = self._seeds[self._next]
        self._next += 1
        return seed

    def close(self) -> None:
        pass


def make_noise(mode: str, shape, generator, device, steps: int):
    if mode == "exact":
        return ReferenceNoise(shape, generator, device, steps)
    return DeviceNoise(shape, generator, device, steps)


class RandnLikeNoise:
    """k-diffusion's stream: ``torch.randn_like(x)`` from the global RNG of x's device, every step (also
    where gamma = 0), in x's layout, so the values are k-diffusion's element for element."""

    mode = "exact"

    def __init__(self, template: torch.Tensor):
        self.template = template

    def step(self) -> torch.Tensor:
        return torch.randn_like(self.template)

    def close(self) -> None:
        pass

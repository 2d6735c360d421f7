"""Noise sources: objects the sampler loop asks for noise (EDM's and k-diffusion's "randomness is an input").

- ``ReferenceNoise`` ("exact"): exactly the stream diffusers' pipeline draws: the same generator(s),
  in the same order, on the same device, so results are bit-identical to the reference. On CUDA with
  explicit generators, a background thread draws the next steps' noise into pinned memory while the
  GPU works, and copies it without blocking.
- ``DeviceNoise`` ("fast"): per-sample noise keys (``StepKeys``: one 63-bit key per sample and step),
  from which the step backend generates the noise on the device (Philox inside the Triton kernels,
  keyed per sample and counted by the position within the sample; a torch device generator per sample
  in the torch backend). Nothing but the keys is made on the host. Sample b's noise depends only on
  its key stream: on its own generator when ``generator`` is a list (so an image depends on its seed,
  not on the batch it is in), else on the one generator's draw and b. Deterministic for a given seed,
  device and backend; not the reference's stream.
"""

from __future__ import annotations

import queue
import threading
from typing import NamedTuple

import numpy as np
import torch

from .options import NOISE_MODES

__all__ = ["NOISE_MODES", "draw_randn", "ReferenceNoise", "DeviceNoise", "StepKeys", "sample_keys", "CallerNoise",
           "per_sample_randn", "make_noise"]
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

    def step(self, like: torch.Tensor | None = None) -> torch.Tensor:
        """Unscaled churn noise for the next step (Algorithm 2, line 5: eps ~ N(0, I)), on ``device`` (``like``:
        the sample it churns, unused: the reference draws float32 ``randn(shape)``)."""
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


_MASK63 = np.uint64((1 << 63) - 1)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment


def _mix64(z) -> np.ndarray:
    """splitmix64's output function, elementwise on uint64 (a bijection: distinct inputs, distinct outputs)."""
    z = np.asarray(z, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def sample_keys(words, index, steps: int) -> np.ndarray:
    """The noise keys of a run: an int64 array of shape ``(steps + 1, B)``, all in [0, 2**63).

    Column b belongs to sample b and depends only on ``(words[b], index[b])`` (a word drawn from the
    sample's generator, and its index within that generator's samples); row 0 keys the initial noise
    x_0 and row k the churn noise of step k. Each column is splitmix64's stream from a start mixed from
    the pair (``key_starts``), so columns of different pairs do not overlap; ``key_rows`` gives any rows.
    """
    return key_rows(key_starts(words, index), 0, steps + 1)


def key_starts(words, index) -> np.ndarray:
    """Each sample's splitmix64 start, mixed from its ``(words[b], index[b])`` (see ``sample_keys``)."""
    words = np.asarray(words, dtype=np.uint64).reshape(-1)
    index = np.asarray(index, dtype=np.uint64).reshape(-1)
    with np.errstate(over="ignore"):
        return _mix64(_mix64(words) + index * _GOLDEN)


def key_rows(start: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Rows ``lo .. hi - 1`` of ``sample_keys`` for the samples' ``start`` (``key_starts``): int64 ``(hi - lo, B)``."""
    with np.errstate(over="ignore"):
        counters = np.arange(lo + 1, hi + 1, dtype=np.uint64)[:, None] * _GOLDEN
        keys = _mix64(start[None, :] + counters) & _MASK63
    return keys.astype(np.int64)


def per_sample_randn(keys, shape, device) -> torch.Tensor:
    """``torch.randn(shape)`` with sample b drawn by its own ``torch.Generator(device).manual_seed(keys[b])``.

    Each sample's values depend only on its key (and the device's generator: Philox on CUDA, the
    Mersenne Twister on the CPU, which uses the low 32 bits of a key).
    """
    device = torch.device(device)
    out = torch.empty(tuple(shape), dtype=torch.float32, device=device)
    one = (1,) + tuple(shape[1:])
    for b, key in enumerate(keys):
        g = torch.Generator(device).manual_seed(int(key))
        torch.randn(one, generator=g, out=out[b : b + 1])
    return out


class StepKeys(NamedTuple):
    """One step's fast-mode noise: one key per sample, on the host (for torch generators) and on the device
    (for the Triton kernels, which key Philox per sample and count by the position within the sample)."""

    host: np.ndarray  # (B,) int64
    device: torch.Tensor  # (B,) int64, on the sampling device


def _draw_word(generator) -> int:
    """One 63-bit draw from ``generator`` (None: the global CPU RNG)."""
    if generator is None:
        return int(torch.randint(0, 2**63 - 1, (1,)))
    return int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=generator.device))


KEY_CHUNK = 1024  # fast noise's keys are made (and copied to the device) this many steps at a time


class DeviceNoise:
    """Fast mode: per-sample keys (``sample_keys``) for x_0 and for every step's on-device noise.

    ``generator`` a list (one per sample): sample b's keys come from one draw of ``generator[b]`` alone,
    so its noise, and its image, do not depend on the batch it is in or on its place there. A single
    generator, or None (the global CPU RNG, so ``torch.manual_seed`` makes runs reproducible): one draw,
    and the sample's index. A list of one generator is the same as that generator.

    x_0 is drawn per sample by a device generator seeded with the sample's row-0 key
    (``per_sample_randn``), the same on every backend; ``step()`` returns the next step's ``StepKeys``.
    """

    mode = "fast"

    def __init__(self, shape, generator, device, steps: int = 0):
        self.shape = tuple(shape)
        self.device = torch.device(device)
        self.steps = steps
        batch = self.shape[0]
        gens = _generators(generator)
        if len(gens) > 1:
            words, index = [_draw_word(g) for g in gens], np.zeros(batch, dtype=np.uint64)
        else:
            words, index = [_draw_word(gens[0] if gens else None)] * batch, np.arange(batch, dtype=np.uint64)
        self._start = key_starts(words, index)
        self._chunk = None  # (first row, host rows, device rows): KEY_CHUNK steps' keys at a time
        self._next = 1

    @property
    def keys(self) -> np.ndarray:
        """All the run's keys, ``sample_keys``' ``(steps + 1, B)`` (to look at: a run makes them a chunk at a time)."""
        return key_rows(self._start, 0, self.steps + 1)

    def initial(self) -> torch.Tensor:
        return per_sample_randn(key_rows(self._start, 0, 1)[0], self.shape, self.device)

    def step(self, like: torch.Tensor | None = None) -> StepKeys:
        k = self._next
        self._next += 1
        chunk = self._chunk
        if chunk is None or k >= chunk[0] + len(chunk[1]):  # one small copy per KEY_CHUNK steps
            host = key_rows(self._start, k, max(min(k + KEY_CHUNK, self.steps + 1), k + 1))
            chunk = self._chunk = (k, host, torch.from_numpy(host).to(self.device))
        return StepKeys(chunk[1][k - chunk[0]], chunk[2][k - chunk[0]])

    def close(self) -> None:
        pass


class Draw:
    """One churn's noise, drawn from ``source`` when first asked for (``get(like)``, with the sample it churns),
    so that a stage that may not need it still draws it, in the order the stages run."""

    __slots__ = ("source", "value")

    def __init__(self, source):
        self.source, self.value = source, None

    def get(self, like: torch.Tensor | None = None):
        if self.value is None:
            self.value = self.source.step(like)
        return self.value


def make_noise(mode: str, shape, generator, device, steps: int):
    if mode == "exact":
        return ReferenceNoise(shape, generator, device, steps)
    return DeviceNoise(shape, generator, device, steps)


class RandnLikeNoise:
    """k-diffusion's stream: ``torch.randn_like(x)`` from the global RNG of x's device, every step (also
    where gamma = 0), like the sample it churns (``like``: its dtype, which k-diffusion's arithmetic can
    promote along the run, and its layout; else ``template``), so the values are k-diffusion's element for
    element."""

    mode = "exact"

    def __init__(self, template: torch.Tensor):
        self.template = template

    def step(self, like: torch.Tensor | None = None) -> torch.Tensor:
        return torch.randn_like(self.template if like is None else like)

    def close(self) -> None:
        pass


class CallerNoise:
    """NVlabs' samplers' stream: the caller's ``randn_like(x)`` (their scripts' per-seed ``randn_like``, or
    ``torch.randn_like`` on the global RNG), called where the original calls it with a tensor of the state's shape,
    dtype, layout, device and strides (``like``, else ``template``; its values are those of the state only with
    the torch step backend). What it returns must be a tensor of that shape, dtype and device: else a TypeError or
    ValueError naming ``randn_like``, at that draw."""

    mode = "exact"

    def __init__(self, randn_like, template: torch.Tensor):
        self.randn_like, self.template = randn_like, template

    def step(self, like: torch.Tensor | None = None) -> torch.Tensor:
        like = self.template if like is None else like
        eps = self.randn_like(like)
        if not isinstance(eps, torch.Tensor) or eps.dtype != like.dtype:
            got = eps.dtype if isinstance(eps, torch.Tensor) else type(eps).__name__
            raise TypeError(f"`randn_like` must return a tensor of its input's dtype {like.dtype}, got {got}")
        if eps.shape != like.shape or eps.device != like.device:
            raise ValueError(f"`randn_like` must return a tensor of its input's shape {tuple(like.shape)} on "
                             f"{like.device}, got {tuple(eps.shape)} on {eps.device}")
        return eps

    def close(self) -> None:
        pass

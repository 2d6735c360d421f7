"""What the EDM/EDM2 drop-in tests share: the generators' states compared, a recording ``randn_like``, a net that
raises at a given call, and the check that a sample says something (not all one value)."""

from __future__ import annotations

import torch

from kve_fast.edm_testing import SeedGenerators

SEEDS = [3, 9]


def same_states(ours: SeedGenerators, theirs: SeedGenerators) -> bool:
    """Every per-seed generator in the same state."""
    return all(torch.equal(a, b) for a, b in zip(ours.get_state(), theirs.get_state()))


def informative(sample: torch.Tensor) -> None:
    """A parity check on ``sample`` can fail: finite, and far from one value everywhere."""
    assert bool(torch.isfinite(sample).all()), "the sample is not finite"
    assert sample.unique().numel() > sample.numel() // 2, "the sample is mostly one value"


class Logged:
    """``randn_like`` of ``rnd`` (or ``torch.randn_like``), logging each call into ``log`` (shared with
    ``RecordingNet``s, so the order of draws and net calls shows) with the tensor's metadata."""

    def __init__(self, log: list, rnd: SeedGenerators | None = None):
        self.log, self.rnd = log, rnd

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append({"name": "randn_like", "dtype": x.dtype, "shape": tuple(x.shape), "stride": x.stride()})
        return torch.randn_like(x) if self.rnd is None else self.rnd.randn_like(x)


class Boom(RuntimeError):
    pass


class RaisesAt(torch.nn.Module):
    """``net``, raising ``Boom`` at its ``at``-th call (counted from 1), or at every call (``at`` None: a capture
    fails on it, and so does an eager run)."""

    def __init__(self, net, at: int | None):
        super().__init__()
        self.net, self.at, self.calls = net, at, 0

    def __getattr__(self, item):
        try:
            return super().__getattr__(item)
        except AttributeError:
            return getattr(self._modules["net"], item)

    def forward(self, *args):
        self.calls += 1
        if self.at is None or self.calls == self.at:
            raise Boom(f"the net fails at call {self.calls}")
        return self.net(*args)


def names(log: list) -> list:
    return [entry["name"] for entry in log]

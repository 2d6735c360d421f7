"""Argument checks shared by the scheduler, the sampler loop and the pipeline.

Every check raises before any work is done and names the offending argument.
"""

from __future__ import annotations

import math
import numbers

import torch


def check_int(name: str, value, minimum: int) -> int:
    """Return ``value`` as an int if it is an integer (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    return int(value)


def check_real(name: str, value, *, minimum: float | None = None, positive: bool = False) -> float:
    """Check that ``value`` is a finite real number (not a bool), optionally >= ``minimum`` or > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__} ({value!r})")
    if not math.isfinite(float(value)):
        raise ValueError(f"`{name}` must be finite, got {value}")
    if positive and not value > 0:
        raise ValueError(f"`{name}` must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    return value


def check_generator(generator, batch_size: int):
    """Check ``generator``: None, a ``torch.Generator``, or a list of ``batch_size`` of them on one device."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch_size:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators but `batch_size` is {batch_size}: "
                "pass one generator per sample (or a single torch.Generator for the whole batch)"
            )
        for i, g in enumerate(generator):
            if not isinstance(g, torch.Generator):
                raise TypeError(f"`generator[{i}]` must be a torch.Generator, got {type(g).__name__}")
        if len({g.device for g in generator}) > 1:
            raise ValueError("`generator` mixes devices: all generators in the list must be on one device")
        return list(generator)
    raise TypeError(
        f"`generator` must be None, a torch.Generator or a list of them, got {type(generator).__name__}"
    )

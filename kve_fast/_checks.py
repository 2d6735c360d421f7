"""Argument checks shared by the scheduler, the sampler loop and the pipeline.

Every check raises before any work is done and names the offending argument.
"""

from __future__ import annotations

import math
import numbers

import torch


INT64_MAX = 2**63 - 1  # torch's sizes, counts and integer scalars are int64


def check_int(name: str, value, minimum: int, maximum: int = INT64_MAX) -> int:
    """Return ``value`` as an int if it is an integer (not a bool; numpy's too) in [``minimum``, ``maximum``]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    if value > maximum:
        limit = "2**63 - 1, what torch's int64 sizes and counts hold" if maximum == INT64_MAX else maximum
        raise ValueError(f"`{name}` must be <= {limit}, got {value}")
    return int(value)


def check_shape(name: str, shape) -> tuple:
    """``shape`` as a tuple of ints >= 1 (each named ``name[k]``) of a float32 tensor torch can index."""
    shape = tuple(check_int(f"{name}[{k}]", d, 1) for k, d in enumerate(shape))
    if math.prod(shape) * 4 > INT64_MAX:
        raise ValueError(f"`{name}` {shape} holds more float32 values than a tensor can (2**63 - 1 bytes)")
    return shape


def check_real(name: str, value, *, minimum: float | None = None, positive: bool = False,
               finite: bool = True) -> float:
    """Check that ``value`` is a real number: an int, a float or a numpy real scalar (not a bool), not NaN, and
    finite unless ``finite`` is False; optionally >= ``minimum`` or > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__} ({value!r})")
    if not isinstance(value, numbers.Integral) and not math.isfinite(float(value)):
        if finite or math.isnan(float(value)):
            raise ValueError(f"`{name}` must be {'finite' if finite else 'a number, not NaN'}, got {value}")
    if positive and not value > 0:
        raise ValueError(f"`{name}` must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    return value


def check_bound(name: str, value, *, minimum: float | None = None, finite: bool = False):
    """``check_real`` for a bound torch compares with tensors (``s_tmin``, ``s_tmax``): infinite unless ``finite``;
    an integer must fit int64 (torch compares ints through int64) and is returned as an int (torch compares no
    numpy unsigned ints)."""
    check_real(name, value, minimum=minimum, finite=finite)
    if isinstance(value, numbers.Integral):
        if not -INT64_MAX - 1 <= value <= INT64_MAX:
            raise ValueError(f"`{name}` is an int of {len(str(abs(int(value))))} digits, beyond int64 (torch compares "
                             "ints through int64); pass a float")
        return int(value)
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

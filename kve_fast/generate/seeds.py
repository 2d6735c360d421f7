"""Seeds: parsed from text, kept as ranges (never a list), split among processes, and the file of each."""

from __future__ import annotations

import bisect
import itertools
import re

SEED_LIMIT = 2**32  # torch's CPU generator keeps only the low 32 bits of a seed: larger ones repeat images
MAX_SEEDS = 10_000_000
SUBDIR_SIZE = 1000
_SEED_PART = re.compile(r"[ \t]*([0-9]+)(?:[ \t]*-[ \t]*([0-9]+))?[ \t]*")  # ASCII digits and blanks only


class Seeds:
    """Seeds as sorted, disjoint, inclusive ranges: counted, tested and walked without a list of them."""

    def __init__(self, ranges):
        merged: list[list[int]] = []
        for lo, hi in sorted((int(lo), int(hi)) for lo, hi in ranges):
            if merged and lo <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        self.ranges = tuple((lo, hi) for lo, hi in merged)
        self._starts = [lo for lo, _ in self.ranges]
        self._before = list(itertools.accumulate((hi - lo + 1 for lo, hi in self.ranges), initial=0))

    @classmethod
    def from_ints(cls, seeds) -> "Seeds":
        return cls((s, s) for s in seeds)

    def __len__(self) -> int:
        return self._before[-1]

    def __iter__(self):
        return itertools.chain.from_iterable(range(lo, hi + 1) for lo, hi in self.ranges)

    def __contains__(self, seed) -> bool:
        k = bisect.bisect_right(self._starts, seed) - 1
        return k >= 0 and seed <= self.ranges[k][1]

    def index(self, seed: int) -> int:
        """The place of ``seed`` in the sorted seeds (``ValueError`` if it is not one)."""
        k = bisect.bisect_right(self._starts, seed) - 1
        if k < 0 or seed > self.ranges[k][1]:
            raise ValueError(f"{seed} is not one of the seeds")
        return self._before[k] + seed - self.ranges[k][0]

    def share(self, rank: int, world: int):
        """Rank ``rank``'s seeds of ``world``: every ``world``-th from place ``rank`` (an iterator)."""
        return itertools.islice(iter(self), rank, None, world)

    def __eq__(self, other) -> bool:
        return isinstance(other, Seeds) and self.ranges == other.ranges

    def __repr__(self) -> str:
        return "Seeds(" + ",".join(f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in self.ranges) + ")"


def parse_seeds(text: str) -> Seeds:
    """``"0-49999"``, ``"7"``, ``"0,5,10-19"``: the seeds (ASCII digits), each counted once. ``ValueError`` naming
    the problem."""
    if not isinstance(text, str):
        raise TypeError(f"seeds must be text such as 0-49999 or 1,5,10-19, got {type(text).__name__}")
    parts = text.split(",")
    if not text.strip(" \t"):
        raise ValueError("expected seeds such as 0-49999 or 1,5,10-19, got nothing")
    ranges = []
    for part in parts:
        match = _SEED_PART.fullmatch(part)
        if match is None:
            raise ValueError(f"expected seeds such as 0-49999 or 1,5,10-19 (ASCII digits), got {part.strip()!r}")
        digits = [g for g in match.groups() if g is not None]
        if any(len(d.lstrip("0")) > len(str(SEED_LIMIT)) for d in digits):
            raise ValueError(f"seeds go from 0 to {SEED_LIMIT - 1}, got {part.strip()!r}")
        lo = int(digits[0])
        hi = int(digits[-1])
        if hi < lo:
            raise ValueError(f"the range {part.strip()!r} runs backwards")
        if hi >= SEED_LIMIT:
            raise ValueError(f"seeds go from 0 to {SEED_LIMIT - 1} (torch's CPU generator keeps only the low 32 bits "
                             f"of a seed, so larger seeds would repeat images), got {hi}")
        ranges.append((lo, hi))
    seeds = Seeds(ranges)
    if len(seeds) > MAX_SEEDS:
        raise ValueError(f"at most {MAX_SEEDS:,} seeds per run, got {len(seeds):,}")
    return seeds


def as_seeds(seeds) -> Seeds:
    """``seeds`` of ``generate_images``: a ``Seeds``, a text for ``parse_seeds``, or ints."""
    import numbers

    if isinstance(seeds, Seeds):
        return seeds
    if isinstance(seeds, str):
        try:
            return parse_seeds(seeds)
        except ValueError as exc:
            raise ValueError(f"`seeds`: {exc}") from None
    if isinstance(seeds, range) and seeds.step == 1:
        out = Seeds([(seeds.start, seeds.stop - 1)] if len(seeds) else [])
    else:
        try:
            items = list(seeds)
        except TypeError:
            raise TypeError(f"`seeds` must be a Seeds, a text such as '0-49999' or ints, got {type(seeds).__name__}") from None
        for s in items:
            if isinstance(s, bool) or not isinstance(s, numbers.Integral):
                raise TypeError(f"`seeds` must hold ints, got {type(s).__name__} ({s!r})")
        out = Seeds.from_ints(items)
    if not len(out):
        raise ValueError("`seeds` is empty")
    if out.ranges[0][0] < 0 or out.ranges[-1][1] >= SEED_LIMIT:
        raise ValueError(f"`seeds` go from 0 to {SEED_LIMIT - 1}, got {out.ranges[0][0] if out.ranges[0][0] < 0 else out.ranges[-1][1]}")
    if len(out) > MAX_SEEDS:
        raise ValueError(f"`seeds`: at most {MAX_SEEDS:,} per run, got {len(out):,}")
    return out


def seed_file(seed: int, subdirs: bool = False) -> str:
    """The file of ``seed``, relative to the output folder (``/``-separated), as EDM's generate.py names them."""
    name = f"{seed:06d}.png"
    return f"{seed - seed % SUBDIR_SIZE:06d}/{name}" if subdirs else name

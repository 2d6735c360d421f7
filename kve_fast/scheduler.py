"""Deprecated name of ``kve_fast.karras_ve_scheduler`` (``KarrasVeScheduler``; or ``kve_fast.KarrasVeScheduler``)."""

import warnings

from .karras_ve_scheduler import KarrasVeOutput, KarrasVeScheduler  # noqa: F401

__all__ = ["KarrasVeScheduler", "KarrasVeOutput"]

warnings.warn("kve_fast.scheduler is deprecated: import KarrasVeScheduler from kve_fast (or "
              "kve_fast.karras_ve_scheduler)", DeprecationWarning, stacklevel=2)

"""One warning per reason per process: kve_fast's fallbacks (no Triton, no graph capture, no fast FIR kernel)
say once what they do instead, and never change results silently."""

from __future__ import annotations

import threading
import warnings

_warned: set = set()
_lock = threading.Lock()


def warn_once(key, message: str, stacklevel: int = 3) -> None:
    """``warnings.warn(message, RuntimeWarning)`` the first time ``key`` is seen in this process."""
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)


def forget(key=None) -> None:
    """Warn again for ``key`` (or every key): for tests."""
    with _lock:
        if key is None:
            _warned.clear()
        else:
            _warned.discard(key)

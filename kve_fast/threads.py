"""How many CPU threads torch's operators use while kve_fast samples on the CPU, and how they wait.

torch starts one OpenMP thread per core, and between operators those threads spin. On a machine where
another process keeps a core busy, the threads of every operator wait for the one that shares its core
with that process, spinning on the others: a run that takes 3 s alone took 60 s beside one busy
neighbour (bench/RESULTS.md, "CPU threads"). Two remedies, both here:

- ``passive_wait()``: OpenMP threads that sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``). The
  same threads and the same bits, about single-thread speed beside a busy neighbour, but slower than spinning
  on a quiet machine (waking threads at every operator costs). It only works before torch is imported, so the
  ``kve-fast`` command decides at its start (``wait_policy_for``: passive only when a core is busy then), and so
  can a script that sets the variable itself; a Python session that already imported torch cannot.
- ``for_call(device)``: every sampler call runs inside it (``kve_fast.sampler.execute``). By default it leaves
  torch's thread count alone: the thread count can change the last bits of some models' CPU operators (an
  NCSN++-style UNet: most values differ between 1 and 2 threads; the bundled digits model: a few images at small
  batches, docs/generate.md), and a drop-in must give the bits diffusers gives in the same process, whatever the
  machine's load. With ``KVE_FAST_THREADS=auto`` it uses, for the duration of one CPU call, only as many threads
  as there are idle cores (fast beside a busy neighbour; bits that depend on the load, so it warns once when it
  reduces).

The number of threads ``for_call`` uses, in order of precedence:

1. ``set_threads(n)`` (``kve-fast sample --threads N``), or ``KVE_FAST_THREADS=N`` in the environment: ``n``.
2. ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` in the environment, ``KVE_FAST_THREADS=off`` or unset (the
   default), or a thread count the caller set with ``torch.set_num_threads`` (one that differs from torch's
   count when this module was first imported): left as it is.
3. ``KVE_FAST_THREADS=auto``: the idle cores, measured over ``MEASURE_S`` from ``/proc/stat`` (the cores this
   process may run on, all processes counted), rounded down with a margin of ``MARGIN`` cores, at least 1
   and never more than torch's own count. The answer is reused for ``REUSE_S`` seconds. Where
   ``/proc/stat`` cannot be read (not Linux), torch's count is left as it is.

Only CPU calls are affected (``device.type == "cpu"``); the count is put back when the call ends. Calls
that overlap (threads) share the count the first one chose.

Import-light: torch is imported when a count is applied.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time

from ._warn import warn_once

__all__ = ["for_call", "choose", "set_threads", "passive_wait", "wait_policy_for", "idle_cores", "Choice", "ENV",
           "MEASURE_S", "REUSE_S", "MARGIN"]

ENV = "KVE_FAST_THREADS"  # "off" (the default, also when unset), "auto", or a positive integer
MEASURE_S = 0.1  # how long /proc/stat is watched (10 clock ticks of 10 ms per core)
REUSE_S = 10.0  # how long a measured answer is reused
MARGIN = 0.3  # a core counts as idle when at least 1 - MARGIN of it is idle

_lock = threading.RLock()
_fixed: int | None = None  # set_threads()
_torch_default: int | None = None  # torch's count when first seen here
_active = 0  # for_call blocks in progress (all threads)
_saved: int | None = None  # the count to put back when the last one ends
_cache: tuple[float, int, str] | None = None  # (monotonic time, threads, why) of the last measurement
if "torch" in sys.modules:  # torch's count before anything here could change it
    _torch_default = sys.modules["torch"].get_num_threads()


class Choice(tuple):
    """``(threads, why)``: the count a call uses (None: leave torch's as it is) and a short reason."""

    def __new__(cls, threads: int | None, why: str):
        return super().__new__(cls, (threads, why))

    @property
    def threads(self) -> int | None:
        return self[0]

    @property
    def why(self) -> str:
        return self[1]


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    return value


def set_threads(n: int | None) -> None:
    """Use ``n`` threads in every kve_fast CPU call from now on (None: back to the policy above)."""
    global _fixed
    _fixed = None if n is None else _positive_int(n, "n")


def passive_wait(environ=os.environ) -> bool:
    """Make OpenMP's threads sleep, not spin, while they wait (``OMP_WAIT_POLICY=PASSIVE``), unless the
    environment already says how they wait (``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``) or ``KVE_FAST_THREADS=off``.

    Effective only before torch is imported (OpenMP reads the variable once, when torch loads it); returns
    whether it set the variable.
    """
    if "torch" in sys.modules or environ.get("OMP_WAIT_POLICY") or environ.get("GOMP_SPINCOUNT"):
        return False
    if environ.get(ENV, "").strip().lower() == "off":
        return False
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def wait_policy_for(device: str, environ=os.environ) -> str | None:
    """What ``kve-fast`` does before it imports torch, for ``--device`` ``device``: on the CPU, if another process
    keeps a core busy now (``idle_cores``), OpenMP's threads sleep while they wait (``passive_wait``); on a quiet
    machine they keep OpenMP's spinning, which is faster there (sleeping threads take a while to wake at every
    operator). Either way the same threads compute the same bits. Returns a short description of what it did
    (None: nothing: not the CPU, the environment decides, or torch is already loaded)."""
    if "torch" in sys.modules or environ.get("OMP_WAIT_POLICY") or environ.get("GOMP_SPINCOUNT"):
        return None
    if environ.get(ENV, "").strip().lower() == "off":
        return None
    if device.startswith("cuda") or (device == "auto" and os.path.exists("/dev/nvidiactl")):
        return None  # a GPU run: its host threads hardly use OpenMP
    found = idle_cores()
    if found is None:
        return None
    idle, cores = found
    if idle >= cores - MARGIN:
        return None
    passive_wait(environ)
    return f"passive wait: {cores - idle:.1f} of {cores} cores busy at the start"


def _env_setting() -> int | str | None:
    """``KVE_FAST_THREADS``: an int, "off" (also when unset: the default), or None for "auto"; a ValueError
    names it otherwise."""
    value = os.environ.get(ENV, "").strip().lower()
    if value == "auto":
        return None
    if value in ("", "off"):
        return "off"
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{ENV} must be 'auto', 'off' or a positive integer, got {os.environ[ENV]!r}")
    return n


def _our_cpus() -> list[int] | None:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _read_stat(cpus: list[int]) -> dict[int, tuple[int, int]] | None:
    """``{cpu: (idle ticks, total ticks)}`` from /proc/stat for ``cpus``; None where it cannot be read."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    wanted, out = set(cpus), {}
    for line in lines:
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *fields = line.split()
        try:
            cpu, ticks = int(name[3:]), [int(x) for x in fields[:8]]
        except ValueError:
            continue
        if cpu in wanted and len(ticks) >= 5:
            out[cpu] = (ticks[3] + ticks[4], sum(ticks))  # idle + iowait; user..steal
    return out if len(out) == len(wanted) else None


def busy_ticks() -> tuple[int, int]:
    """``(busy, total)`` clock ticks since boot, summed over the cores this process may use (busy: all but idle
    and iowait), from /proc/stat: the load the bench scripts record beside their timings. OSError where it
    cannot be read."""
    stat = _read_stat(_our_cpus() or [])
    if not stat:
        raise OSError("cannot read the cores' ticks from /proc/stat")
    return sum(t - i for i, t in stat.values()), sum(t for _, t in stat.values())


def idle_cores(seconds: float = MEASURE_S) -> tuple[float, int] | None:
    """``(idle, cores)``: how many of the cores this process may use were idle over the next ``seconds``
    (summed fractions), and how many there are; None where /proc/stat cannot be read."""
    cpus = _our_cpus()
    if not cpus:
        return None
    before = _read_stat(cpus)
    if before is None:
        return None
    time.sleep(seconds)
    after = _read_stat(cpus)
    if after is None:
        return None
    idle = 0.0
    for cpu in cpus:
        d_idle, d_total = after[cpu][0] - before[cpu][0], after[cpu][1] - before[cpu][1]
        idle += d_idle / d_total if d_total > 0 else 1.0
    return idle, len(cpus)


def _torch_threads() -> int:
    global _torch_default
    import torch

    n = torch.get_num_threads()
    if _torch_default is None:
        _torch_default = n
    return n


def choose(device="cpu") -> Choice:
    """The thread count a call on ``device`` would use now, and why (see the module docstring)."""
    import torch

    if torch.device(device).type != "cpu":
        return Choice(None, f"not a CPU call ({device})")
    if _fixed is not None:
        return Choice(_fixed, "set_threads / --threads")
    setting = _env_setting()
    if isinstance(setting, int):
        return Choice(setting, f"{ENV}={setting}")
    if setting == "off":
        return Choice(None, f"{ENV} unset or off: torch's count")
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(name):
            return Choice(None, f"{name}={os.environ[name]} in the environment")
    current = _torch_threads()
    if _active == 0 and current != _torch_default:
        return Choice(None, f"torch.set_num_threads({current}) by the caller")
    ceiling = _torch_default if _torch_default is not None else current
    if ceiling <= 1:
        return Choice(1, "one core")
    return Choice(*_measured(ceiling))


def _measured(ceiling: int) -> tuple[int | None, str]:
    global _cache
    now = time.monotonic()
    if _cache is not None and now - _cache[0] < REUSE_S:
        return min(_cache[1], ceiling), _cache[2]
    found = idle_cores()
    if found is None:
        return None, "no /proc/stat: torch's count"
    idle, cores = found
    n = max(1, min(ceiling, math.floor(idle + MARGIN)))
    why = f"auto: {idle:.1f} of {cores} cores idle"
    _cache = (now, n, why)
    return n, why


@contextlib.contextmanager
def for_call(device="cpu"):
    """Run the block with the thread count ``choose(device)`` gives, then put torch's count back.

    Yields the ``Choice``. Overlapping blocks (nested, or in other threads) keep the count the first one
    set; the last one to end puts the original back.
    """
    global _active, _saved
    import torch

    with _lock:
        if _active:
            choice = Choice(None, "inside another kve_fast call")
        else:
            choice = choose(device)
            current = torch.get_num_threads()
            if choice.threads is not None and choice.threads != current:
                if choice.why.startswith("auto"):
                    warn_once(("threads", "reduced"), f"kve_fast: {choice.why}: this CPU call uses {choice.threads} thread(s), not torch's "
                                  f"{current} (fewer threads can change the last bits of some models; "
                                  f"{ENV}=N or OMP_NUM_THREADS fixes the count)", stacklevel=3)
                _saved = current
                torch.set_num_threads(choice.threads)
        _active += 1
    try:
        yield choice
    finally:
        with _lock:
            _active -= 1
            if _active == 0 and _saved is not None:
                torch.set_num_threads(_saved)
                _saved = None

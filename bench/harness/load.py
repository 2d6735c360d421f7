"""The machine's other load: one busy neighbour started beside a run, and what the other processes used while a
child process ran (the CPU scripts record it beside every timing: a shared machine's load changes them)."""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import time

from kve_fast.threads import busy_ticks

__all__ = ["busy_neighbour", "measure_load"]


@contextlib.contextmanager
def busy_neighbour(on: bool = True):
    """One busy-loop process beside the block (the issue's "one busy neighbour"), ended after it; nothing when
    ``on`` is false."""
    if not on:
        yield None
        return
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.5)  # running before the block starts
    try:
        yield neighbour
    finally:
        neighbour.kill()
        neighbour.wait()


class _Load:
    wall_s: float
    own_cpu_s: float
    others_busy_cores: float


@contextlib.contextmanager
def measure_load():
    """Around child processes of this one: after the block, ``wall_s``, ``own_cpu_s`` (the children's CPU time)
    and ``others_busy_cores``: the busy cores from /proc/stat over the block, less the children's own use."""
    load = _Load()
    usage0, ticks0, start = resource.getrusage(resource.RUSAGE_CHILDREN), busy_ticks(), time.perf_counter()
    yield load
    load.wall_s = time.perf_counter() - start
    ticks1, usage1 = busy_ticks(), resource.getrusage(resource.RUSAGE_CHILDREN)
    load.own_cpu_s = (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime)
    busy = (ticks1[0] - ticks0[0]) / max(ticks1[1] - ticks0[1], 1) * len(os.sched_getaffinity(0))
    load.others_busy_cores = max(busy - load.own_cpu_s / load.wall_s, 0.0)

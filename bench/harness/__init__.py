"""The measuring harness of the bench scripts: one place for what every measurement records and how it ends.

- ``ScriptRun`` (``run``): one run of a bench script: its provenance taken first (``kve_fast.benchmark.provenance``:
  the commit and dirty flag, card, driver, versions, command), its sections each in its own try (a failure is a
  failed stage, the rest still runs), its checks, its JSON written whole after every section, and the line it ends
  with; ``Outcome``: the checks and stages of a run and its exit status (1 failed, 3 skipped, else 0);
- ``stats``, ``time_stats``, ``time_calls``: min / median / max, and timed calls repeated per the repeat rule (5 where a call is under 2 s, else 3)
  (``kve_fast.benchmark.provenance.required_repeats``); ``write_json``: a record written whole or not at all;
- ``Stage`` and ``run_session`` (``session``): a lent GPU's command, its stages under one hard time budget
  (``bench/device_session.py``);
- ``busy_neighbour`` and ``measure_load`` (``load``): one busy-loop process beside a run, and the other processes'
  load while a child process runs;
- ``write_stamp`` (``stamp``): the commit, dirty flag and tree hash carried to the device machine.

Repo-only: ``kve-fast bench`` (``kve_fast.benchmark``) does not need any of it.
"""

from .load import busy_neighbour, measure_load
from .run import Outcome, ScriptRun, dumps, stats, time_calls, time_stats, write_json
from .session import Stage, describe_exit, run_session
from .stamp import write_stamp

__all__ = ["ScriptRun", "Outcome", "stats", "time_stats", "time_calls", "write_json", "dumps", "Stage",
           "run_session", "describe_exit", "busy_neighbour", "measure_load", "write_stamp"]

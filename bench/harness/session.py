"""A device session: stages (each a separate process) run under one hard time budget.

Issue 20's rules for a lent machine's one command (``bench/device_session.py``, called by
``bench/device_correctness.sh`` and ``bench/device_speed.sh``):

- each stage runs in its own process (a crash such as SIGSEGV kills that stage only and is named: ``crashed
  (SIGSEGV)``), under ``timeout = min(its cap, what is left of the budget)``; a stage whose estimate does not
  fit in what is left is skipped and the record says so (``needs about E s, L s left of the B s budget``);
- ``{budget}`` in a stage's argv is replaced by the seconds it is given (less a margin), so a script with its
  own ``--budget-s`` ends on its own before the hard stop;
- a background stage (the CUDA extension's build) starts at once; a stage that names it in ``after`` waits for it
  (the wait is counted against the budget);
- each stage writes its JSON into its own folder; the session's JSON holds the provenance, every stage's status,
  exit code, seconds, the last lines it printed and the JSON it wrote;
- the exit status (``Outcome.exit_code``): 1 if a stage failed, timed out or crashed, or a stage exited 1 (its
  own check failed), 3 if nothing failed but something was skipped (by the budget, or inside a script that
  exited 3), else 0; the last line printed says which.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

from kve_fast.benchmark.provenance import missing, provenance

from .run import Outcome, write_json

__all__ = ["Stage", "run_session", "describe_exit", "MARGIN_S"]

MARGIN_S = 5.0  # a stage's own --budget-s is this much under its hard timeout


@dataclasses.dataclass
class Stage:
    name: str
    argv: list[str]
    estimate_s: float  # what it needs on the device; skipped if this does not fit in what is left
    cap_s: float  # its hard timeout, at most
    background: bool = False  # started at once; waited for by the stages naming it in ``after``
    after: tuple[str, ...] = ()
    env: dict = dataclasses.field(default_factory=dict)
    what: str = ""  # one line: what it checks or measures
    must_run: bool = False  # a pytest stage whose tests must run: "skipped" or "deselected" in its summary is a skip


def describe_exit(rc: int | None) -> str:
    """``exit 0``, ``exit 1``, ``crashed (SIGSEGV)``... for a process's return code."""
    if rc is None:
        return "no exit status"
    if rc < 0:
        try:
            return f"crashed ({signal.Signals(-rc).name})"
        except ValueError:
            return f"crashed (signal {-rc})"
    if rc > 128 and rc - 128 in {s.value for s in signal.Signals}:  # a shell reports a signal death as 128 + n
        return f"exit {rc} (probably {signal.Signals(rc - 128).name})"
    return f"exit {rc}"


def _last_summary(lines: list[str]) -> str:
    """The stage's own verdict: its last line with PASS / FAIL / INCOMPLETE, or pytest's summary line."""
    for line in reversed(lines):
        s = line.strip()
        if any(w in s for w in (": PASS", ": FAIL", ": INCOMPLETE")) or (
                s.startswith("=") and any(w in s for w in (" passed", " failed", " error", " skipped"))):
            return s.strip("= ")[:400]
    return next((x.strip()[:400] for x in reversed(lines) if x.strip()), "")


def _status(stage: Stage, status: str, rc, verdict: str) -> tuple[str, str]:
    """A finished stage's status in the outcome, and why (see the module docstring)."""
    if status == "timed out":
        return "timed out", f"last: {verdict}"
    if rc is None or rc < 0 or rc > 128:
        return "failed", f"{describe_exit(rc)}; last: {verdict}"
    if rc == 3:
        return "skipped", f"the script skipped parts (exit 3): {verdict}"
    if rc != 0:
        return "failed", f"{describe_exit(rc)}: {verdict}"
    if stage.must_run and (" skipped" in verdict or " deselected" in verdict or "no tests ran" in verdict):
        return "skipped", f"its tests must run, not be skipped: {verdict}"
    return "ok", verdict


class _Running:
    def __init__(self, stage: Stage, workdir: str, timeout: float):
        self.stage, self.workdir, self.timeout = stage, workdir, timeout
        self.t0 = time.monotonic()
        self.lines: list[str] = []
        os.makedirs(workdir, exist_ok=True)
        self.logpath = os.path.join(workdir, "output.log")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **stage.env)
        self.fh = open(self.logpath, "w", encoding="utf-8", errors="replace")
        self.proc = subprocess.Popen(stage.argv, stdout=self.fh, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def wait(self) -> tuple[str, int | None]:
        """Wait for it (until its timeout); returns (status, rc)."""
        left = self.timeout - (time.monotonic() - self.t0)
        status = "ok"
        try:
            rc = self.proc.wait(timeout=max(left, 0.01))
        except subprocess.TimeoutExpired:
            status = "timed out"
            for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                try:
                    os.killpg(self.proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    self.proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = self.proc.returncode
        self.fh.close()
        with open(self.logpath, encoding="utf-8", errors="replace") as f:
            self.lines = f.read().splitlines()
        return status, rc

    def jsons(self) -> dict:
        """The JSON files the stage wrote into its folder, by relative path."""
        found = {}
        for path in sorted(glob.glob(os.path.join(self.workdir, "**", "*.json"), recursive=True)):
            try:
                with open(path, encoding="utf-8") as f:
                    found[os.path.relpath(path, self.workdir)] = json.load(f)
            except (OSError, ValueError) as exc:
                found[os.path.relpath(path, self.workdir)] = f"unreadable: {exc}"
        return found


class _Session:
    """``run_session``'s state: the budget's clock, the outcome, the record and its two files."""

    def __init__(self, name, budget_s, out, device, argv, workroot, log, tail_lines):
        self.name, self.budget_s, self.out, self.log, self.tail_lines = name, budget_s, out, log, tail_lines
        self.start = time.monotonic()
        self.outcome = Outcome()
        prov = provenance(device, argv)
        gaps = missing(prov)
        self.outcome.check("provenance", not gaps, "missing: " + ", ".join(gaps) if gaps else "")
        if workroot is None:  # outside ``out``: only the session's two files come back from a device call
            workroot = os.path.join(tempfile.gettempdir(), f"kve_fast_{name}_work")
            shutil.rmtree(workroot, ignore_errors=True)
        self.workroot = workroot
        os.makedirs(out, exist_ok=True)
        self.result = {"session": name, "budget_s": budget_s, "provenance": prov, "stages": [], "complete": False}
        self.records: dict[str, dict] = {}
        self.background: dict[str, _Running] = {}
        self.full_log = os.path.join(out, f"{name}.log")
        log(f"{name}: budget {budget_s:.0f} s; commit {prov['commit']} dirty={prov['dirty']}; card {prov['card']}, "
            f"driver {prov['driver']}; torch {prov['torch']}, triton {prov['triton']}, diffusers {prov['diffusers']}")
        if gaps:
            log(f"  provenance lacks: {', '.join(gaps)}")

    def now(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget_s - self.now()

    def save(self, final: bool = False) -> None:
        self.result["seconds"] = self.now()
        self.result["complete"] = final
        self.result["outcome"] = self.outcome.as_dict()
        write_json(os.path.join(self.out, f"{self.name}.json"), self.result)

    def finish(self, run: _Running, status: str, rc) -> None:
        """Record a stage that ended: its status, exit, time, verdict, last lines, JSON; its output to the log."""
        st = run.stage
        secs = time.monotonic() - run.t0
        verdict = _last_summary(run.lines)
        rec = self.records[st.name]
        rec.update(status=status, rc=rc, exit=describe_exit(rc), seconds=round(secs, 1), verdict=verdict,
                   tail=run.lines[-self.tail_lines:], json=run.jsons())
        with open(self.full_log, "a", encoding="utf-8") as f:
            f.write(f"\n===== {st.name}: {' '.join(st.argv)}\n" + "\n".join(run.lines) + "\n")
        status, detail = _status(st, status, rc, verdict)
        if status == "timed out":
            detail = f"killed after {run.timeout:.0f} s; {detail}"
        self.outcome.stage(st.name, status, detail)
        rec["status"] = status  # ok / failed / timed out / skipped (the script's own skips)
        self.log(f"==== [{self.now():5.0f} s] {st.name}: {status}, {describe_exit(rc)} in {secs:.0f} s"
                 + (f" -- {verdict}" if verdict else ""))
        if status != "ok":
            for line in run.lines[-self.tail_lines:]:
                self.log("   | " + line)
        self.save()

    def wait_for(self, run: _Running) -> None:
        """Wait for a background stage, for at most what is left of the budget."""
        run.timeout = min(run.timeout, (time.monotonic() - run.t0) + max(self.left(), 0.01))
        self.finish(run, *run.wait())

    def skip(self, st: Stage, rec: dict, why: str) -> None:
        rec.update(status="skipped", why=why)
        self.outcome.stage(st.name, "skipped", why)
        self.log(f"==== [{self.now():5.0f} s] {st.name}: SKIPPED ({why})")
        self.save()

    def launch(self, st: Stage, rec: dict, timeout: float) -> _Running | None:
        """Start ``st`` with its ``{budget}`` and ``{out}`` filled in; None if it could not start (a failed stage)."""
        argv = [a.replace("{budget}", str(max(int(timeout - MARGIN_S - 10), 1))) for a in st.argv]
        workdir = os.path.join(self.workroot, st.name.replace(" ", "_").replace("/", "_"))
        st = dataclasses.replace(st, argv=[a.replace("{out}", workdir) for a in argv])
        rec.update(argv=st.argv, timeout_s=round(timeout, 1))
        self.log(f"==== [{self.now():5.0f} s] {st.name} (timeout {timeout:.0f} s"
                 + (", in the background" if st.background else "") + f"): {' '.join(st.argv)}")
        try:
            return _Running(st, workdir, timeout)
        except OSError as exc:
            rec.update(status="failed", why=f"could not start: {exc}")
            self.outcome.stage(st.name, "failed", f"could not start: {exc}")
            return None

    def run(self, st: Stage) -> None:
        """One stage: wait for what it comes after, skip it if its estimate does not fit, else run it (or start it
        in the background)."""
        rec = {"stage": st.name, "what": st.what, "argv": st.argv, "estimate_s": st.estimate_s, "cap_s": st.cap_s}
        self.result["stages"].append(rec)
        self.records[st.name] = rec
        for dep in st.after:
            if dep in self.background:
                self.log(f"==== [{self.now():5.0f} s] waiting for {dep} (for {st.name})")
                self.wait_for(self.background.pop(dep))
        avail = self.left()
        if st.estimate_s > avail:
            return self.skip(st, rec, f"needs about {st.estimate_s:.0f} s, {max(avail, 0):.0f} s left of the "
                                      f"{self.budget_s:.0f} s budget")
        running = self.launch(st, rec, min(st.cap_s, avail))
        if running is None:
            return None
        if st.background:
            self.background[st.name] = running
        else:
            self.finish(running, *running.wait())
        return None

    def close(self) -> int:
        """Give the background stages nothing waited for what is left, save, print the table and the verdict."""
        for running in list(self.background.values()):
            self.wait_for(running)
        self.save(final=True)
        self.log(f"\n{self.name}: {self.now():.0f} s of a {self.budget_s:.0f} s budget; JSON "
                 f"{self.out}/{self.name}.json, full output {self.full_log}")
        for rec in self.result["stages"]:
            self.log(f"  {rec['stage']:<34s} {rec.get('status', '?'):<10s} {rec.get('exit', ''):<20s} "
                     f"{rec.get('seconds', 0) or 0:6.1f} s  {rec.get('verdict') or rec.get('why') or ''}"[:240])
        self.log(f"{self.name}: {self.outcome.summary()}")
        return self.outcome.exit_code()


def run_session(name: str, stages: list[Stage], budget_s: float, out: str, device="cpu", argv=None,
                workroot: str | None = None, log=None, tail_lines: int = 40) -> int:
    """Run ``stages`` in order under ``budget_s`` (see the module docstring); write ``<out>/<name>.json`` and
    ``<out>/<name>.log`` (every stage's full output); return the exit status."""
    session = _Session(name, budget_s, out, device, argv, workroot, log or (lambda *a: print(*a, flush=True)),
                       tail_lines)
    for st in stages:
        session.run(st)
    return session.close()

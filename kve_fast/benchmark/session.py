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
import signal
import subprocess
import sys
import time

from .provenance import Outcome, dumps, missing, provenance

__all__ = ["Stage", "run_session", "describe_exit"]

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


class _Running:
    def __init__(self, stage: Stage, workdir: str, log, timeout: float):
        self.stage, self.workdir, self.timeout = stage, workdir, timeout
        self.t0 = time.monotonic()
        self.lines: list[str] = []
        os.makedirs(workdir, exist_ok=True)
        self.logpath = os.path.join(workdir, "output.log")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **stage.env)
        self.fh = open(self.logpath, "w", encoding="utf-8", errors="replace")
        self.proc = subprocess.Popen(stage.argv, stdout=self.fh, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self.log = log

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


def run_session(name: str, stages: list[Stage], budget_s: float, out: str, device="cpu", argv=None,
                workroot: str | None = None, log=None, tail_lines: int = 40) -> int:
    """Run ``stages`` in order under ``budget_s`` (see the module docstring); write ``<out>/<name>.json`` and
    ``<out>/<name>.log`` (every stage's full output); return the exit status."""
    log = log or (lambda *a: print(*a, flush=True))
    start = time.monotonic()
    outcome = Outcome()
    prov = provenance(device, argv)
    gaps = missing(prov)
    outcome.check("provenance", not gaps, "missing: " + ", ".join(gaps) if gaps else "")
    if workroot is None:  # outside ``out``: only the session's two files come back from a device call
        import shutil
        import tempfile

        workroot = os.path.join(tempfile.gettempdir(), f"kve_fast_{name}_work")
        shutil.rmtree(workroot, ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    result = {"session": name, "budget_s": budget_s, "provenance": prov, "stages": [], "complete": False}
    full_log = os.path.join(out, f"{name}.log")
    log(f"{name}: budget {budget_s:.0f} s; commit {prov['commit']} dirty={prov['dirty']}; card {prov['card']}, "
        f"driver {prov['driver']}; torch {prov['torch']}, triton {prov['triton']}, diffusers {prov['diffusers']}")
    if gaps:
        log(f"  provenance lacks: {', '.join(gaps)}")

    def left() -> float:
        return budget_s - (time.monotonic() - start)

    def save(final=False):
        result["seconds"] = time.monotonic() - start
        result["complete"] = final
        result["outcome"] = outcome.as_dict()
        with open(os.path.join(out, f"{name}.json"), "w", encoding="utf-8") as f:
            f.write(dumps(result))

    background: dict[str, _Running] = {}
    records: dict[str, dict] = {}

    def finish(run: _Running, status: str, rc):
        st = run.stage
        secs = time.monotonic() - run.t0
        verdict = _last_summary(run.lines)
        rec = records[st.name]
        rec.update(status=status, rc=rc, exit=describe_exit(rc), seconds=round(secs, 1), verdict=verdict,
                   tail=run.lines[-tail_lines:])
        jsons = {}
        for path in sorted(glob.glob(os.path.join(run.workdir, "**", "*.json"), recursive=True)):
            try:
                with open(path, encoding="utf-8") as f:
                    jsons[os.path.relpath(path, run.workdir)] = json.load(f)
            except (OSError, ValueError) as exc:
                jsons[os.path.relpath(path, run.workdir)] = f"unreadable: {exc}"
        rec["json"] = jsons
        with open(full_log, "a", encoding="utf-8") as f:
            f.write(f"\n===== {st.name}: {' '.join(st.argv)}\n" + "\n".join(run.lines) + "\n")
        if status == "timed out":
            outcome.stage(st.name, "timed out", f"killed after {run.timeout:.0f} s; last: {verdict}")
        elif rc is None or rc < 0 or rc > 128:
            outcome.stage(st.name, "failed", f"{describe_exit(rc)}; last: {verdict}")
        elif rc == 3:
            outcome.stage(st.name, "skipped", f"the script skipped parts (exit 3): {verdict}")
        elif rc != 0:
            outcome.stage(st.name, "failed", f"{describe_exit(rc)}: {verdict}")
        elif st.must_run and (" skipped" in verdict or " deselected" in verdict or "no tests ran" in verdict):
            outcome.stage(st.name, "skipped", f"its tests must run, not be skipped: {verdict}")
        else:
            outcome.stage(st.name, "ok", verdict)
        rec["status"] = outcome.stages[-1]["status"]  # ok / failed / timed out / skipped (the script's own skips)
        log(f"==== [{time.monotonic() - start:5.0f} s] {st.name}: {rec['status']}, {describe_exit(rc)} in {secs:.0f} s"
            + (f" -- {verdict}" if verdict else ""))
        if rec["status"] != "ok":
            for line in run.lines[-tail_lines:]:
                log("   | " + line)
        save()

    for st in stages:
        rec = {"stage": st.name, "what": st.what, "argv": st.argv, "estimate_s": st.estimate_s, "cap_s": st.cap_s}
        result["stages"].append(rec)
        records[st.name] = rec
        for dep in st.after:
            if dep in background:
                log(f"==== [{time.monotonic() - start:5.0f} s] waiting for {dep} (for {st.name})")
                run = background.pop(dep)
                run.timeout = min(run.timeout, (time.monotonic() - run.t0) + max(left(), 0.01))
                finish(run, *run.wait())
        avail = left()
        if st.estimate_s > avail:
            why = f"needs about {st.estimate_s:.0f} s, {max(avail, 0):.0f} s left of the {budget_s:.0f} s budget"
            rec.update(status="skipped", why=why)
            outcome.stage(st.name, "skipped", why)
            log(f"==== [{time.monotonic() - start:5.0f} s] {st.name}: SKIPPED ({why})")
            save()
            continue
        timeout = min(st.cap_s, avail)
        st_argv = [a.replace("{budget}", str(max(int(timeout - MARGIN_S - 10), 1))) for a in st.argv]
        st = dataclasses.replace(st, argv=st_argv)
        workdir = os.path.join(workroot, st.name.replace(" ", "_").replace("/", "_"))
        st = dataclasses.replace(st, argv=[a.replace("{out}", workdir) for a in st.argv])
        rec.update(argv=st.argv, timeout_s=round(timeout, 1))
        log(f"==== [{time.monotonic() - start:5.0f} s] {st.name} (timeout {timeout:.0f} s"
            + (", in the background" if st.background else "") + f"): {' '.join(st.argv)}")
        try:
            run = _Running(st, workdir, log, timeout)
        except OSError as exc:
            rec.update(status="failed", why=f"could not start: {exc}")
            outcome.stage(st.name, "failed", f"could not start: {exc}")
            continue
        if st.background:
            background[st.name] = run
            continue
        finish(run, *run.wait())
    for name_, run in list(background.items()):  # nothing waited for them: give them what is left
        run.timeout = min(run.timeout, (time.monotonic() - run.t0) + max(left(), 0.01))
        finish(run, *run.wait())
    save(final=True)
    log(f"\n{name}: {time.monotonic() - start:.0f} s of a {budget_s:.0f} s budget; JSON {out}/{name}.json, "
        f"full output {full_log}")
    for rec in result["stages"]:
        log(f"  {rec['stage']:<34s} {rec.get('status', '?'):<10s} {rec.get('exit', ''):<20s} "
            f"{rec.get('seconds', 0) or 0:6.1f} s  {rec.get('verdict') or rec.get('why') or ''}"[:240])
    log(f"{name}: {outcome.summary()}")
    return outcome.exit_code()


if __name__ == "__main__":  # pragma: no cover - see bench/device_session.py
    sys.exit("run bench/device_session.py")

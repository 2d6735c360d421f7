"""The job: ``generate_images`` on every rank. Rank 0 locks, checks and records the folder; every rank walks its share
of the seeds in batches; per round the ranks gather their new files' hashes, rank 0 appends and fsyncs their lines,
then each rank puts its files in place (a file lands only once its line is durable)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time

from .checks import check_args, check_channels
from .errors import Failed, GenerateError, describe, oserror_line
from .folder import JOB_FILE, release, sees_token, setup
from .manifest import MANIFEST, read_share
from .ranks import Single
from .record import THREADS_PER_WORKER, device_identity, make_record, module_identity
from .seeds import Seeds, as_seeds
from .workers import Inline, Processes, Progress, Todo, workers_for
from .writer import Writer

_CALL = ("steps", "backend", "noise", "solver", "cuda_graph", "tf32", "channels_last")  # what each batch's call takes


@dataclasses.dataclass
class Summary:
    written: int  # images this run wrote (all ranks)
    skipped: int  # seeds whose files were already complete
    seconds: float  # sampling and writing, from the first batch to the last
    world: int
    workers: int = 1  # sampling workers per process

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


def generate_images(pipe, seeds, outdir: str, *, steps: int = 50, batch: int = 64, subdirs: bool = False,
                    backend: str = "auto", noise: str = "exact", solver: str = "heun", model: dict | None = None,
                    comm=None, quiet: bool = True, status: dict | None = None, cuda_graph=None, tf32: bool = False,
                    channels_last: bool = False, workers: int | None = None) -> Summary:
    """Write ``outdir/{seed:06d}.png`` for every seed with ``pipe`` (a ``KarrasVePipeline`` on its device).

    ``seeds``: a ``Seeds`` (``parse_seeds("0-49999")``), the same as text, or ints. This process samples its
    share of the seeds that lack a complete file (``comm``: the job's processes, one by default) and rank 0
    keeps the record and the manifest; see docs/generate.md. ``model``: ``{"name", "sha256"}`` for the record
    (default: a hash of the model in memory). ``workers``: CPU only, worker processes sampling side by side
    (1: in this process; default: the CPUs this process may use over the processes on this machine). Raises
    ``GenerateError`` when a rank fails, on every rank, and ``ValueError``/``TypeError`` naming a bad argument before
    any work.
    ``status["written"]`` counts the images written so far by all ranks, ``status["sampled"]`` the images sampled
    so far, what the progress bar shows: ahead of ``written`` by the batches not finished yet (for a report after
    an interrupt).
    """
    settings = dict(steps=steps, batch=batch, subdirs=subdirs, backend=backend, noise=noise, solver=solver,
                    cuda_graph=cuda_graph, tf32=tf32, channels_last=channels_last, workers=workers)
    check_args(pipe, outdir, settings, model=model, comm=comm, status=status, quiet=quiet)
    seeds = as_seeds(seeds)
    from ..backends import check_backend

    device = pipe.device
    settings.update(backend=check_backend(backend, device), model=model,
                    workers=workers_for(workers, device.type == "cpu"))
    try:
        check_channels(pipe._image_shape(1)[1])
    except ValueError as exc:
        raise GenerateError(str(exc), code=2) from None
    status = {} if status is None else status
    status.update(written=0, sampled=0)
    with _one_thread_per_worker(device):
        return _job(pipe, seeds, os.path.abspath(os.fspath(outdir)), comm or Single(), status, quiet, device, settings)


@contextlib.contextmanager
def _one_thread_per_worker(device):
    """On the CPU, torch's count and kve_fast's per-call policy (which ``KVE_FAST_THREADS`` would otherwise set) at
    ``THREADS_PER_WORKER`` for the block, then put back: the files must not depend on the thread count."""
    if device.type != "cpu":
        yield
        return
    import torch

    from .. import threads

    before, fixed_before = torch.get_num_threads(), threads._fixed
    torch.set_num_threads(THREADS_PER_WORKER)
    threads.set_threads(THREADS_PER_WORKER)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        threads.set_threads(fixed_before)


def _job(pipe, seeds: Seeds, outdir: str, comm, status: dict, quiet: bool, device, settings: dict) -> Summary:
    """This rank's part: the folder (rank 0 holds it), agreed on by every rank, then the rounds; on a failure before
    the first image, rank 0 takes back what it added to the folder, still holding its lock."""
    told, manifest, index, undo = _prepare(pipe, comm, device, outdir, settings)
    rounds, failed = None, True
    try:
        index, rid = _agree(comm, told, outdir, seeds, settings["subdirs"], index)
        rounds = _Rounds(pipe, seeds, outdir, comm, status, quiet, settings, index, rid, manifest)
        summary = rounds.run()
        failed = False
        return summary
    finally:
        if rounds is not None:
            rounds.close()
        if manifest is not None:
            release(manifest, comm.world, undo if failed else None)


def _prepare(pipe, comm, device, outdir: str, settings: dict) -> tuple:
    """Every rank names its device; rank 0 checks they agree, then locks, checks and records the folder, before any
    work. Returns ``(what rank 0 tells the others, manifest, index, undo)``; the last three are rank 0's only."""
    identity = device_identity(device)
    identities = comm.all_gather(identity)
    if comm.rank != 0:
        return None, None, None, None
    try:
        differ = [i for i, d in enumerate(identities) if d != identities[0]]
        if differ:
            raise GenerateError(f"rank {differ[0]} runs on {identities[differ[0]]}, rank 0 on {identities[0]}: the "
                                "files would depend on the rank; use one kind of device (and software)", code=2)
        record = make_record(pipe, model=settings["model"] or module_identity(pipe.unet), device=identity,
                             **{k: settings[k] for k in ("steps", "solver", "noise", "backend", "tf32",
                                                         "channels_last", "batch", "subdirs")})
        manifest, index, token, rid, undo = setup(outdir, comm.world, record)
        return ("ok", manifest.size, token, rid), manifest, index, undo
    except GenerateError as exc:
        return ("error", str(exc), exc.code), None, None, None
    except Exception as exc:
        return ("error", f"{outdir}: {describe(exc)}", 1), None, None, None


def _agree(comm, told, outdir: str, seeds: Seeds, subdirs: bool, index) -> tuple:
    """Every rank takes what rank 0 told (its refusal, or where the manifest ends, the job's token and the record's
    id), checks that it sees the folder rank 0 writes to, and reads the manifest's lines for its share. Returns
    ``(index, rid)``."""
    rank, world = comm.rank, comm.world
    told = comm.all_gather(told)[0]
    if told[0] == "error":
        raise GenerateError(told[1], code=told[2], printed=rank != 0)
    _, end, token, rid = told
    blind = token is not None and not sees_token(outdir, token)
    blind = [i for i, b in enumerate(comm.all_gather(blind)) if b]
    if blind:
        raise GenerateError(f"--outdir: rank {', '.join(map(str, blind))} cannot see the {JOB_FILE} file rank 0 "
                            f"wrote to {outdir}: with processes on several machines, --outdir must be one folder "
                            "they all share (NFS, Lustre, ...) at the same path", code=2, printed=rank != 0)
    if rank != 0:
        index = read_share(os.path.join(outdir, MANIFEST), end, rid, subdirs, seeds, rank, world)
    return index, rid


def _progress_bar(total: int, disable: bool):
    """Rank 0's bar over the whole job: images (of every rank), and images per second."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc="generating", disable=disable, file=sys.stderr, dynamic_ncols=True)


class _Rounds:
    """This rank's batches, round by round (see the module docstring); ``refresh()`` moves the bar and
    ``status["sampled"]`` as images are sampled, ``status["written"]`` counts the files every rank put in place."""

    def __init__(self, pipe, seeds: Seeds, outdir: str, comm, status: dict, quiet: bool, settings: dict, index: dict,
                 rid: str, manifest):
        self.seeds, self.comm, self.status, self.index, self.rid, self.manifest = seeds, comm, status, index, rid, manifest
        self.workers, subdirs = settings["workers"], settings["subdirs"]
        self.progress = Progress(settings["steps"])
        self.others = {"images": 0.0, "skipped": 0}  # the other ranks', as of the last round
        self.writer = Writer(outdir, status)
        self.bar = None
        todo = Todo(seeds.share(comm.rank, comm.world), index, outdir, subdirs, settings["batch"], self.progress)
        call = {k: settings[k] for k in _CALL}
        if self.workers > 1:  # forked before the bar's thread starts, without the manifest's descriptor
            self.producer = Processes(pipe, todo, self.progress, self.workers, call, subdirs,
                                      close_in_child=[manifest.fd] if manifest is not None else [])
        else:
            self.producer = Inline(pipe, todo, self.progress, call, subdirs, on_step=self.refresh)
        try:
            self.bar = _progress_bar(len(seeds), disable=quiet or comm.rank != 0)
        except BaseException:
            self.producer.close()
            raise

    def refresh(self) -> None:
        images = self.progress.images + self.others["images"]
        self.status["sampled"] = int(images)
        if self.bar is None or self.bar.disable:
            return
        total = len(self.seeds) - self.progress.skipped - self.others["skipped"]
        if self.bar.total != total:
            self.bar.total = total
        if int(images) != self.bar.n:
            self.bar.update(int(images) - self.bar.n)

    def run(self) -> Summary:
        """The rounds, until every rank has finished or one has failed (``GenerateError``, on every rank)."""
        write_error, finished = None, False
        start = time.perf_counter()
        while True:
            files, error, finished = self._produce(finished, write_error)
            round_ = self._gather(files, error, finished)
            failures = [(i, r["error"]) for i, r in enumerate(round_) if r["error"] is not None]
            lines = [line for r in round_ for line in r["lines"]]
            if failures or (not lines and all(r["finished"] for r in round_)):
                break
            append_error = self._append(lines)
            if append_error is not None:
                failures = [(0, append_error)]
                break
            if lines:
                write_error = self.writer.write([(s, rel, data) for s, rel, data, _ in files])
        seconds = time.perf_counter() - start
        if failures:
            self._fail(failures)
        return Summary(written=self.status["written"], skipped=self.progress.skipped + self.others["skipped"],
                       seconds=seconds, world=self.comm.world, workers=self.workers)

    def _produce(self, finished: bool, write_error) -> tuple:
        """``(files, error, finished)``: this rank's next batch (none once finished or failed)."""
        if finished or write_error is not None:
            return [], write_error, finished
        try:
            files = self.producer.get(idle=self.refresh)
        except Failed as exc:
            return [], str(exc), finished
        return ([], None, True) if files is None else (files, None, False)

    def _gather(self, files: list, error, finished: bool) -> list[dict]:
        """Every rank's new files' lines, error, whether it is finished, and its progress (one all-gather)."""
        rank = self.comm.rank
        if error is not None and rank != 0:  # rank 0 reports every failure
            print(f"kve-fast: error: rank {rank}: {error}", file=sys.stderr)
        round_ = self.comm.all_gather({"lines": [(s, rel, sha) for s, rel, _, sha in files], "error": error,
                                       "finished": finished or error is not None, "images": self.progress.images,
                                       "skipped": self.progress.skipped, "landed": self.writer.landed})
        others = [r for i, r in enumerate(round_) if i != rank]
        self.writer.others = sum(r["landed"] for r in others)
        self.status["written"] = self.writer.others + self.writer.landed
        self.others.update(images=sum(r["images"] for r in others), skipped=sum(r["skipped"] for r in others))
        self.refresh()
        return round_

    def _append(self, lines: list) -> str | None:
        """Rank 0 appends the round's lines and fsyncs them (a file made again with the bytes its line already vouches
        for needs no second line); every rank learns whether that failed (as one line), when there were lines."""
        error = None
        if self.comm.rank == 0:
            new = [{"seed": s, "file": rel, "sha256": sha, "record": self.rid} for s, rel, sha in lines
                   if self.index.get(s) != sha]
            try:
                self.manifest.append(new)
                self.index.update((r["seed"], r["sha256"]) for r in new)
            except OSError as exc:
                error = oserror_line(exc, self.manifest.path)
        return self.comm.all_gather(error)[0] if lines else None

    def _fail(self, failures: list) -> None:
        """Rank 0 reports the first failure, every rank raises it (once rank 0 has reported: torchrun then stops the
        rest)."""
        where = f"rank {', '.join(str(i) for i, _ in failures)} failed: " if self.comm.world > 1 else ""
        message = f"{where}{failures[0][1]}; {self.status['written']} images written, rerun the same command to resume"
        if self.comm.rank == 0:
            self.bar.close()
            print(f"kve-fast: error: {message}", file=sys.stderr)
        self.comm.all_gather(None)
        raise GenerateError(message, code=1, printed=True)

    def close(self) -> None:
        self.producer.close()
        if self.bar is not None:
            self.bar.close()

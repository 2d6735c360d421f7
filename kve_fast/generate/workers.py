"""The workers that sample a process's batches: one in the process itself (a GPU; ``--workers 1``), or CPU worker
processes forked once the model is loaded, each on ``THREADS_PER_WORKER`` intra-op threads; and this process's
share of the seeds, walked lazily (seeds whose files are complete are skipped)."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import os
import queue
import stat
import sys
import threading
import time

from .errors import Failed, describe
from .ranks import launched_by_torchrun
from .record import THREADS_PER_WORKER, sha256_file
from .seeds import seed_file

FORK_WORKERS = sys.platform.startswith("linux")  # CPU worker processes (forked: tested on Linux only)


def default_workers() -> int:
    """CPU workers per process: the CPUs this process may use, shared among the processes on this machine."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if launched_by_torchrun() else 1
    return max(1, cpus // max(1, local))


def workers_for(workers: int | None, cpu: bool) -> int:
    """How many workers (``workers`` as ``checks.check_workers`` allows): 1, in this process, on a GPU or where worker
    processes are not forked (not Linux); else ``workers``, by default the CPUs this process may use over the
    processes on this machine."""
    if not cpu or not FORK_WORKERS:
        return 1
    return workers or default_workers()


class Progress:
    """What this process has done, for the bar: image-steps sampled (an image is ``steps`` of them), seeds found
    complete."""

    def __init__(self, steps: int):
        self.steps = steps
        self.image_steps = 0
        self.skipped = 0

    def add_steps(self, images: int) -> None:
        self.image_steps += images

    @property
    def images(self) -> float:
        return self.image_steps / self.steps


class Todo:
    """This process's share of the seeds, walked lazily: batches of seeds whose files are not complete."""

    def __init__(self, stream, listed: dict[int, str], outdir: str, subdirs: bool, batch: int, progress: Progress):
        self.stream, self.listed, self.outdir, self.subdirs, self.batch = stream, listed, outdir, subdirs, batch
        self.progress = progress

    def _complete(self, seed: int) -> bool:
        sha = self.listed.get(seed)
        if sha is None:
            return False
        path = os.path.join(self.outdir, seed_file(seed, self.subdirs))
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                return False  # refused when written
            return sha256_file(path) == sha  # else changed since it was listed: made again
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, path) from None

    def next_batch(self) -> list[int]:
        """Up to ``batch`` seeds to sample (empty at the end)."""
        out = []
        for seed in self.stream:
            if self._complete(seed):
                self.progress.skipped += 1
                continue
            out.append(seed)
            if len(out) == self.batch:
                break
        return out


def _padded(seeds: list[int], batch: int) -> list[int]:
    """``seeds`` repeated up to ``batch`` entries: the model always runs at one batch size."""
    return [seeds[i % len(seeds)] for i in range(max(batch, len(seeds)))]


def _sample(pipe, seeds: list[int], batch: int, call: dict, subdirs: bool, on_step) -> list[tuple[int, str, bytes, str]]:
    """``[(seed, file, png bytes, sha256)]`` of one batch, padded to ``batch``; ``on_step()`` after each sampler step."""
    import torch

    def track(steps):  # the pipeline's progress hook: the sampler calls it with its steps
        for step in steps:
            yield step
            on_step()

    pipe.progress_bar = track
    padded = _padded(seeds, batch)
    images = pipe(len(padded), call["steps"], [torch.Generator().manual_seed(s) for s in padded], output_type="pil",
                  **{k: v for k, v in call.items() if k != "steps"}).images
    out = []
    for seed, image in zip(seeds, images):
        data = _encode_png(image)
        out.append((seed, seed_file(seed, subdirs), data, hashlib.sha256(data).hexdigest()))
    return out


def _worker_pipe(pipe):
    """A pipeline of its own (its own scheduler, its progress hook) around ``pipe``'s model."""
    from ..pipeline import KarrasVePipeline

    worker = KarrasVePipeline(unet=pipe.unet, scheduler=copy.deepcopy(pipe.scheduler))
    worker.set_progress_bar_config(disable=True)
    return worker


class Inline:
    """One batch at a time in this process (one worker; a GPU). ``get()``: the next batch's files, None at the end."""

    def __init__(self, pipe, todo: Todo, progress: Progress, call: dict, subdirs: bool, on_step):
        self.pipe, self.todo, self.progress, self.call, self.subdirs = _worker_pipe(pipe), todo, progress, call, subdirs
        self.on_step = on_step

    def get(self, idle=None):
        try:
            seeds = self.todo.next_batch()
            if not seeds:
                return None

            def step():
                self.progress.add_steps(len(seeds))
                self.on_step()

            return _sample(self.pipe, seeds, self.todo.batch, self.call, self.subdirs, step)
        except Exception as exc:
            raise Failed(describe(exc)) from None

    def close(self) -> None:
        pass


# A worker process and the main process talk through two pipes (batches one way, progress and files the other):
# length-prefixed pickles, between a process and the one it forked.
def _send(f, message) -> None:
    import pickle

    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(len(data).to_bytes(8, "little") + data)
    f.flush()


def _receive(f):
    """The next message, or None at the end of the stream."""
    import pickle

    head = f.read(8)
    if len(head) < 8:
        return None
    size = int.from_bytes(head, "little")
    data = f.read(size)
    if len(data) < size:
        return None
    return pickle.loads(data)


def _worker_loop(pipe, tasks, results, batch: int, call: dict, subdirs: bool) -> None:
    """A worker process: batches from ``tasks``, files and progress to ``results``, on ``THREADS_PER_WORKER``
    intra-op CPU threads. It ends at the end of ``tasks`` (the main process closed it, or died) or when a
    message cannot be sent (the main process is gone)."""
    pipe = _worker_pipe(pipe)
    try:
        while True:
            seeds = _receive(tasks)
            if seeds is None:
                return
            files = _sample(pipe, seeds, batch, call, subdirs, lambda: _send(results, ("steps", len(seeds))))
            _send(results, ("files", files))
    except OSError:  # BrokenPipeError: the main process is gone
        return
    except BaseException as exc:
        with contextlib.suppress(OSError):
            _send(results, ("error", describe(exc)))


def _death_signal():
    """Linux's ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` as a function of no arguments (None where there is none),
    looked up before the fork (no ``dlopen`` in the child)."""
    import ctypes
    import signal

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1: PR_SET_PDEATHSIG


def _die_with_parent(parent: int, death_signal) -> None:
    """In a forked worker: SIGKILL when the thread that forked it ends (also when its process is killed with
    SIGKILL), so that no worker outlives its job; and the end now if that already happened."""
    if death_signal is not None:
        death_signal()
    if os.getppid() != parent:
        os._exit(1)


def _exit_status(pid: int):
    """``pid``'s exit code (minus the signal that killed it) once it has ended, without reaping it (the pid stays
    ours until ``waitpid``); None if it cannot be told."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    except (ChildProcessError, OSError):
        return None
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


class Processes:
    """``count`` worker processes (Linux, the CPU), forked once the model is loaded: each samples with one intra-op
    thread on the model it inherited (copy-on-write; nothing is pickled but seeds and files); this process hands
    out batches (two in flight per worker), reads their files and progress through pipes, and writes the files.

    Processes, not threads: with threads the GIL, held by the model's Python code between kernels, serialised the
    workers on a busy machine. Forked, not spawned: a spawned worker imports torch and diffusers again before its
    first batch (docs/generate.md). ``close_in_child``: descriptors the workers must not keep (the manifest's lock).
    A worker ignores SIGINT (Ctrl-C is the main process's to handle), ends on SIGTERM, at the end of its input, or
    with the main process (``_die_with_parent``); ``close()`` ends and reaps every worker.
    """

    def __init__(self, pipe, todo: Todo, progress: Progress, count: int, call: dict, subdirs: bool,
                 close_in_child=()):
        import warnings

        self.todo, self.progress, self.count = todo, progress, count
        self.pids: list[int] = []
        self.reaped: set[int] = set()
        self.task_files: list = []  # this process's ends of each worker's pipes
        self.results: list[int] = []
        self.queue: queue.Queue = queue.Queue()
        self.in_flight = [0] * count
        self.exhausted = self.started = False
        self.readers: list[threading.Thread] = []
        parent, death_signal = os.getpid(), _death_signal()
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            for k in range(count):
                task_r, task_w = os.pipe()
                result_r, result_w = os.pipe()
                with warnings.catch_warnings():  # Python 3.12+ warns about fork in a process with threads (gloo,
                    warnings.simplefilter("ignore", DeprecationWarning)  # torch); the child only runs _worker_loop
                    pid = os.fork()
                if pid == 0:  # the worker: never returns into the caller's stack
                    code = 0
                    try:
                        import signal

                        import torch

                        signal.signal(signal.SIGINT, signal.SIG_IGN)
                        signal.signal(signal.SIGTERM, signal.SIG_DFL)
                        _die_with_parent(parent, death_signal)
                        for fd in [*close_in_child, task_w, result_r, *self.results,
                                   *(f.fileno() for f in self.task_files)]:
                            with contextlib.suppress(OSError):
                                os.close(fd)
                        torch.set_num_threads(THREADS_PER_WORKER)  # as the parent set it; DataLoader's pattern
                        with os.fdopen(task_r, "rb") as tasks, os.fdopen(result_w, "wb") as results:
                            _worker_loop(pipe, tasks, results, todo.batch, call, subdirs)
                    except BaseException:
                        code = 1
                    finally:
                        os._exit(code)
                self.pids.append(pid)
                os.close(task_r)
                os.close(result_w)
                self.task_files.append(os.fdopen(task_w, "wb"))
                self.results.append(result_r)
            for k in range(count):  # threads only once every worker is forked
                reader = threading.Thread(target=self._read, args=(k,), name=f"kve_fast-generate-{k}", daemon=True)
                reader.start()
                self.readers.append(reader)
        except BaseException:
            self.close()
            raise

    def _read(self, k: int) -> None:
        """Puts worker ``k``'s messages on the queue, then ``("end", exit status)``."""
        try:
            with os.fdopen(self.results[k], "rb") as f:
                while True:
                    message = _receive(f)
                    if message is None:
                        break
                    self.queue.put((k, message))
        except Exception as exc:  # a stream closed under us, or a message that does not unpickle
            self.queue.put((k, ("error", f"worker process {k}: {describe(exc)}")))
        self.queue.put((k, ("end", _exit_status(self.pids[k]))))

    def _hand_out(self, k: int) -> None:
        if self.exhausted:
            return
        try:
            seeds = self.todo.next_batch()
        except OSError as exc:
            raise Failed(describe(exc)) from None
        if not seeds:
            self.exhausted = True
            return
        try:
            _send(self.task_files[k], seeds)
        except OSError:
            raise Failed(f"worker process {k} exited with batches to do") from None
        self.in_flight[k] += 1

    def get(self, idle=None):
        """The next finished batch, None when all are done; ``idle()`` runs while waiting. ``Failed`` for a
        failure (a worker's error, a worker that died, a file that cannot be checked)."""
        if not self.started:
            self.started = True
            for _ in range(2):
                for k in range(self.count):
                    self._hand_out(k)
        while any(self.in_flight):
            try:
                k, (kind, value) = self.queue.get(timeout=0.2)
            except queue.Empty:
                if idle is not None:
                    idle()
                continue
            if kind == "steps":
                self.progress.add_steps(value)
                if idle is not None:
                    idle()
            elif kind == "files":
                self.in_flight[k] -= 1
                self._hand_out(k)
                return value
            elif kind == "error":
                raise Failed(value)
            elif kind == "end" and self.in_flight[k]:
                code = "" if value is None else f" (exit code {value})" if value >= 0 else f" (signal {-value})"
                raise Failed(f"worker process {k} exited{code} with batches to do")
        return None

    def close(self) -> None:
        """End the workers (SIGTERM; SIGKILL after 10 s) and reap them; the readers end with their pipes."""
        import signal

        for f in self.task_files:
            with contextlib.suppress(OSError):
                f.close()
        for pid in self.pids:  # not reaped yet, so still ours (a zombie at worst): safe to signal
            if pid not in self.reaped:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for pid in self.pids:
            while pid not in self.reaped:
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG if time.monotonic() < deadline else 0)
                except ChildProcessError:
                    done = pid
                if done:
                    self.reaped.add(pid)
                elif time.monotonic() >= deadline:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                else:
                    time.sleep(0.01)
        for reader in self.readers:
            reader.join(timeout=10)


def _encode_png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()

"""The job's processes: one, or torchrun's (torch.distributed), and the one collective the job needs (all-gather
of small Python objects)."""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

from .errors import GenerateError

COLLECTIVE_TIMEOUT = timedelta(minutes=30)  # how long a rank waits for the others at the end of a batch


class Single:
    """One process: the collectives are the identity."""

    rank, world = 0, 1

    def all_gather(self, obj) -> list:
        return [obj]

    def close(self) -> None:
        pass


class Distributed:
    """torch.distributed under torchrun; small Python objects go through a gloo group of this object's own (also
    next to NCCL), which ``close()`` frees, joining its threads, before the interpreter shuts down.

    Why: a gloo worker thread that lets go of a finished all-gather's tensors takes the GIL; if the interpreter is
    shutting down by then, CPython ends that thread inside a C++ destructor and the process aborts ("terminate
    called without an active exception", SIGABRT: a busy machine delays the thread). ``destroy_process_group``
    frees a group only if nothing else holds it, and ``torch.distributed.nn``, imported after
    ``init_process_group`` (diffusers imports it, through ``torch._dynamo``, when the model loads), holds the
    default group in its functions' default arguments. So it is imported first, and the collectives run on a
    group that only this object holds, freed whatever else holds the default one."""

    def __init__(self, backend: str):
        import torch.distributed as dist
        import torch.distributed.nn  # noqa: F401  (before init_process_group: see above)

        self.dist = dist
        dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.group = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)

    def all_gather(self, obj) -> list:
        out = [None] * self.world
        try:
            self.dist.all_gather_object(out, obj, group=self.group)
        except Exception as exc:  # a peer died or timed out (torchrun stops the job when a process exits)
            raise GenerateError(f"rank {self.rank}: lost contact with the other processes ({type(exc).__name__}: "
                                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
        return out

    def close(self) -> None:
        """Destroy every group, then let go of this object's own: freed, it joins its gloo threads now."""
        if self.group is None:
            return
        with contextlib.suppress(Exception):
            self.dist.destroy_process_group()
        self.group = None


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def env_rank() -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` from torchrun's environment (``(0, 1, 0)`` without it)."""
    if not launched_by_torchrun():
        return 0, 1, 0
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))


def connect(device) -> Single | Distributed:
    """The process group for a job on ``device`` (nccl for CUDA, gloo otherwise), or one process."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return Single()
    return Distributed("nccl" if device.type == "cuda" else "gloo")

"""The manifest (``DIR/manifest.jsonl``): one line per file (seed, file, SHA-256, the record's id), fsync'd before the
file lands; read (a torn last line left out), locked against a second job, appended, and each rank's share."""

from __future__ import annotations

import contextlib
import json
import os
import stat

from .. import _files
from .errors import GenerateError, oserror_line
from .seeds import Seeds, seed_file

MANIFEST = "manifest.jsonl"


def read_manifest(path: str, rid: str | None = None, subdirs: bool | None = None) -> tuple[dict[int, str], int, int]:
    """``(SHA-256 by seed (the last line for a seed wins), bytes of complete lines, lines skipped)``.

    A line vouches for a file when it is a JSON object with an int ``seed``, a ``file`` (the seed's name for
    ``subdirs`` when given), a ``sha256`` and the record id ``rid`` (when given); others are skipped and counted.
    A last line without its newline is complete when it is a whole JSON object (an editor dropped the newline);
    otherwise it is torn (a kill mid-append) and not read.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return {}, 0, 0
    end = _complete_end(data)
    index, skipped = _parse_manifest(data[:end], rid, subdirs, None)
    return index, end, skipped


def _complete_end(data: bytes) -> int:
    """Where the manifest's complete lines end in ``data`` (see ``read_manifest``)."""
    end = data.rfind(b"\n") + 1
    with contextlib.suppress(ValueError):
        if isinstance(json.loads(data[end:]), dict):
            return len(data)
    return end


def _parse_manifest(data: bytes, rid, subdirs, keep) -> tuple[dict[int, str], int]:
    index: dict[int, str] = {}
    skipped = 0
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            line = json.loads(line)
        except ValueError:
            skipped += 1
            continue
        if not (isinstance(line, dict) and type(line.get("seed")) is int and isinstance(line.get("file"), str)
                and isinstance(line.get("sha256"), str) and (rid is None or line.get("record") == rid)
                and (subdirs is None or line["file"] == seed_file(line["seed"], subdirs))):
            skipped += 1
            continue
        if keep is None or keep(line["seed"]):
            index[line["seed"]] = line["sha256"]
    return index, skipped


class Manifest:
    """Rank 0's handle on the manifest: locked against a second job, its tail made whole, appended and fsync'd.

    ``created``, ``made_folder``: this run made the file, its folder. The lock is taken on the file at the path: a
    job that waited for it while another took its additions back (unlinked the file, removed the folder) opens the
    path again, so it never writes to a file that is gone.
    """

    def __init__(self, path: str):
        self.path = path
        self.fd = None
        for _ in range(100):
            self.made_folder = not os.path.isdir(os.path.dirname(path))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                st = None
            if st is not None and not stat.S_ISREG(st.st_mode):
                raise GenerateError(f"--outdir: {path} is a {_files.file_kind(st.st_mode)}, not a regular file: "
                                    "refused", code=2)
            self.fd, self.created = _open_manifest(path)
            self._lock()
            if _same_file(self.fd, path):
                break
            self.close()  # unlinked (or replaced) while this process waited for its lock
        else:
            raise GenerateError(f"--outdir: {path} keeps being replaced by another process; refused", code=2)
        self.size = os.fstat(self.fd).st_size

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # no fcntl (Windows): no lock
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.close()
            raise GenerateError(f"--outdir: another kve-fast generate is writing to {os.path.dirname(self.path)} "
                                f"({MANIFEST} is locked)", code=2) from None

    def repair(self, end: int) -> None:
        """Once the run is not refused: end the manifest at its last complete line (``end``, from ``read_manifest``),
        cutting a torn line, or giving a complete last line the newline it lacks, so the next line starts clean."""
        if self.size > end:
            os.ftruncate(self.fd, end)
            os.fsync(self.fd)
        elif end and os.pread(self.fd, 1, end - 1) != b"\n":
            _files.write_all(self.fd, b"\n")
            os.fsync(self.fd)
            end += 1
        self.size = end

    def append(self, lines: list[dict]) -> None:
        """Append ``lines`` and fsync; on a failure, cut what was written (so no torn line is left) and raise."""
        if not lines:
            return
        data = "".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n" for r in lines).encode()
        try:
            _files.write_all(self.fd, data)
            os.fsync(self.fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.size)
            raise
        self.size += len(data)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # also releases the lock
            self.fd = None


def _open_manifest(path: str) -> tuple[int, bool]:
    """``(descriptor, created)`` of the manifest at ``path``, made if missing (never through a symlink)."""
    flags = os.O_RDWR | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
    while True:
        try:
            return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o666), True
        except FileExistsError:
            pass
        try:
            return os.open(path, flags), False
        except FileNotFoundError:  # removed between the two calls: make it
            continue


def _same_file(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file open at ``fd``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def read_share(path: str, end: int, rid: str, subdirs: bool, seeds: Seeds, rank: int, world: int) -> dict[int, str]:
    """The manifest's lines (up to ``end``, where rank 0 cut it) for this rank's share of ``seeds``."""
    try:
        with open(path, "rb") as f:
            data = f.read(end)
    except OSError as exc:
        raise GenerateError(f"rank {rank}: {oserror_line(exc, path)}") from None
    return _parse_manifest(data, rid, subdirs, lambda s: s in seeds and seeds.index(s) % world == rank)[0]

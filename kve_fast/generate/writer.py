"""Putting a process's files in place: each whole (temporary name, fsync, rename), only over a regular file, and
only after its manifest line is durable (the job calls the writer once rank 0 has appended the round's lines)."""

from __future__ import annotations

import contextlib
import os
import stat

from .. import _files
from .errors import oserror_line


class Writer:
    """Puts one process's files in place: whole (temporary name, fsync, rename) and only over regular files."""

    def __init__(self, outdir: str, status: dict):
        self.outdir, self.status = outdir, status
        self.folders: set[str] = set()  # subfolders checked (a real folder, not a link) or made
        self.landed = 0  # files this process put in place
        self.others = 0  # files the other processes had put in place, as of the last round

    def folder(self, rel: str) -> str:
        folder = os.path.dirname(os.path.join(self.outdir, rel))
        if folder not in self.folders:
            try:
                mode = os.lstat(folder).st_mode
            except FileNotFoundError:
                os.makedirs(folder, exist_ok=True)
            else:
                if not stat.S_ISDIR(mode):
                    raise _files.NotRegularFile(0, f"a {_files.file_kind(mode)} stands there, not a folder: refused, "
                                                   "not replaced", folder)
            self.folders.add(folder)
        return folder

    def write(self, files: list[tuple[int, str, bytes]]) -> str | None:
        """Put ``files`` in place; the first failure as one line (the rest are not written), or None."""
        touched = set()
        try:
            for _, rel, data in files:
                path = os.path.join(self.outdir, rel)
                try:
                    touched.add(self.folder(rel))
                    _write(data, path)
                except OSError as exc:
                    return oserror_line(exc, path)
                self.landed += 1
                self.status["written"] = self.others + self.landed
        finally:
            for folder in touched:  # the renames, durable
                fsync_dir(folder)
        return None


def _write(data: bytes, path: str) -> None:
    """``data`` at ``path``, whole or not at all, never over anything but a regular file."""
    _files.write_file_atomic(path, data, regular_only=True)


def fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):  # not every platform or file system lets a folder be fsync'd
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

"""Files written whole or not at all.

Each file is written to a temporary name in its destination folder and renamed over the destination
(``os.replace``, atomic on one file system) only once it is complete. If anything goes wrong first, an
exception, a ``KeyboardInterrupt`` or a ``SystemExit`` raised by a SIGTERM handler, the temporary file
is removed and whatever was at the destination is left as it was. (A SIGKILL or a power cut can leave a
hidden ``.NAME.*.tmp`` file behind, never a truncated ``NAME``.) With ``regular_only=True`` a destination that is
not a regular file (a symlink, a folder, a device, a FIFO) is refused, not replaced.

``write_file_atomic`` writes its bytes with ``write_all`` (one place where a test can make the disk fill up).

Import-light: no torch, numpy or PIL at module level.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile

__all__ = ["atomic_write", "write_file_atomic", "write_all", "save_image_atomic", "image_format", "NotRegularFile"]


class NotRegularFile(FileExistsError):
    """A destination that is not a regular file (``regular_only=True``): refused, not replaced."""


def check_regular(path: str) -> None:
    """Raise ``NotRegularFile`` when something other than a regular file stands at ``path`` (not following links)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(errno.EEXIST, f"a {file_kind(st.st_mode)} stands there, not a regular file: refused, "
                                           "not replaced", path)


def file_kind(mode: int) -> str:
    """``"symlink"``, ``"folder"``, ``"device"``, ... for an ``lstat`` mode."""
    for test, name in ((stat.S_ISLNK, "symlink"), (stat.S_ISDIR, "folder"), (stat.S_ISCHR, "device"),
                       (stat.S_ISBLK, "device"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISREG, "regular file")):
        if test(mode):
            return name
    return "special file"


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte of ``data`` is out (a short write is continued, an error raised)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _temporary(folder: str, name: str) -> tuple[int, str]:
    """A new hidden temporary file beside ``folder/name``: ``(fd, path)``."""
    return tempfile.mkstemp(prefix=f".{name[:100]}.", suffix=".tmp", dir=folder)


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:  # Linux: read without changing it
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _final_mode(path: str) -> int:
    """The mode ``open(path, "wb")`` would leave: an existing file's, else 0o666 less the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, fsync: bool = True, regular_only: bool = False):
    """Yield a file object on a temporary file beside ``path``; on a clean exit it is flushed (and
    fsync'd unless ``fsync=False``) and renamed to ``path``; on any exception it is removed.
    ``regular_only``: raise ``NotRegularFile`` instead of replacing anything but a regular file (checked
    before the temporary file is made, and again just before the rename)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"`mode` must be 'w' or 'wb', got {mode!r}")
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    if regular_only:
        check_regular(path)
    fd, tmp = _temporary(folder, name)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.chmod(tmp, _final_mode(path))
        if regular_only:
            check_regular(path)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_file_atomic(path: str | os.PathLike, data: bytes, *, fsync: bool = True, regular_only: bool = False) -> None:
    """``data`` at ``path``, whole or not at all (``atomic_write``), every byte through ``write_all``."""
    with atomic_write(path, fsync=fsync, regular_only=regular_only) as f:
        write_all(f.fileno(), data)


def image_format(path: str | os.PathLike) -> str | None:
    """The format PIL would save ``path`` in, from its extension (``None`` when PIL has no writer for it)."""
    from PIL import Image

    Image.init()
    fmt = Image.EXTENSION.get(os.path.splitext(os.fspath(path))[1].lower())
    return fmt if fmt in Image.SAVE else None


def save_image_atomic(image, path: str | os.PathLike, format: str | None = None, *, fsync: bool = True,
                      **params) -> None:
    """``image.save(path, format, **params)`` for a PIL image, all or nothing (see ``atomic_write``).

    ``format`` defaults to the one ``path``'s extension names; it is checked before anything is written.
    """
    if format is None:
        format = image_format(path)
        if format is None:
            raise ValueError(f"cannot tell an image format PIL can write from the extension of {os.fspath(path)!r}")
    with atomic_write(path, fsync=fsync) as f:
        image.save(f, format=format, **params)

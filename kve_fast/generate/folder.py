"""The folder, on rank 0 before any work: locked, its record compared, every file checked (nothing adopted, nothing
replaced), then the record written; taken back if the run fails before its first image; and the token every rank
must see (one folder shared by every machine)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import sys
import time

from .. import _files
from .errors import GenerateError, oserror_line
from .manifest import MANIFEST, Manifest, read_manifest
from .record import RECORD, read_record, record_differences, record_id
from .seeds import seed_file
from .writer import fsync_dir

JOB_FILE = ".kve-fast-job"  # rank 0's token for this job: every rank must see it (one shared folder)
SHARED_WAIT = 30.0  # seconds a rank waits for the token to show (network file systems cache lookups)
# What FID tools read as images (pytorch-fid's list; clean-fid and EDM read fewer): none may be foreign.
IMAGE_EXTENSIONS = (".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
_TEMP = re.compile(r"^\.([0-9]{6,}\.png|record\.json|\.kve-fast-job)\..*\.tmp$")  # what atomic_write leaves after a SIGKILL
_FILE = re.compile(r"^([0-9]{6,})\.png$")
_SUBDIR = re.compile(r"^[0-9]{6,}$")


def setup(outdir: str, world: int, record: dict) -> tuple:
    """Rank 0, before any work: lock the manifest, check the record and the whole folder, then write the record.

    Returns ``(manifest, index, token, rid, undo)``; ``rid`` is the id of the folder's record (the one written
    before, when this run's equals it). Raises ``GenerateError`` leaving the folder as it was, byte for byte: the
    checks change nothing, and a folder without a manifest is checked before the manifest (the lock) is made.
    ``undo()`` puts the folder back as it was before this run while the manifest holds no line of it (the job
    calls it, holding the lock, when the job fails before its first image: a failure such as an out-of-memory
    batch must not leave a record that refuses the corrected command).
    """
    manifest = None
    wrote_record = False
    try:
        if os.path.isdir(outdir) and not os.path.lexists(os.path.join(outdir, MANIFEST)):
            _check_folder(outdir, record, None)
        manifest = Manifest(os.path.join(outdir, MANIFEST))
        old, rid, index, end, temporaries = _check_folder(outdir, record, manifest)
        manifest.repair(end)
        for path in temporaries:
            with contextlib.suppress(OSError):
                os.unlink(path)
        if old is None:  # before the first image
            wrote_record = True
            _write_named(os.path.join(outdir, RECORD), (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
            fsync_dir(outdir)
        token = None
        if world > 1:  # every rank must write into this very folder (one file system on every machine)
            token = f"{os.getpid()}-{time.time_ns()}-{os.urandom(8).hex()}"
            _write_named(os.path.join(outdir, JOB_FILE), token.encode())
        return manifest, index, token, rid, lambda: _undo_setup(manifest, wrote_record)
    except BaseException as exc:
        if manifest is not None:
            _undo_setup(manifest, wrote_record)
            manifest.close()
        if isinstance(exc, OSError):
            raise GenerateError(oserror_line(exc, exc.filename or outdir)) from None
        raise


def _check_folder(outdir: str, record: dict, manifest) -> tuple:
    """Rank 0's checks, which change nothing: the folder's record against ``record`` (compared by value), the
    manifest's lines under it, the whole folder. Returns ``(old record or None, rid, index, end, temporaries)``;
    ``GenerateError`` (code 2) for a refusal."""
    old = read_record(os.path.join(outdir, RECORD))
    if old is not None:
        diff = record_differences(old, record)
        if diff:
            raise GenerateError(f"--outdir: {outdir} holds images made with other settings ({RECORD}): "
                                f"{'; '.join(diff)}; use another folder, or the same settings", code=2)
    if old is None and manifest is not None and manifest.size:
        raise GenerateError(f"--outdir: {outdir} holds a {MANIFEST} but no {RECORD} (an older kve-fast generate, "
                            "or the record was removed): nothing vouches for its files; use another folder", code=2)
    rid = record_id(record if old is None else old)
    index, end, skipped = read_manifest(manifest.path, rid, record["subdirs"]) if manifest else ({}, 0, 0)
    temporaries, problems = _scan(outdir, index, record["subdirs"])
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise GenerateError(f"--outdir: {problems[0]}{more}", code=2)
    if skipped:
        print(f"kve-fast: warning: {manifest.path}: {skipped} lines are not file records of this {RECORD}; ignored",
              file=sys.stderr)
    return old, rid, index, end, temporaries


def _undo_setup(manifest, wrote_record: bool) -> None:
    """Rank 0, holding the manifest's lock: while the manifest holds no line, remove what ``setup`` added (the
    record it wrote, the manifest file it created, the folder it made), so the folder is as it was (no file can have
    landed without a line). Under the lock, so that no other job can have started on the folder meanwhile."""
    if manifest.size or manifest.fd is None:
        return
    outdir = os.path.dirname(manifest.path)
    for undo, path in ((os.unlink, os.path.join(outdir, RECORD) if wrote_record else None),
                       (os.unlink, manifest.path if manifest.created else None),
                       (os.rmdir, outdir if manifest.made_folder else None)):
        if path is not None:
            with contextlib.suppress(OSError):  # (each on its own: a record that was never written is no reason to stop)
                undo(path)


def _write_named(path: str, data: bytes) -> None:
    """``data`` at ``path`` (whole, over a regular file only), failing with a ``GenerateError`` that names ``path``."""
    try:
        _files.write_file_atomic(path, data, regular_only=True)
    except OSError as exc:
        raise GenerateError(oserror_line(exc, path)) from None


def release(manifest: Manifest, world: int, undo=None) -> None:
    """Rank 0, at the end of the run: remove the job's token; take back what ``setup`` added (``undo``: given when the
    run failed; it takes back nothing once the manifest holds a line), still holding the lock; release the lock."""
    if world > 1:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(os.path.dirname(manifest.path), JOB_FILE))
    if undo is not None:
        undo()
    manifest.close()


def _scan(outdir: str, listed: dict[int, str], subdirs: bool) -> tuple[list[str], list[str]]:
    """``(temporary files a killed run left, problems)``: the whole folder, before any work.

    A problem is an image file the manifest does not list (at its seed's name for this layout), or something
    other than a regular file (a symlink, a device, a folder) where generate writes or FID tools read.
    """
    temporaries, problems = [], []
    for root, dirs, files in os.walk(outdir):
        top = root == outdir
        for name in sorted(dirs + files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, outdir).replace(os.sep, "/")
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                continue
            kind = _files.file_kind(mode)
            if top and name in (MANIFEST, RECORD, JOB_FILE):
                continue  # checked where they are opened
            if _TEMP.match(name) and stat.S_ISREG(mode):
                temporaries.append(path)
                continue
            match = _FILE.match(name)
            if match is not None:
                seed = int(match.group(1))
                if not stat.S_ISREG(mode):
                    problems.append(f"{path} is a {kind}, not a regular file: refused, not replaced; remove it")
                elif rel != seed_file(seed, subdirs) or seed not in listed:
                    problems.append(f"{path} is not in {MANIFEST}: kve-fast generate did not make it under this "
                                    "record (it adopts no file); move it out of the folder")
                continue
            if top and _SUBDIR.match(name) and not stat.S_ISDIR(mode):
                problems.append(f"{path} is a {kind}, not a folder: refused, not replaced; remove it")
            elif os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                problems.append(f"{path} is an image kve-fast generate did not make (FID tools would read it); move "
                                "it out of the folder")
    return temporaries, problems


def sees_token(outdir: str, token: str, wait: float = SHARED_WAIT) -> bool:
    """Whether this process sees rank 0's job token in ``outdir`` (within ``wait`` seconds)."""
    deadline = time.monotonic() + wait
    while True:
        with contextlib.suppress(OSError):
            with open(os.path.join(outdir, JOB_FILE)) as f:
                if f.read() == token:
                    return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)

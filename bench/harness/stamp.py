"""The tree stamp carried to the device machine, whose copy of the tree has no ``.git``: written here by
``bench/device_prepare.sh``, read there by ``kve_fast.benchmark.provenance.stamp_state``."""

from __future__ import annotations

import json
import os
import subprocess
import time

from kve_fast.benchmark.provenance import ROOT, STAMP, git_state, tree_hash

__all__ = ["write_stamp"]


def write_stamp(root: str = ROOT, path: str | None = None) -> dict:
    """Record the commit, the dirty flag and a hash of every file that travels (tracked, and untracked files git
    does not ignore) at ``root/.whl/tree_stamp.json``: a copy of the tree without ``.git`` (the device machine's)
    then knows its commit, and whether a file changed after the stamp (``stamp_state``)."""
    git = git_state(root)
    if git["source"] != "git":
        raise RuntimeError("write_stamp needs a git checkout")
    try:
        files = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                               capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        files = None
    if files is None or files.returncode != 0:
        raise RuntimeError("git ls-files failed")
    paths = sorted({p for p in files.stdout.split("\0") if p and os.path.isfile(os.path.join(root, p))})
    stamp = {"commit": git["commit"], "dirty": git["dirty"], "dirty_files": git["dirty_files"], "files": paths,
             "sha256": tree_hash(root, paths), "date_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    path = path or os.path.join(root, STAMP)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(stamp, f)
    return stamp

"""``kve-fast generate``: one PNG per seed, for evaluation sets (50,000 images for FID), on one process or
many (``torchrun``: NCCL on GPUs, gloo on CPUs, multi-node through torchrun's rendezvous).

    kve-fast generate --model M --seeds 0-49999 --outdir DIR [--batch N] [--subdirs]
    torchrun --nproc_per_node=K -m kve_fast generate --model M --seeds 0-49999 --outdir DIR

The full reference (the folder, the record, the write protocol, resumes, threads, faults) is docs/generate.md.
In short:

- ``DIR/record.json`` holds everything that can change a file's bytes (model hash, sampler settings, noise
  stream, precision, layout, ``--batch``, ``--subdirs``, the device kind and CPU threads, torch's precision switches,
  the environment variables that change kernels, library versions). It is written atomically before the first
  image; every later run into ``DIR`` must match it by value or is refused, leaving the folder as it was.
- ``DIR/manifest.jsonl`` gets a line per file (seed, file, SHA-256, the record's id), fsync'd *before* the file is
  renamed into place (write-ahead): every file under a seed's name that a killed run left is vouched for by a
  line with its hash. A PNG the manifest does not vouch for is refused, never adopted; a listed file whose bytes
  changed is made again.
- On the CPU every worker samples with one intra-op thread (``--workers`` worker processes side by side, on
  batches of their own), so the files are the same however the seeds are split over processes and workers.
- Seeds are ranges, never a list; each process walks its share lazily, checking files as it goes.

The modules, from the bottom up: ``seeds`` (parsing, ranges, file names), ``errors``, ``record`` (what can change
the bytes, compared by value), ``manifest`` (read, locked, appended), ``writer`` (files put in place), ``folder``
(rank 0's checks, setup and take-back), ``ranks`` (torchrun's processes), ``workers`` (this process's share, in
this process or in forked worker processes), ``checks`` (the arguments' rules, which the command calls too) and
``job`` (``generate_images`` and its rounds).

Import-light: torch, PIL and diffusers load inside the functions that need them.
"""

from __future__ import annotations

from .checks import check_outdir, check_workers
from .errors import GenerateError
from .folder import IMAGE_EXTENSIONS, JOB_FILE
from .job import Summary, generate_images
from .manifest import MANIFEST, read_manifest
from .ranks import connect, env_rank, launched_by_torchrun
from .record import (BITS_ENVIRONMENT, RECORD, RECORD_FORMAT, THREADS_PER_WORKER, device_identity, make_record,
                     model_identity, module_identity, record_differences, record_id, sampler_settings,
                     software_versions)
from .seeds import MAX_SEEDS, SEED_LIMIT, SUBDIR_SIZE, Seeds, parse_seeds, seed_file
from .workers import FORK_WORKERS, default_workers

__all__ = ["generate_images", "Summary", "GenerateError", "Seeds", "parse_seeds", "seed_file", "connect", "env_rank",
           "launched_by_torchrun", "default_workers", "check_outdir", "check_workers", "model_identity",
           "module_identity", "device_identity", "sampler_settings", "software_versions", "make_record", "record_id",
           "record_differences", "read_manifest", "MANIFEST", "RECORD", "RECORD_FORMAT", "JOB_FILE",
           "IMAGE_EXTENSIONS", "BITS_ENVIRONMENT", "THREADS_PER_WORKER", "FORK_WORKERS", "MAX_SEEDS", "SEED_LIMIT",
           "SUBDIR_SIZE"]

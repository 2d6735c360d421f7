"""``kve-fast generate``: one PNG per seed, for evaluation sets (50,000 images for FID), on one process or
many (``torchrun``: NCCL on GPUs, gloo on CPUs, multi-node through torchrun's rendezvous).

    kve-fast generate --model M --seeds 0-49999 --outdir DIR [--batch N] [--subdirs]
    torchrun --nproc_per_node=K -m kve_fast generate --model M --seeds 0-49999 --outdir DIR

What holds:

- **One image per seed.** Image ``s`` is ``DIR/{s:06d}.png`` (``--subdirs``: ``DIR/{s - s % 1000:06d}/{s:06d}.png``),
  at the model's own size, lossless. It is sampled with its own CPU generator, ``torch.Generator().manual_seed(s)``
  (exact noise: the reference's generator lists; fast noise: per-sample Philox keys drawn from that generator),
  so its noise does not depend on the batch it lands in, its place there, the number of processes or the order.
  Every batch is padded to ``--batch`` samples (repeating its seeds, whose copies are dropped), so the model
  always sees the same batch size: with the same ``--batch`` on the same kind of device and software, a seed
  gives the same file however the seeds are split. (Different ``--batch`` values can differ in low-order bits,
  where the model's convolutions and matrix products pick other kernels for another batch size.)
- **Nothing lost, nothing corrupt.** Each file is written to a temporary name and renamed when complete. A
  manifest, ``DIR/manifest.jsonl``, gets one JSON line per file once it has landed (seed, file, SHA-256 of its
  bytes, model, sampler settings, kve_fast version), appended by rank 0 and fsync'd after every batch. A rerun of
  the same command skips the seeds whose files are complete (the manifest's hash matches, or, for a file that
  landed after the last manifest line, the PNG decodes whole), so a crash, a kill or a preemption loses at
  most the batches in flight. An incomplete last manifest line (a kill mid-append) is cut off by the rerun.
  A rerun with other settings or another model into the same folder is refused.
- **Failures stop the job.** A rank that fails reports its reason on stderr; after each batch every rank learns
  of it (one small all-gather), all stop, and the job exits non-zero. A rank that dies outright is stopped by
  torchrun, which then ends the others. SIGINT/SIGTERM drop the batch in flight (no partial files) and exit
  130/143. Progress and the summary print on rank 0 only.

Import-light: torch, PIL and diffusers load inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import sys
import time
from datetime import timedelta

MANIFEST = "manifest.jsonl"
JOB_FILE = ".kve-fast-job"  # rank 0's token for this job: every rank must see it (one shared folder)
SHARED_WAIT = 30.0  # seconds a rank waits for the token to show (network file systems cache lookups)
SEED_LIMIT = 2**32  # torch's CPU generator keeps only the low 32 bits of a seed: larger ones repeat images
MAX_SEEDS = 10_000_000
SUBDIR_SIZE = 1000
COLLECTIVE_TIMEOUT = timedelta(minutes=30)  # how long a rank waits for the others at the end of a batch
_TEMP = re.compile(r"^\.\d{6,}\.png\..*\.tmp$")  # what _files.atomic_write leaves behind after a SIGKILL
_FILE = re.compile(r"^(\d{6,})\.png$")


class GenerateError(Exception):
    """A failure that stops the job; ``code`` is the exit status, ``printed`` whether the reason is already out."""

    def __init__(self, message: str, code: int = 1, printed: bool = False):
        super().__init__(message)
        self.code, self.printed = code, printed


# ---- seeds and files ---------------------------------------------------------------------------------------

def parse_seeds(text: str) -> list[int]:
    """``"0-49999"``, ``"7"``, ``"0,5,10-19"``: the seeds, sorted, each once. ``ValueError`` naming the problem."""
    seeds: set[int] = set()
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise ValueError("expected seeds such as 0-49999 or 1,5,10-19, got nothing")
    for part in parts:
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if match is None:
            raise ValueError(f"expected seeds such as 0-49999 or 1,5,10-19, got {part!r}")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"the range {part!r} runs backwards")
        if hi >= SEED_LIMIT:
            raise ValueError(f"seeds go from 0 to {SEED_LIMIT - 1} (torch's CPU generator keeps only the low 32 bits "
                             f"of a seed, so larger seeds would repeat images), got {hi}")
        if hi - lo + 1 + len(seeds) > MAX_SEEDS:
            raise ValueError(f"at most {MAX_SEEDS:,} seeds per run")
        seeds.update(range(lo, hi + 1))
    return sorted(seeds)


def seed_file(seed: int, subdirs: bool = False) -> str:
    """The file of ``seed``, relative to the output folder (``/``-separated), as EDM's generate.py names them."""
    name = f"{seed:06d}.png"
    return f"{seed - seed % SUBDIR_SIZE:06d}/{name}" if subdirs else name


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_identity(name: str, folder) -> dict:
    """``{"name", "sha256"}``: the model as given, and a hash of its config.json and weights files."""
    h = hashlib.sha256()
    files = sorted(f for f in os.listdir(folder.unet_dir)
                   if f == "config.json" or f.startswith("diffusion_pytorch_model"))
    for file in files:
        h.update(file.encode() + b"\0")
        h.update(bytes.fromhex(_sha256_file(os.path.join(folder.unet_dir, file))))
    return {"name": str(name), "sha256": h.hexdigest()}


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):  # not every platform or file system lets a folder be fsync'd
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---- the manifest ------------------------------------------------------------------------------------------

def read_manifest(path: str) -> tuple[dict[int, dict], int, int]:
    """``(records by seed (the last line for a seed wins), bytes of complete lines, lines skipped)``.

    A last line without its newline (a kill mid-append) is not complete and is not read; lines that are not
    JSON objects with an int ``seed`` are skipped and counted.
    """
    records: dict[int, dict] = {}
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return records, 0, 0
    end = data.rfind(b"\n") + 1
    skipped = 0
    for line in data[:end].splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            skipped += 1
            continue
        if not (isinstance(record, dict) and isinstance(record.get("seed"), int)
                and isinstance(record.get("file"), str)):
            skipped += 1
            continue
        records[record["seed"]] = record
    return records, end, skipped


class _Manifest:
    """Rank 0's handle on the manifest: locked against a second job, its torn tail cut, appended and fsync'd."""

    def __init__(self, path: str):
        self.path = path
        self.existed = os.path.exists(path)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            import fcntl
        except ImportError:  # no fcntl (Windows): no lock
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(self.fd)
                raise GenerateError(f"--outdir: another kve-fast generate is writing to {os.path.dirname(path)} "
                                    f"({MANIFEST} is locked)", code=2) from None
        self.records, end, self.skipped = read_manifest(path)
        if os.fstat(self.fd).st_size > end:  # a torn last line: cut it, so the next line starts clean
            os.ftruncate(self.fd, end)
            os.fsync(self.fd)

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        data = "".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n" for r in records).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # also releases the lock
            self.fd = None


# ---- processes ---------------------------------------------------------------------------------------------

class _Single:
    """One process: the collectives are the identity."""

    rank, world, local_rank = 0, 1, 0

    def all_gather(self, obj) -> list:
        return [obj]

    def close(self) -> None:
        pass


class _Distributed:
    """torch.distributed under torchrun; small Python objects go through a gloo group (also next to NCCL)."""

    def __init__(self, backend: str):
        import torch.distributed as dist

        self.dist = dist
        dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.group = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)

    def all_gather(self, obj) -> list:
        out = [None] * self.world
        try:
            self.dist.all_gather_object(out, obj, group=self.group)
        except Exception as exc:  # a peer died or timed out (torchrun stops the job when a process exits)
            raise GenerateError(f"rank {self.rank}: lost contact with the other processes ({type(exc).__name__}: "
                                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def env_rank() -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` from torchrun's environment (``(0, 1, 0)`` without it)."""
    if not launched_by_torchrun():
        return 0, 1, 0
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))


def connect(device) -> _Single | _Distributed:
    """The process group for a job on ``device`` (nccl for CUDA, gloo otherwise), or one process."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return _Single()
    return _Distributed("nccl" if device.type == "cuda" else "gloo")


# ---- the job -----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Summary:
    written: int  # images this run wrote (all ranks)
    skipped: int  # seeds whose files were already complete
    seconds: float  # sampling and writing, from the first batch to the last
    world: int

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


def sampler_settings(pipe, steps: int, solver: str, noise: str, tf32: bool = False) -> dict:
    """What decides the images besides the model and the seed (checked on a rerun into the same folder)."""
    from .precision import model_dtype

    config = pipe.scheduler.config
    keys = ("sigma_schedule", "sigma_min", "sigma_max", "s_churn", "s_noise", "s_min", "s_max", "rho")
    scheduler = {k: config[k] for k in keys if k in config}
    scheduler.setdefault("sigma_schedule", "diffusers")
    channels, height, width = pipe._image_shape(1)[1:]
    return {"steps": steps, "solver": solver, "noise": noise, "scheduler": scheduler,
            "image": [channels, height, width],
            "precision": {"unet_dtype": str(model_dtype(pipe.unet)).replace("torch.", ""), "tf32": tf32}}


def _differences(record: dict, model: dict, settings: dict) -> list[str]:
    out = []
    old_model = record.get("model") or {}
    if old_model.get("sha256") not in (None, model["sha256"]):
        out.append(f"model {old_model.get('name')!r} (another model or other weights)")
    old = record.get("settings") or {}
    for key, value in settings.items():
        if key in old and old[key] != value:
            out.append(f"{key} {old[key]!r} (now {value!r})")
    return out


def _check_png(path: str, size: tuple[int, int], mode: str) -> bool:
    """Whether ``path`` is a whole PNG of this size and mode (every byte decoded)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.format != "PNG" or image.size != size or image.mode != mode:
                return False
            image.load()
        return True
    except Exception:  # truncated, corrupt, not an image, unreadable
        return False


def _verify(outdir: str, seeds: list[int], listed: dict[int, str], subdirs: bool, size, mode, new_record):
    """``(complete seeds, records for complete files the manifest lacks, files no manifest could have written)``.

    ``listed``: the manifest's SHA-256 of each seed's file (where the manifest lists it under today's name).
    """
    done, recovered, foreign = [], [], []
    for seed in seeds:
        rel = seed_file(seed, subdirs)
        path = os.path.join(outdir, rel)
        if not os.path.isfile(path):
            continue
        sha = listed.get(seed)
        if sha is not None:
            if sha == _sha256_file(path):
                done.append(seed)
            continue  # changed since it was listed: made again
        if _check_png(path, size, mode):
            if new_record is None:
                foreign.append(rel)
            else:
                done.append(seed)
                recovered.append(new_record(seed, rel, _sha256_file(path), recovered=True))
    return done, recovered, foreign


def _remove_temporaries(outdir: str, subdirs: bool) -> None:
    folders = [outdir]
    if subdirs:
        folders += [os.path.join(outdir, d) for d in os.listdir(outdir)
                    if re.fullmatch(r"\d{6,}", d) and os.path.isdir(os.path.join(outdir, d))]
    for folder in folders:
        for name in os.listdir(folder):
            if _TEMP.match(name):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, name))


def _sees_token(outdir: str, token: str, wait: float = SHARED_WAIT) -> bool:
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


def _encode_png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _write(image, outdir: str, rel: str) -> str:
    """The PNG of ``image`` at ``outdir/rel``, written whole or not at all; returns the SHA-256 of its bytes."""
    from ._files import atomic_write

    data = _encode_png(image)
    path = os.path.join(outdir, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_write(path) as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


def _padded(seeds: list[int], batch: int) -> list[int]:
    """``seeds`` repeated up to ``batch`` entries: the model always runs at one batch size."""
    return [seeds[i % len(seeds)] for i in range(max(batch, len(seeds)))]


def generate_images(pipe, seeds, outdir: str, *, steps: int = 50, batch: int = 64, subdirs: bool = False,
                    backend: str = "auto", noise: str = "exact", solver: str = "heun", model: dict | None = None,
                    comm=None, quiet: bool = True, version: str | None = None, run_info: dict | None = None,
                    status: dict | None = None, cuda_graph=None, tf32: bool = False,
                    channels_last: bool = False) -> Summary:
    """Write ``outdir/{seed:06d}.png`` for every seed with ``pipe`` (a ``KarrasVePipeline`` on its device).

    This process samples its share of the seeds that lack a complete file (``comm``: the job's processes, one
    by default) and rank 0 keeps the manifest; see the module docstring. ``model``: ``{"name", "sha256"}`` for
    the manifest (default: the UNet's class). Raises ``GenerateError`` when a rank fails, on every rank.
    ``status["written"]`` counts the images written so far by all ranks (for a report after an interrupt).
    """
    import torch
    from tqdm.auto import tqdm

    if version is None:
        from . import __version__ as version
    comm = comm or _Single()
    status = {} if status is None else status
    status["written"] = 0
    rank, world = comm.rank, comm.world
    seeds = sorted(set(int(s) for s in seeds))
    model = model or {"name": type(pipe.unet).__name__, "sha256": None}
    settings = sampler_settings(pipe, steps, solver, noise, tf32)
    channels, height, width = settings["image"]
    size, mode = (width, height), {1: "L", 3: "RGB", 4: "RGBA"}.get(channels)
    if mode is None:
        raise GenerateError(f"the model's images have {channels} channels; only 1 (grey), 3 (RGB) or 4 (RGBA) "
                            "make PNG files", code=2)
    outdir = os.path.abspath(outdir)
    info = dict(run_info or {}, backend=backend, batch=batch, world=world)

    def new_record(seed, rel, sha, recovered=False):
        record = {"seed": seed, "file": rel, "sha256": sha, "model": model, "settings": settings,
                  "kve_fast": version, "run": info}
        if recovered:
            record["recovered"] = True
        return record

    # 1. Rank 0 locks and reads the manifest, checks the settings, removes a killed run's temporary files.
    manifest = None
    setup = None
    try:
        if rank == 0:
            os.makedirs(outdir, exist_ok=True)
            manifest = _Manifest(os.path.join(outdir, MANIFEST))
            for record in manifest.records.values():
                diff = _differences(record, model, settings)
                if diff:
                    raise GenerateError(f"--outdir: {outdir} holds images made with other settings: "
                                        f"{'; '.join(diff)}; use another folder, or the same settings", code=2)
            _remove_temporaries(outdir, subdirs)
            listed = {seed: r.get("sha256") for seed, r in manifest.records.items()
                      if r["file"] == seed_file(seed, subdirs)}
            token = None
            if world > 1:  # every rank must write into this very folder (one file system on every machine)
                from ._files import atomic_write

                token = f"{os.getpid()}-{time.time_ns()}-{os.urandom(8).hex()}"
                with atomic_write(os.path.join(outdir, JOB_FILE), "w") as f:
                    f.write(token)
            if manifest.skipped:
                print(f"kve-fast: warning: {manifest.path}: {manifest.skipped} lines are not file records; ignored",
                      file=sys.stderr)
            setup = ("ok", listed, manifest.existed, token)
    except GenerateError as exc:
        setup = ("error", str(exc), exc.code)
    except Exception as exc:
        setup = ("error", f"{outdir}: {type(exc).__name__}: {exc}", 1)
    try:
        got = comm.all_gather(setup)[0]
        if got[0] == "error":
            raise GenerateError(got[1], code=got[2], printed=rank != 0)

        # 2. Every rank checks its slice of the existing files.
        listed, existed, token = got[1], got[2], got[3]
        if token is not None and not _sees_token(outdir, token):
            blind = ([], [], [], True)
        else:
            blind = (*_verify(outdir, seeds[rank::world], listed, subdirs, size, mode, new_record if existed else None),
                     False)
        gathered = comm.all_gather(blind)
        blind = [i for i, g in enumerate(gathered) if g[3]]
        if blind:
            raise GenerateError(f"--outdir: rank {', '.join(map(str, blind))} cannot see the {JOB_FILE} file rank 0 "
                                f"wrote to {outdir}: with processes on several machines, --outdir must be one folder "
                                "they all share (NFS, Lustre, ...) at the same path", code=2, printed=rank != 0)
        done = {s for d, _, _, _ in gathered for s in d}
        foreign = sorted(f for _, _, fs, _ in gathered for f in fs)
        if foreign:
            if rank == 0 and not existed and not manifest.records:  # leave the folder as it was
                with contextlib.suppress(OSError):
                    os.unlink(manifest.path)
            more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
            raise GenerateError(f"--outdir: {outdir} already holds {foreign[0]}{more} but no {MANIFEST}: not written "
                                "by kve-fast generate; use an empty folder or move those files", code=2,
                                printed=rank != 0)
        if rank == 0:
            manifest.append([r for _, rs, _, _ in gathered for r in rs])
        todo = [s for s in seeds if s not in done]
        share = todo[rank::world]
        rounds = -(-len(todo[0::world]) // batch)  # rank 0 has the largest share

        # 3. Batches: sample, write, then one all-gather with the new records and any failure.
        pipe.set_progress_bar_config(disable=True)
        bar = tqdm(total=len(todo), unit="img", desc="generating", disable=quiet or rank != 0, file=sys.stderr,
                   dynamic_ncols=True)
        written, failures, start = 0, [], time.perf_counter()
        try:
            for r in range(rounds):
                mine = share[r * batch:(r + 1) * batch]
                landed, error = [], None
                if mine:
                    try:
                        padded = _padded(mine, batch)
                        images = pipe(len(padded), steps, [torch.Generator().manual_seed(s) for s in padded],
                                      output_type="pil", backend=backend, noise=noise, solver=solver,
                                      cuda_graph=cuda_graph, tf32=tf32, channels_last=channels_last).images
                        folders = set()
                        for seed, image in zip(mine, images):
                            rel = seed_file(seed, subdirs)
                            landed.append(new_record(seed, rel, _write(image, outdir, rel)))
                            folders.add(os.path.dirname(os.path.join(outdir, rel)))
                        for folder in folders:  # the renames, durable before the manifest lists them
                            _fsync_dir(folder)
                    except Exception as exc:
                        error = f"{type(exc).__name__}: {exc}"
                        if rank != 0:  # rank 0 reports every failure below
                            print(f"kve-fast: error: rank {rank}: {error}", file=sys.stderr)
                gathered = comm.all_gather((landed, error))
                new = [rec for recs, _ in gathered for rec in recs]
                written += len(new)
                status["written"] = written
                if rank == 0:
                    manifest.append(new)
                    bar.update(len(new))
                failures = [(i, e) for i, (_, e) in enumerate(gathered) if e is not None]
                if failures:
                    break
        finally:
            bar.close()
        seconds = time.perf_counter() - start
        if failures:
            where = f"rank {', '.join(str(i) for i, _ in failures)} failed: " if world > 1 else ""
            message = f"{where}{failures[0][1]}; {written} images written, rerun the same command to resume"
            if rank == 0:
                print(f"kve-fast: error: {message}", file=sys.stderr)
            comm.all_gather(None)  # rank 0 has reported before any process exits (torchrun then stops the rest)
            raise GenerateError(message, code=1, printed=True)
        return Summary(written=written, skipped=len(done), seconds=seconds, world=world)
    finally:
        if manifest is not None:
            manifest.close()
            if world > 1:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(outdir, JOB_FILE))

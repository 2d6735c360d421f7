"""``kve-fast bench``: time diffusers' pipeline and kve_fast (eager and CUDA-graphed, exact and fast noise)
on your own model and GPU, against the floor of the model itself.

    kve-fast bench --model path/to/unet --batch-size 1 8 --device cuda --json bench.json --plot bench.png

For each batch size, one table row per way of sampling:

- ``diffusers KarrasVePipeline``: the reference (a CPU ``torch.Generator``, the only kind it accepts;
  only for 3-channel models with an int ``sample_size`` and the reference's schedule: its pipeline
  hard-codes ``(batch, 3, size, size)``);
- ``kve_fast eager`` and ``kve_fast graphed`` (``cuda_graph=False`` / ``True``), each with ``exact``
  noise (the reference's stream, bit-identical) and ``fast`` noise (drawn on the device).

Columns: median ms per call (``torch.cuda.synchronize`` around each call on CUDA, host clock), the speedup over
the reference, the ratio to the floor (``2N - 1`` times one model forward captured in a CUDA graph, measured
in the same run; on the CPU, or where capture fails, one eager forward instead, and the table says so), the
time from the first call to the first image (capture included: ``clear_graphs()`` first), how many timed
calls the median is of, and bit-exactness: exact rows against diffusers (the final sample with
``torch.equal``, the ``np`` images with ``np.array_equal``) and graphed rows against eager ones. Rows that
cannot run on the model or device are left out of the table, with one line saying why; columns empty in every
row are left out too.

Low precision (``--unet-dtype bf16|fp16``, ``--tf32``; ``bench_pipeline(..., unet_dtype=, tf32=)``): diffusers'
row runs the float32 UNet as always (it cannot run a half-precision one); kve_fast's rows run a copy of the
UNet converted to that dtype (``copy.deepcopy(unet).to(dtype)``, made per configuration, freed after; the
caller's UNet is not touched) natively, and the floor is ``2N - 1`` graphed forwards of that copy (input in
its dtype; NCSN++ FIR blocks on the Triton kernel, ``kve_fast.ncsnpp.make_fast``, as the sampler's fast
modes run them). Bits cannot match diffusers there: exact-noise rows report the relative RMS difference of
their final latent from diffusers' float32 one (``||a - b|| / ||b||``) instead; graphed rows are still
compared bit for bit with eager ones (same kernels, same precision). Row labels and the floor say the
precision.

The package, one file per part: ``provenance`` (what a record says about itself, the repeat rule), ``timing``
(clocks, repeat counts, bit comparisons, the environment record), ``floor`` (``measure_floor``), ``rows``
(``bench_pipeline``: one configuration's rows; ``jit_warmup``), ``report`` (markdown, verdicts, JSON,
``write_outputs``), ``plot`` (pictures, matplotlib optional) and ``cli`` (the command). ``bench/graph_bench.py``
drives the same functions; the repository's other measuring tools (their runs, exit status, device sessions) are
``bench/harness``, not part of the installed package. Import-light: torch, numpy and diffusers
load inside the functions, so ``kve-fast --help`` stays fast.
"""

from __future__ import annotations

from .cli import BenchError, add_arguments, run
from .floor import measure_floor
from .plot import write_plot
from .report import exactness_failures, format_markdown, write_outputs
from .rows import SharedReference, bench_pipeline, graph_support, jit_warmup
from .timing import RepeatPolicy, environment

# what `kve-fast bench` and a user timing their own pipeline need; the parts' other names live in their modules
__all__ = ["add_arguments", "run", "BenchError", "bench_pipeline", "SharedReference", "RepeatPolicy",
           "measure_floor", "jit_warmup", "graph_support", "environment", "format_markdown", "write_outputs",
           "exactness_failures", "write_plot"]

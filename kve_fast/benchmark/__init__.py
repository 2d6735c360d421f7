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

The package, one file per part: ``timing`` (clocks, repeat counts, bit comparisons, the environment record),
``floor`` (``measure_floor``), ``rows`` (``bench_pipeline``: one configuration's rows; ``jit_warmup``),
``report`` (markdown, verdicts, JSON, ``write_outputs``), ``plot`` (pictures, matplotlib optional) and ``cli``
(the command). ``bench/graph_bench.py`` drives the same functions. Import-light: torch, numpy and diffusers
load inside the functions, so ``kve-fast --help`` stays fast.
"""

from __future__ import annotations

from .cli import BenchError, add_arguments, run
from .floor import measure_floor
from .plot import write_chart, write_plot
from .report import (COLUMNS, exactness_failures, floors_table, format_markdown, left_out_lines, precision_verdicts,
                     table_rows, to_json, verdicts, write_outputs, write_text)
from .provenance import Outcome, ScriptRun, git_state, missing, provenance, required_repeats, time_stats
from .rows import (FAST_FIR_FP32_BOUND, FIRST_IMAGE_TARGET_S, FLOOR_TARGET, KINDS, ROW_LABELS, SharedReference,
                   _graphs_module, _row_record, bench_pipeline, graph_support, jit_warmup, row_label,
                   supports_cuda_graph)
from .timing import (GRAPH_ENV, RepeatPolicy, _first_line, compare, environment, inside_share, low_precision_copy,
                     precision_label, relative_rms)

__all__ = ["add_arguments", "run", "bench_pipeline", "measure_floor", "format_markdown", "write_outputs",
           "environment", "RepeatPolicy", "graph_support", "jit_warmup", "BenchError", "ROW_LABELS", "COLUMNS",
           "precision_label", "relative_rms", "compare", "exactness_failures", "verdicts", "precision_verdicts",
           "write_plot", "write_chart", "left_out_lines", "to_json", "write_text", "table_rows", "floors_table",
           "row_label", "supports_cuda_graph", "inside_share", "low_precision_copy", "KINDS", "GRAPH_ENV",
           "FLOOR_TARGET", "FIRST_IMAGE_TARGET_S", "SharedReference", "FAST_FIR_FP32_BOUND", "provenance",
           "git_state", "missing", "required_repeats", "time_stats", "Outcome", "ScriptRun"]
# _first_line, _graphs_module and _row_record: for bench/graph_bench.py and the tests, as before the split

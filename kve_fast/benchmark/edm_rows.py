"""The rows of NVlabs' EDM sampler (``kve-fast bench --edm``): the published loop (our reading of EDM's
``edm_sampler``, ``kve_fast.edm_reading``) and ``kve_fast.edm.edm_sampler`` eager and graphed on the same
EDM-interface net, each timed against its floor (the net's own forwards, graphed on CUDA) and compared bit for
bit with the published loop (and graphed with eager); the same per-seed generators every call, as EDM's script
makes them.

Import-light: torch loads inside the functions.
"""

from __future__ import annotations

import time

from .floor import measure_floor
from .rows import KINDS, _captures, _clear_graphs, _row_record, _time_row, graph_support
from .timing import RepeatPolicy, _first_line, _params, _settle, _sync, compare, inside_share

__all__ = ["bench_edm", "EDM_ROW_LABELS"]

EDM_ROW_LABELS = {
    "reference": "EDM edm_sampler (the published loop, our reading)",
    "eager": "kve_fast.edm eager",
    "graphed": "kve_fast.edm graphed",
}
SEED0 = 0  # the batch's seeds are seed, seed + 1, ... (EDM's script's --seeds)


def _floor_forward(net, device):
    """The net's own forward as the floor measures a UNet's (``unet(x, t).sample``), called as EDM's loop calls it:
    the float64 sample (``measure_floor``'s ``dtype``) and a 0-d float64 sigma on its device (a module holding the
    net, so that the floor finds and patches NCSN++ FIR blocks in it as the sampler does)."""
    import torch

    class Forward(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.sigma = net, torch.tensor(1.0, dtype=torch.float64, device=device)

        def forward(self, x, t):
            return type("Output", (), {"sample": self.net(x, self.sigma)})()

    return Forward()


def _floor(net, shape, device, calls: int, log) -> dict:
    import torch

    res = measure_floor(_floor_forward(net, device), shape, device, calls, log, dtype=torch.float64)
    res["label"] = "the net, float64 input"
    res["floor_note"] = res["floor_note"].replace("floor (fp32) = ", "floor = ", 1)
    return res


def bench_edm(net, *, name: str, batch_size: int, steps: int = 18, device=None, seed: int = SEED0, kinds=KINDS,
              reference: bool = True, step_backend: str = "auto", policy: RepeatPolicy | None = None, log=print,
              sampler_kwargs: dict | None = None) -> dict:
    """Every row for the EDM-interface ``net`` (``kve_fast.edm_testing.cifar_standin``, or any net EDM's sampler
    takes) at ``batch_size``: a configuration record as ``bench_pipeline``'s (rows, floor, notes), which the report
    formats. ``sampler_kwargs``: EDM's churn settings (S_churn, ...), the same for every row."""
    import torch

    from .. import edm
    from ..edm_reading import edm_sampler_reading
    from ..edm_testing import script_inputs

    device = torch.device(device) if device is not None else torch.device("cpu")
    policy, sync, kwargs = policy or RepeatPolicy(), _sync(device), dict(sampler_kwargs or {}, num_steps=steps)
    seeds = list(range(seed, seed + batch_size))
    _, latents, labels = script_inputs(net, seeds, device=device)
    shape, calls, t0 = tuple(latents.shape), 2 * steps - 1, time.monotonic()
    rec = {"name": name, "model": "EDM-interface stand-in", "params": _params(net), "shape": list(shape),
           "batch_size": batch_size, "steps": steps, "model_calls": calls, "output_type": "latent",
           "step_backend": step_backend, "seed": seed, "repeat_policy": policy.as_dict(), "status": "ok",
           "sampler": "NVlabs EDM edm_sampler", "reference_name": "EDM's loop", "sampler_kwargs": kwargs, "floors": {}, "rows": [], "notes": [],
           "inside_share": None}
    log(f"== {name}: EDM's sampler, image {'x'.join(map(str, shape[1:]))}, batch {batch_size}, {steps} steps ({calls} "
        f"net calls), {(rec['params'] or 0) / 1e6:.1f} M parameters, {device}")
    rec["floors"]["float64"] = rec["floor"] = _floor(net, shape, device, calls, log)
    graphs_ok, graphs_why = graph_support(None, device)

    def call(kind: str):
        def run():
            rnd, _, _ = script_inputs(net, seeds, device=device)  # the script's generators, after the latents
            if kind == "reference":
                return edm_sampler_reading(net, latents, labels, rnd.randn_like, **kwargs)
            return edm.edm_sampler(net, latents, labels, rnd.randn_like, backend=step_backend,
                                   cuda_graph=kind == "graphed", **kwargs)
        return run

    outputs = {}
    for kind in (("reference",) if reference else ()) + tuple(k for k in KINDS if k in kinds):
        r = _row_record(kind, "exact")
        r.update(row=EDM_ROW_LABELS[kind], floor="float64")
        rec["rows"].append(r)
        if kind == "graphed" and not graphs_ok:
            r.update(status="unavailable", why=graphs_why)
            continue
        log(f"    {r['row']} ...")
        try:
            outputs[kind] = _time_row(r, call(kind), sync, policy, log,
                                      before_first=_clear_graphs if kind == "graphed" else None)
        except Exception as exc:  # a row's failure is its own; the others still run
            _settle(device)
            r.update(status="failed", why=_first_line(exc))
            log(f"    {r['row']}: FAILED {r['why']}")
            continue
        if kind == "graphed":
            r["captures_after"] = _captures()
        if "reference" in outputs and kind != "reference":
            r["equal_reference_latent"] = compare(outputs[kind], outputs["reference"])
        if kind == "graphed" and "eager" in outputs:
            r["equal_eager"] = compare(outputs[kind], outputs["eager"])
    _clear_graphs()
    first = next(iter(outputs.values()), None)
    if first is not None:
        rec["inside_share"] = inside_share(((first.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy())
        if outputs.keys() - {"reference"} and "reference" in outputs:
            rec["notes"].append(f"the bits are compared on the float64 latents before any clamping, so a saturated "
                                f"image (pixels inside (0,1): {rec['inside_share']:.1%}; a stand-in net's images "
                                f"need not look like anything) cannot hide a difference")
    ref_ms = rec["rows"][0]["ms_per_call"] if reference and rec["rows"] else None
    for r in rec["rows"]:
        if r["ms_per_call"]:
            r["floor_ratio"] = r["ms_per_call"] / rec["floor"]["floor_ms"]
            r["speedup"] = ref_ms / r["ms_per_call"] if ref_ms else None
    rec["seconds"] = time.monotonic() - t0
    if any(r["status"] == "failed" for r in rec["rows"]):
        rec["status"] = "partial"
    return rec

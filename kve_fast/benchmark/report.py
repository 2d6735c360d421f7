"""The report of ``kve-fast bench``: the markdown tables and verdicts, the JSON, and the files ``write_outputs``
writes (through ``kve_fast._files.atomic_write``: whole or not at all).
"""

from __future__ import annotations

import json
import math
import os

from .._files import atomic_write
from .provenance import SHORT_CALL_S, jsonable, required_repeats
from .rows import FIRST_IMAGE_TARGET_S, FLOOR_TARGET, row_label

__all__ = ["format_markdown", "write_outputs", "write_text", "to_json", "table_rows", "left_out_lines", "floors_table",
           "verdicts", "precision_verdicts", "exactness_failures", "COLUMNS"]

COLUMNS = ("config", "row", "ms/call", "min-max ms", "vs diffusers", "/ floor", "first image", "n", "= diffusers",
           "= eager", "accuracy (bound)")



def _fmt_eq(c) -> str:
    if c is None:
        return ""
    if c.get("equal"):
        return "yes" if c.get("bitwise", True) else "yes (not bitwise: signed zeros/NaN payloads differ)"
    if c.get("mismatches") is None:
        return f"NO ({c.get('why')})"
    return f"NO ({c['mismatches']:,} of {c['elements']:,} differ)"


def _fmt_rel(value) -> str:
    """A relative RMS difference; NaN/inf (a run that overflowed, e.g. fp16) said plainly."""
    if value is None or not math.isfinite(value):
        return f"{value} (NON-FINITE: the output has NaN/inf)"
    return f"{value:.2e}"


def _eq_reference(r: dict) -> str:
    if r["kind"] == "reference":
        return ""
    if r["noise"] == "fast" and r["status"] == "ok":
        return "n/a (own noise stream)"
    if r.get("precision") is not None:  # low precision: bits cannot match diffusers' float32 run
        rel = r.get("rel_rms_reference")
        if rel is None:
            return ""
        return f"rel. RMS {_fmt_rel(rel['value'])} ({rel['of']}; {r['precision']}: not bitwise)"
    parts = []
    if r.get("equal_reference_latent") is not None:
        parts.append(f"latent {_fmt_eq(r['equal_reference_latent'])}")
    if r.get("equal_reference_np") is not None:
        parts.append(f"np {_fmt_eq(r['equal_reference_np'])}")
    return ", ".join(parts)


def _fmt_accuracy(a) -> str:
    if not a:
        return ""
    return (f"{_fmt_rel(a['value'])} (<= {a['bound']:.2e}{'' if a['ok'] else ': OUT OF BOUND'})")


def _config_label(c: dict) -> str:
    shape = c.get("shape")
    dims = f"{shape[2]}x{shape[3]}x{shape[1]}" if shape and len(shape) == 4 else ""
    params = f", {c['params'] / 1e6:.1f} M" if c.get("params") else ""
    return f"{c['name']} ({dims}{params})" if dims else c["name"]


def _repeats_cell(r: dict) -> str:
    """The ``n`` column: the timed calls, and the rule they fall short of, if they do."""
    if r.get("repeat_rule_met", True) is not False:
        return str(r["repeats"])
    short, long = required_repeats(0.0), required_repeats(SHORT_CALL_S)
    return f"{r['repeats']} (under the rule: {short} for calls under {SHORT_CALL_S:g} s, else {long})"


def table_rows(configs: list[dict], left_out: bool = False) -> list[list[str]]:
    """The main table's cells, one list per row (``COLUMNS``); rows that could not run on this model or device
    ("unavailable": see ``left_out_lines``) only with ``left_out``."""
    out = []
    for c in configs:
        label = _config_label(c)
        if not c.get("rows"):
            out.append([label, c.get("status", "?"), (c.get("error") or "; ".join(c.get("notes", [])))[:200]]
                       + [""] * (len(COLUMNS) - 3))
            continue
        first = label
        for r in c["rows"]:
            if r["status"] == "unavailable" and not left_out:
                continue
            if r["status"] != "ok":
                out.append([first, r["row"], f"{r['status']}: {r['why']}"] + [""] * (len(COLUMNS) - 3))
                first = ""
                continue
            tail = "" if r["repeat_consistent"] else " (repeats differ!)"
            spread = (f"{r['min_ms']:.1f}-{r['max_ms']:.1f}" if r.get("min_ms") is not None else "")
            n = _repeats_cell(r)
            out.append([
                first, r["row"], f"{r['ms_per_call']:.1f}", spread,
                f"{r['speedup']:.2f}x" if r["speedup"] else "",
                f"{r['floor_ratio']:.3f}" if r["floor_ratio"] else "",
                f"{r['first_call_s']:.2f} s", n,
                _eq_reference(r), (_fmt_eq(r["equal_eager"]) if r["equal_eager"] is not None else "") + tail,
                _fmt_accuracy(r.get("accuracy")),
            ])
            first = ""
    return out


def left_out_lines(configs: list[dict]) -> list[str]:
    """One line per reason a row could not run (a 1-channel model has no diffusers row, the CPU no graphs, ...):
    which rows, and, when not all of them, in which configurations."""
    reasons: dict[str, list[tuple[str, str]]] = {}
    for c in configs:
        for r in c.get("rows", []):
            if r["status"] == "unavailable":
                why = r["why"] or "unavailable"
                why = why[len("graphs unavailable: "):] if why.startswith("graphs unavailable: ") else why
                reasons.setdefault(why, []).append((r["row"], c["name"]))
    names = [c["name"] for c in configs]
    lines = []
    for why, where in reasons.items():
        rows = list(dict.fromkeys(row for row, _ in where))
        in_configs = list(dict.fromkeys(name for _, name in where))
        scope = "" if in_configs == names else f" (in {', '.join(in_configs)})"
        lines.append(f"{' and '.join(rows)}{scope}: {why}")
    return lines


def _visible_columns(rows: list[list[str]]) -> list[int]:
    """The columns with something in them (config and row always)."""
    return [k for k in range(len(COLUMNS)) if k < 2 or any(row[k] for row in rows)]


def _md_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x).replace("|", "/") for x in row) + " |" for row in rows]
    return "\n".join(lines)


def floors_table(configs: list[dict]) -> str:
    """One line per floor measured (a configuration has one per forward its rows run: dtype, FIR kernel)."""
    rows = []
    for c in configs:
        floors = c.get("floors") or ({"": c["floor"]} if c.get("floor") else {})
        for key, f in floors.items():
            graphed = f.get("forward_graphed_ms")
            rows.append([
                _config_label(c), key or f.get("label") or "fp32",
                f"{f['forward_eager_ms']:.3f} (n={f['forward_eager_n']})",
                f"{graphed:.3f} (n={f['forward_graphed_n']})" if graphed is not None else f.get("capture_error", "-"),
                ("yes" if f.get("graph_equals_eager") else "NO") if "graph_equals_eager" in f else "",
                f"{f['floor_ms']:.1f} ({f['calls']} x {f['floor_kind']})",
                f"{c['inside_share']:.1%}" if c.get("inside_share") is not None else "",
            ])
    header = ("config", "forward", "one forward, eager ms", "one forward, graphed ms", "graph = eager", "floor ms",
              "pixels inside (0,1)")
    keep = [k for k in range(len(header)) if any(row[k] not in ("", "-") for row in rows)]  # none graphed on the CPU
    return _md_table([header[k] for k in keep], [[row[k] for k in keep] for row in rows]) if rows else ""


def _row_floor(c: dict, r: dict) -> dict:
    """The floor a row ran against (its forward), or the configuration's first."""
    return (c.get("floors") or {}).get(r.get("floor")) or c.get("floor") or {}


def verdicts(configs: list[dict]) -> list[str]:
    """The issue's targets for graphed exact rows: <= 1.05 x floor, first image < 3 s, bit-identical."""
    lines = []
    for c in configs:
        if c.get("precision"):  # low precision: precision_verdicts
            continue
        for r in c.get("rows", []):
            if r["kind"] != "graphed" or r["noise"] != "exact":
                continue
            if r["status"] == "unavailable":  # left out of the report with its reason
                continue
            if r["status"] != "ok":
                lines.append(f"- {c['name']}: graphed exact {r['status']} ({r['why']})")
                continue
            floor_ok = r["floor_ratio"] is not None and r["floor_ratio"] <= FLOOR_TARGET
            once = r["first_call_s"] - r["ms_per_call"] / 1e3
            eqs = [x for x in (r.get("equal_reference_latent"), r.get("equal_reference_np"), r.get("equal_eager")) if x]
            exact = all(x["equal"] for x in eqs) if eqs else None
            floor_kind = _row_floor(c, r).get("floor_kind")
            lines.append(
                f"- {c['name']}: {r['floor_ratio']:.3f} x floor{' (EAGER floor)' if floor_kind != 'graphed' else ''} "
                f"(target <= {FLOOR_TARGET}: {'met' if floor_ok else 'NOT met'}); first image {r['first_call_s']:.2f} s, "
                f"of which {max(once, 0):.2f} s one-time (target < {FIRST_IMAGE_TARGET_S:.0f} s: "
                f"{'met' if r['first_call_s'] < FIRST_IMAGE_TARGET_S else ('one-time cost met' if once < FIRST_IMAGE_TARGET_S else 'NOT met')}); "
                f"bit-identical: {'n/a' if exact is None else ('yes' if exact else 'NO')}"
                + (f" ({len(eqs)} checks)" if eqs else ""))
    return lines


def precision_verdicts(configs: list[dict], targets: dict | None = None) -> list[str]:
    """Low-precision configurations: one line per graphed row, its speedup over diffusers (float32) and its
    ratio to the floor in its own precision. ``targets``: ``{config name: {"speedup": x, "floor_ratio": y}}``
    for the graphed fast-noise row (bench/graph_bench.py passes its own); a configuration not named
    there gets the floor target ``FLOOR_TARGET`` only. The other graphed rows are for information."""
    lines = []
    for c in configs:
        p = c.get("precision")
        if not p:
            continue
        named = (targets or {}).get(c["name"])
        target = named if named is not None else {"floor_ratio": FLOOR_TARGET}
        graphed = [r for r in c.get("rows", []) if r["kind"] == "graphed"]
        if not graphed:
            lines.append(f"- {c['name']}: no graphed rows measured" + (f" ({c['status']})" if c.get("status") != "ok"
                                                                       else ""))
        for r in graphed:
            aimed = r["noise"] == "fast"
            floor = _row_floor(c, r)
            floor_name = f"the floor ({r.get('floor') or floor.get('label') or p['label']}" + (
                ", EAGER" if floor.get("floor_kind") not in (None, "graphed") else "") + ")"
            if r["status"] != "ok":
                lines.append(f"- {c['name']}, {r['row']}: {r['status']} ({r['why']})"
                             + ("; targets NOT met (not measured)" if aimed and named else ""))
                continue
            parts = []
            want = target.get("speedup") if aimed else None
            if r.get("speedup"):
                parts.append(f"{r['speedup']:.2f}x diffusers (fp32)"
                             + (f" (target >= {want:g}x: {'met' if r['speedup'] >= want else 'NOT met'})" if want else ""))
            else:
                parts.append("speedup n/a (no diffusers row)" + (f" (target >= {want:g}x: NOT met)" if want else ""))
            want = target.get("floor_ratio") if aimed else None
            if r.get("floor_ratio"):
                if want:
                    verdict = f" (target <= {want:g}: {'met' if r['floor_ratio'] <= want else 'NOT met'})"
                elif aimed and named is not None:
                    verdict = " (no floor target for this configuration)"
                else:
                    verdict = ""
                parts.append(f"{r['floor_ratio']:.3f} x {floor_name}{verdict}")
            parts.append(f"first image {r['first_call_s']:.2f} s")
            if r.get("rel_rms_reference"):
                rel = r["rel_rms_reference"]
                parts.append(f"rel. RMS vs diffusers' fp32 {rel['of']} {_fmt_rel(rel['value'])}")
            if r.get("accuracy"):
                parts.append(f"accuracy {_fmt_accuracy(r['accuracy'])}")
            if r.get("equal_eager") is not None:
                parts.append(f"graphed = eager: {_fmt_eq(r['equal_eager'])}")
            lines.append(f"- {c['name']}, {r['row']}: " + "; ".join(parts) + ("" if aimed else " (for information)"))
    return lines


def _precision_paragraph(configs: list[dict]) -> str:
    """What low-precision rows are, for the top of the report."""
    ps = {c["precision"]["label"]: c["precision"] for c in configs if c.get("precision")}
    names = " / ".join(sorted(ps))
    examples = " / ".join(f"\"{row_label('graphed', 'fast', k).split(', ', 2)[-1]}\"" for k in sorted(ps))
    copied = any(p.get("converted_copy") for p in ps.values())
    floors = sorted({(c.get("floor") or {}).get("label") for c in configs if c.get("precision")} - {None})
    return (f"**Low precision ({names}):** kve_fast's rows (labelled {examples}) run "
            + ("a copy of the UNet converted to that dtype, natively" if copied else "the float32 UNet with TF32 on")
            + " (the sampler's state stays float32); diffusers' row runs the float32 UNet with TF32 off (it cannot "
            "run a half-precision UNet). The floor is 2N - 1 forwards in the same precision as kve_fast's rows"
            + (f" ({'; '.join(floors)})" if floors else "")
            + ("; \"FIR on Triton\": the NCSN++ FIR blocks run on the Triton kernel the sampler's fast modes use"
               if any("FIR on Triton" in f for f in floors) else "")
            + ". Bits cannot match diffusers: \"= diffusers\" gives, for exact-noise rows (the same noise stream), the relative "
            "RMS difference ||a - b|| / ||b|| of the final latent from diffusers' float32 one; \"= eager\" is still "
            "bit equality (same kernels, same precision).")


def _columns(configs: list[dict]) -> tuple:
    """``COLUMNS``, with the reference row's name where every configuration names another (``reference_name``: the
    EDM rows' published loop) instead of diffusers' pipeline."""
    names = {c.get("reference_name", "diffusers") for c in configs}
    name = names.pop() if len(names) == 1 else "the reference"
    return tuple(h.replace("diffusers", name) for h in COLUMNS)


def format_markdown(result: dict, title: str = "kve_fast benchmark") -> str:
    env = result.get("env", {})
    cuda = str(env.get("device", "")).startswith("cuda")
    card = env.get('gpu') or env.get('device')
    if env.get("driver"):
        card += f" (driver {env['driver']})"
    head = (f"## {title}\n\n{card}, torch {env.get('torch')}, triton {env.get('triton')}, "
            f"diffusers {env.get('diffusers')}, Python {env.get('python')}, {env.get('date')}"
            + (f"; TF32 {'on' if env.get('tf32_matmul') or env.get('tf32_cudnn') else 'off'}" if cuda else "")
            + (f"; {env['threads']} CPU threads" if env.get("threads") else "")
            + f"; kve_fast {env.get('git') or ''}\nCommand: `{env.get('command')}`\n")
    configs = result.get("configs", [])
    low = sorted({c["precision"]["label"] for c in configs if c.get("precision")})
    if low:
        head += "\n" + _precision_paragraph(configs) + "\n"
    rows = table_rows(configs)
    keep = _visible_columns(rows)
    table = _md_table([_columns(configs)[k] for k in keep], [[row[k] for k in keep] for row in rows])
    parts = [head, "### Floors\n", floors_table(configs), "", "### Per call\n", table]
    left = left_out_lines(configs)
    if left:
        parts += ["", "Left out: " + "; ".join(left) + "."]
    v = verdicts(configs)
    if v:
        parts += ["", "### Targets (graphed, exact noise)\n", "\n".join(v)]
    pv = precision_verdicts(configs, result.get("targets"))
    if pv:
        source = result.get("targets_source")
        if source and result.get("targets"):
            source += " for " + ", ".join(result["targets"])
        parts += ["", f"### Targets ({' / '.join(low)}, graphed, fast noise{'; ' + source if source else ''})\n",
                  "\n".join(pv)]
    notes = list(result.get("notes", []))
    for c in configs:
        notes += [f"{c['name']}: {n}" for n in c.get("notes", [])]
    if cuda:
        notes.append("ms/call: median of n timed calls after a first call (the first image column), "
                     "torch.cuda.synchronize before and after each call, host clock; / floor: ms/call over "
                     "(2N - 1) x one model forward replayed from a CUDA graph (CUDA events), measured in the same run; "
                     "first image: the first call of the row in this configuration (graphed rows: clear_graphs() first, "
                     "so the capture is included), after the floor measurement and the kernel warm-up")
    else:
        notes.append("ms/call: median of n timed calls after a first call (the first image column), host clock; "
                     "/ floor: ms/call over (2N - 1) x one eager model forward, measured in the same run")
    parts += ["", "Notes:", "\n".join(f"- {n}" for n in notes)]
    return "\n".join(parts) + "\n"


def to_json(result: dict) -> str:
    """The results as JSON (non-finite floats as null; anything else not JSON as its str)."""
    return json.dumps(jsonable(result, nonfinite=lambda _: None), indent=1)


def write_text(path: str, text: str) -> None:
    """``text`` to ``path`` in UTF-8, whole or not at all (``kve_fast._files.atomic_write``)."""
    with atomic_write(path, "wb") as f:
        f.write(text.encode("utf-8"))


def write_outputs(result: dict, out_dir: str, stem: str, chart: bool = True, title: str = "kve_fast benchmark") -> dict:
    """``<stem>.json``, ``<stem>.md`` and (matplotlib permitting) ``<stem>.png`` in ``out_dir``; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, stem + ".json"), "md": os.path.join(out_dir, stem + ".md")}
    write_text(paths["json"], to_json(result))
    write_text(paths["md"], format_markdown(result, title))
    if chart:
        from .plot import write_chart

        png = os.path.join(out_dir, stem + ".png")
        why = write_chart(result, png)
        if why is None:
            paths["png"] = png
        else:
            paths["chart_note"] = why
    return paths


def exactness_failures(configs: list[dict]) -> list[str]:
    """Every check that failed: exact rows against diffusers, graphed against eager, repeats that differ, a
    non-exact row out of its accuracy bound (or without its check), a floor whose graph differs from eager."""
    bad = []
    for c in configs:
        for r in c.get("rows", []):
            for key in ("equal_reference_latent", "equal_reference_np", "equal_eager"):
                if r.get(key) is not None and not r[key]["equal"]:
                    bad.append(f"{c['name']} / {r['row']}: {key}")
            if r.get("repeat_consistent") is False:
                bad.append(f"{c['name']} / {r['row']}: repeated calls differ")
            a = r.get("accuracy")
            if a is not None and not a.get("ok"):
                bad.append(f"{c['name']} / {r['row']}: accuracy {a.get('value')} out of its bound {a.get('bound')}")
            non_exact = r.get("kind") != "reference" and (r.get("noise") == "fast" or r.get("precision"))
            if non_exact and r.get("status") == "ok" and a is None:
                bad.append(f"{c['name']} / {r['row']}: no accuracy check")
        floors = c.get("floors") or ({"": c["floor"]} if c.get("floor") else {})
        for key, f in floors.items():
            if f.get("graph_equals_eager") is False:
                bad.append(f"{c['name']}: the floor's graphed forward differs from the eager forward"
                           + (f" ({key})" if key else ""))
    return bad

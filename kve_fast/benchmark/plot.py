"""Pictures of ``kve-fast bench`` results (matplotlib, an optional extra: ``pip install kve_fast[plot]``)."""

from __future__ import annotations

import os

from .._files import atomic_write
from .rows import FLOOR_TARGET, ROW_LABELS
from .timing import _first_line

__all__ = ["write_chart", "write_plot", "PLOT_FORMATS"]


def write_chart(result: dict, path: str) -> str | None:
    """A PNG of the speedup over diffusers and the ratio to the floor per row; None (and why) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError as exc:
        return f"no chart: matplotlib does not import ({_first_line(exc)})"
    configs = [c for c in result.get("configs", []) if any(r["status"] == "ok" for r in c.get("rows", []))]
    if not configs:
        return "no chart: no measured rows"
    keys = list(ROW_LABELS)
    labels = []
    for key in keys:  # the rows' own labels (low-precision rows say their precision)
        found = next((r["row"] for c in configs for r in c["rows"] if (r["kind"], r["noise"]) == key), None)
        labels.append(found or ROW_LABELS[key])
    low = sorted({c["precision"]["label"] for c in configs if c.get("precision")})
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(configs)) * 1.6, 4.8))
    width = 0.8 / len(labels)
    for ax, field, title in ((axes[0], "speedup", "speedup over diffusers (higher is better)"),
                             (axes[1], "floor_ratio", "time / floor (99 graphed forwards"
                              + (f", {' / '.join(low)}" if low else "") + "; 1 is ideal)")):
        for j, (key, label) in enumerate(zip(keys, labels)):
            xs, ys = [], []
            for i, c in enumerate(configs):
                r = next((r for r in c["rows"] if (r["kind"], r["noise"]) == key and r["status"] == "ok"), None)
                if r is not None and r.get(field):
                    xs.append(i + (j - (len(labels) - 1) / 2) * width)
                    ys.append(r[field])
            if xs:
                ax.bar(xs, ys, width, label=label)
        ax.set_xticks(range(len(configs)))
        ax.set_xticklabels([c["name"] for c in configs], rotation=20, ha="right")
        ax.set_title(title)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.3g"))
        ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%.3g"))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        if field == "floor_ratio":
            ax.axhline(FLOOR_TARGET, color="k", linestyle="--", linewidth=1, label=f"target {FLOOR_TARGET}")
        else:
            ax.axhline(1.0, color="k", linewidth=0.8)
    axes[1].legend(fontsize=8)
    env = result.get("env", {})
    fig.suptitle(f"kve_fast, {env.get('gpu') or env.get('device')}, torch {env.get('torch')}, {env.get('date')}",
                 fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return None


def _pyplot():
    """matplotlib's pyplot on the Agg backend; ImportError (with how to install it) without matplotlib."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("matplotlib is not installed: python -m pip install 'kve_fast[plot]' (or matplotlib)") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plot(result: dict, path: str) -> None:
    """Milliseconds per call against batch size: one line per row that ran, and the floor (``2N - 1`` model
    forwards alone) of each batch size as a dashed line; one panel per model. Log-log axes."""
    from matplotlib import ticker

    plt = _pyplot()
    configs = [c for c in result.get("configs", []) if c.get("floor") and c.get("batch_size")]
    models = list(dict.fromkeys(c.get("model") or c["name"] for c in configs))
    if not models:
        raise ValueError("no configuration was measured: nothing to plot")
    fig, axes = plt.subplots(1, len(models), figsize=(6.4 * len(models), 4.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = sorted((c for c in configs if (c.get("model") or c["name"]) == model), key=lambda c: c["batch_size"])
        keys = list(dict.fromkeys((r["kind"], r["noise"]) for c in mine for r in c["rows"] if r["status"] == "ok"))
        for key in keys:
            points = [(c["batch_size"], r["ms_per_call"], r["row"]) for c in mine for r in c["rows"]
                      if (r["kind"], r["noise"]) == key and r["status"] == "ok"]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=points[0][2])
        floor_label = "floor: " + (mine[0]["floor"].get("floor_note") or "").replace("floor = ", "").replace(
            "floor (", "(")
        ax.plot([c["batch_size"] for c in mine], [c["floor"]["floor_ms"] for c in mine], "k--", marker="x",
                label=floor_label)
        shape = mine[0].get("shape") or []
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
        for which in ("major", "minor"):  # plain numbers: a narrow range has only minor ticks (not 1.7x10^1)
            getattr(ax.yaxis, f"set_{which}_formatter")(ticker.FormatStrFormatter("%.3g"))
        ax.set_xticks([c["batch_size"] for c in mine])
        ax.set_xlabel("batch size")
        ax.set_ylabel(f"ms per call ({mine[0]['steps']} steps)")
        ax.set_title(f"{model}" + (f" ({shape[2]}x{shape[3]}x{shape[1]})" if len(shape) == 4 else ""), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    env = result.get("env", {})
    fig.suptitle(f"kve-fast bench, {env.get('gpu') or env.get('device')}, torch {env.get('torch')}, {env.get('date')}"
                 + (f", {env['threads']} CPU threads" if env.get("threads") else ""), fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


PLOT_FORMATS = (".png", ".svg", ".pdf")


def _save(fig, path: str) -> None:
    """``fig`` to ``path`` in the format its extension names, whole or not at all."""
    fmt = os.path.splitext(path)[1].lower().lstrip(".") or "png"
    with atomic_write(path) as f:
        fig.savefig(f, format=fmt, dpi=110)

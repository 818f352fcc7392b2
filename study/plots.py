"""The study's figures: every seed of every method with the sweep beside it, and the learning
curves (matplotlib, imported when drawing)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any


def plot(doc: dict[str, Any], path: Path) -> None:
    """Left: the final runs' test top-1, every seed a dot, the mean a bar. Right (studies with a
    sweep): every finished sweep point's held-out top-1 (what selects) and test top-1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["summary"]
    sweep = [r for r in doc["runs"] if r["role"] == "sweep" and not r.get("stale")]
    fig, axes = plt.subplots(1, 2 if doc["sweep"] else 1, figsize=(13 if doc["sweep"] else 7, 4.8),
                             squeeze=False)
    ax = axes[0][0]
    for i, row in enumerate(rows):
        ys = row["test_top1"]
        ax.scatter([i] * len(ys), ys, color="C0", zorder=3, label="one seed" if i == 0 else None)
        if ys:
            ax.hlines(statistics.fmean(ys), i - 0.25, i + 0.25, color="k", zorder=2,
                      label="mean" if i == 0 else None)
    if not any(r["test_top1"] for r in rows):
        ax.text(0.5, 0.5, "no final runs yet", transform=ax.transAxes, ha="center", color="0.4")
    ax.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=20, ha="right")
    ax.set_xlim(-0.5, len(rows) - 0.5)
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("final runs (selected configs): every seed is a dot")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if doc["sweep"]:
        _plot_sweep(axes[0][1], doc, rows, sweep)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


CURVE_PANELS = (("heldout_top1", "held-out top-1 (%)"),
                ("train_loss_class", "train class loss"),
                ("train_loss_rotation", "train rotation loss"),
                ("train_acc_rotation", "train rotation accuracy"))


def curve_runs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every run with a curve (sweep points, every seed of every arm, convergence runs), the
    final and convergence runs first."""
    runs = [r for r in doc["runs"] if r.get("curve") and not r.get("stale")]
    return sorted(runs, key=lambda r: not (r.get("final") or r["role"] == "convergence"))


def plot_curves(doc: dict[str, Any], path: Path) -> None:
    """One panel per measurement (held-out top-1, class loss, rotation loss and accuracy) against
    labelled epochs; a colour per method, a line per run: bold for the final runs (one per seed),
    dashed for the doubled schedule, thin for the other sweep points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = curve_runs(doc)
    methods = list(dict.fromkeys(r["method"] for r in doc["summary"]))
    fig, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(18, 4.2), squeeze=False)
    for ax, (key, name) in zip(axes[0], CURVE_PANELS):
        for r in runs:
            pts = [p for p in r["curve"] if p.get(key) is not None]
            if not pts:
                continue
            spe = r["steps"] / max(r.get("labelled_epochs") or 1, 1e-9)
            xs = [p["step"] / spe for p in pts]
            colour = f"C{methods.index(r['method']) % 10}" if r["method"] in methods else "0.5"
            conv = r["role"] == "convergence"
            main = bool(r.get("final")) or conv
            hyper = ", ".join(f"{k.split('.')[-1]} {v:g}" for k, v in (r.get("hyper") or {}).items()
                              if isinstance(v, int | float))
            ax.plot(xs, [p[key] for p in pts], color=colour, alpha=0.85 if main else 0.35,
                    lw=1.6 if main else 0.8, ls="--" if conv else "-",
                    marker="." if main and not conv else None,
                    label=f"{r['method']} s{r['seed']}" + (" (2x)" if conv else "")
                    + ("" if main else f" (sweep: {hyper})"))
        ax.set_xlabel("labelled epochs")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if not runs:
            ax.text(0.5, 0.5, "no curves yet", transform=ax.transAxes, ha="center", color="0.4")
    fig.tight_layout()
    if runs:  # one legend for all panels, below them: inside a panel it hid the curves
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=8,
                   ncol=min(4, max(1, len(labels))), frameon=False)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _plot_sweep(ax, doc: dict[str, Any], rows: list[dict[str, Any]],
                sweep: list[dict[str, Any]]) -> None:
    """Held-out top-1 (what selects) of every finished sweep point against the sweep's last key
    (log axis where it spans 10x), a line per method and value of the first key; the selected
    point ringed, test top-1 as faint crosses. A sweep of one key: a line per method."""
    keys = list(doc["sweep"])
    xkey, lkey = keys[-1], (keys[0] if len(keys) > 1 else None)
    xs = [float(v) for v in doc["sweep"][xkey]]
    log = min(xs) > 0 and max(xs) / min(xs) >= 10
    styles = ("-", "--", ":", "-.")
    lvals = list(doc["sweep"][lkey]) if lkey else [None]
    for j, m in enumerate(r["method"] for r in rows):
        for k, lv in enumerate(lvals):
            pts = sorted((r for r in sweep if r["method"] == m
                          and (lkey is None or r["hyper"].get(lkey) == lv)),
                         key=lambda r: float(r["hyper"][xkey]))
            if not pts:
                continue
            x = [float(r["hyper"][xkey]) for r in pts]
            lab = m + (f", {lkey.split('.')[-1]} {lv:g}" if lkey else "")
            ax.plot(x, [r["heldout_top1"] for r in pts], styles[k % 4], color=f"C{j}",
                    marker="o", label=lab)
            ax.scatter(x, [r["test_top1"] for r in pts], color=f"C{j}", marker="x", alpha=0.5,
                       zorder=3)
            for r in pts:
                if doc["selection"].get(m, {}).get("run") == r["id"]:
                    ax.scatter([float(r["hyper"][xkey])], [r["heldout_top1"]], s=160,
                               facecolors="none", edgecolors="k", linewidths=1.5, zorder=4)
    if log:
        from matplotlib.ticker import NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # the grid's own values label the axis
    ax.set_xticks(xs, [f"{v:g}" for v in xs])
    ax.set_xlabel(xkey)
    ax.set_ylabel("held-out top-1 (%), lines; test top-1, crosses")
    ax.set_title("sweep, seed 0 (ringed: selected on held-out)")
    ax.grid(alpha=0.3)
    if sweep:
        ax.legend(loc="lower left", fontsize=7)


"""`s4l probe` end to end: feature files in, report.json and learning_curves.png out.

The I/O half of the probe (the compute half is :mod:`s4l.evaluation.probe`): opens and checks
each train/val pair of feature files, runs the solvers, and writes every number, the settings and
the input file hashes, plus the accuracy-vs-epoch figure of the paper's Places205 transfer
experiment (one panel per schedule, one line per feature file).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from s4l import __version__
from s4l.errors import UserError
from s4l.evaluation.features import FeatureFile, check_pair
from s4l.evaluation.probe import FileRows, ProbeSettings, SGDSettings, fit_probe, parse_schedules
from s4l.heads import from_standardized, save_head
from s4l.io import atomic_path, atomic_write_json
from s4l.provenance import file_sha256

log = logging.getLogger(__name__)


def probe_settings(*, solvers: Sequence[str] = ("sklearn", "sgd"), schedules: str | None = None,
                   batch_size: int = 256, lr: float = 0.1, wd: float | str = "auto",
                   cs: Sequence[float] = (1e-3, 1e-2, 1e-1, 1.0, 10.0), holdout: float = 0.2,
                   sklearn_max_rows: int = 200_000, standardize: bool = True, knn_k: int = 20,
                   knn_temperature: float = 0.07, device: str | None = None,
                   seed: int = 0) -> ProbeSettings:
    """The probe's settings from `s4l probe`'s options (the same names and defaults), checked:
    `schedules` is a spec such as "short=30,long=520", `wd` a number or "auto"."""
    if batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    if knn_k < 0 or knn_temperature <= 0:
        raise UserError("--knn-k must be >= 0 and --knn-temperature > 0")
    if not 0.0 <= holdout < 1.0:
        raise UserError("--holdout must be in [0, 1)")
    if wd != "auto":
        try:
            wd = float(wd)
        except ValueError:
            raise UserError(f"--wd must be a number or 'auto', got {wd!r}") from None
    return ProbeSettings(
        solvers=tuple(solvers), schedules=parse_schedules(schedules),
        sgd=SGDSettings(batch_size=batch_size, base_lr=lr, seed=seed, device=device),
        weight_decay=wd, cs=tuple(cs), holdout=holdout, sklearn_max_rows=sklearn_max_rows,
        standardize=standardize, seed=seed, knn_k=knn_k, knn_temperature=knn_temperature)


def probe_files(
    train_paths: Sequence[str | os.PathLike],
    val_paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    settings: ProbeSettings | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Probe each (train, val) pair, write ``report.json`` and ``learning_curves.png`` in out_dir."""
    settings = settings or ProbeSettings()
    if len(train_paths) != len(val_paths):
        raise UserError(
            f"{len(train_paths)} train file(s) but {len(val_paths)} val file(s): give them in "
            "pairs, e.g. --train a.h5 b.h5 --val a_val.h5 b_val.h5"
        )
    if not train_paths:
        raise UserError("no feature files given")
    out = Path(out_dir)
    report_path = out / "report.json"
    if report_path.exists() and not overwrite:
        raise UserError(f"{report_path} exists; pass --overwrite to replace it")
    # Open and check every pair before any long work starts.
    pairs = []
    try:
        for t, v in zip(train_paths, val_paths):
            tf, vf = FeatureFile(t), FeatureFile(v)
            pairs.append((tf, vf))
            check_pair(tf, vf)
        out.mkdir(parents=True, exist_ok=True)
        results = []
        for tf, vf in pairs:
            names = tf.class_names or vf.class_names
            num_classes = len(names) if names else int(max(tf.labels.max(), vf.labels.max())) + 1
            dropped = {"train": int((tf.labels < 0).sum()), "val": int((vf.labels < 0).sum())}
            if any(dropped.values()):
                log.warning("rows with unknown label (-1) are left out: %s", dropped)
            log.info("probing %s (%d x %d) -> %s (%d rows)", tf.path, tf.n, tf.dim, vf.path, vf.n)
            r = fit_probe(FileRows(tf), FileRows(vf), num_classes=num_classes, settings=settings,
                          class_names=names, progress=progress, desc=tf.path.stem)
            r["heads"] = save_probe_heads(r, tf, vf, out / "heads", settings,
                                          names or [str(i) for i in range(num_classes)])
            results.append({
                "train": _describe(tf), "val": _describe(vf), "unlabelled_rows_dropped": dropped,
                **r,
            })
    finally:
        for tf, vf in pairs:
            tf.close()
            vf.close()
    report = {
        "kind": "s4l-linear-probe",
        "s4l_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"python": platform.python_version(), "machine": platform.machine()},
        "settings": settings.to_dict(),
        "results": results,
    }
    plot = out / "learning_curves.png"
    if any("sgd" in r for r in results):
        plot_learning_curves(results, plot)
        report["learning_curves"] = plot.name
    _write_json_atomic(report_path, report)
    log.info("wrote %s", report_path)
    return report


def save_probe_heads(result: dict, tf: FeatureFile, vf: FeatureFile, out_dir: Path,
                     settings: ProbeSettings, class_names: Sequence[str]) -> dict[str, str]:
    """Write each fitted linear layer of ``result`` as a head artifact (s4l.heads), with the
    standardisation folded in so it applies to raw embeddings. Pops the in-memory layers from
    ``result``; returns solver name -> file written."""
    std = result.pop("_standardizer")
    fitted = []
    if "sklearn" in result:
        fitted.append(("sklearn", result["sklearn"]))
    for name, r in result.get("sgd", {}).items():
        fitted.append((f"sgd-{name}", r))
    written = {}
    for solver, r in fitted:
        w, b = r.pop("_linear")
        settings_used = ({"C": r["C"], "standardize": settings.standardize} if solver == "sklearn"
                         else {**r["settings"], "schedule": r["schedule"],
                               "standardize": settings.standardize})
        head = from_standardized(
            w, b, std.mean, std.scale, class_names=tuple(class_names),
            model_hash=tf.model_hash, layer=tf.layer,
            preprocess=json.loads(tf.attrs["preprocess"]) if isinstance(tf.attrs.get("preprocess"), str) else None,
            metrics={"top1": r["top1"], "top5": r["top5"], "val_rows": result["n_val"]},
            solver=solver, settings=settings_used,
            provenance={"train": str(tf.path), "train_sha256": file_sha256(tf.path),
                        "val": str(vf.path), "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        path = save_head(out_dir / f"{tf.path.stem}.{solver}.npz", head)
        written[solver] = str(path)
        log.info("wrote head %s (%d classes x %d, val top1 %.2f)", path, head.num_classes, head.dim,
                 r["top1"])
    return written


def _describe(ff: FeatureFile) -> dict:
    return {"path": str(ff.path), "sha256": file_sha256(ff.path), "rows": ff.n, "dim": ff.dim,
            "layer": ff.layer, "model_hash": ff.model_hash,
            "data_root": ff.attrs.get("data_root"), "split": ff.attrs.get("split")}


def _write_json_atomic(path: Path, obj) -> None:
    atomic_write_json(path, obj, indent=2, default=_json_default, allow_nan=True)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def plot_learning_curves(results: Sequence[dict], path: str | os.PathLike) -> None:
    """Validation top-1 vs epoch: one panel per schedule, one line per feature file.

    The scikit-learn optimum of each file, when computed, is drawn as a dashed line of the same
    colour: the accuracy the SGD schedule should approach.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schedules = []
    for r in results:
        for name in r.get("sgd", {}):
            if name not in schedules:
                schedules.append(name)
    fig, axes = plt.subplots(1, max(1, len(schedules)), figsize=(5.5 * max(1, len(schedules)), 4),
                             squeeze=False, sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name in zip(axes[0], schedules):
        for i, r in enumerate(results):
            c = colors[i % len(colors)]
            label = Path(r["train"]["path"]).stem
            if name in r.get("sgd", {}):
                curve = r["sgd"][name]["curve"]
                ax.plot([p["epoch"] for p in curve], [p["top1"] for p in curve], color=c,
                        marker="." if len(curve) < 40 else None, label=label)
            if "sklearn" in r:
                ax.axhline(r["sklearn"]["top1"], color=c, ls="--", lw=0.8,
                           label=f"{label} (L-BFGS optimum)")
        ax.set_title(f"{name} schedule")
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Linear probe on frozen features")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)

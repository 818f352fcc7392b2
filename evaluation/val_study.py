"""The small-validation-set study (paper Fig. 3): do tiny held-out sets rank models like the full pool?

For a sweep of models (e.g. the lr/wd sweep of supervised 1%-label runs) and a validation pool
held out from the training data, each model is scored on random class-balanced subsets of the
pool (1 and 5 images per class in the paper: 1,000 and 5,000 ImageNet images) and on the whole
pool (50,046 images in the release). The paper's claim: the small-set and full-set accuracies are
strongly correlated, and picking the best model on the 1,000-image set selects as well as the
full set. Reported here per subset size, over several random draws: Pearson, Spearman and
Kendall correlations, how often the small set picks the full-set best model, and how much
full-set accuracy its pick gives up (regret).

:func:`study` is compute only (a models x images correctness matrix in, numbers out);
:func:`run_val_study` extracts each model's logits with `s4l extract` (resumable) and writes
``val_study.json`` and ``val_study.png``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from s4l import __version__
from s4l.errors import UserError
from s4l.io import atomic_path, atomic_write_json

log = logging.getLogger(__name__)


def balanced_draw(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``per_class`` random images of every class (all of a class that has fewer)."""
    out = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        out.append(rng.choice(idx, min(per_class, len(idx)), replace=False))
    return np.sort(np.concatenate(out))


def _corr(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    from scipy import stats

    if np.ptp(a) == 0 or np.ptp(b) == 0:  # a constant score ranks nothing
        return {"pearson": float("nan"), "spearman": float("nan"), "kendall": float("nan")}
    return {
        "pearson": float(stats.pearsonr(a, b)[0]),
        "spearman": float(stats.spearmanr(a, b)[0]),
        "kendall": float(stats.kendalltau(a, b)[0]),
    }


def _summary(values: Sequence[float]) -> dict[str, float | int]:
    v = np.asarray(values, np.float64)
    ok = v[~np.isnan(v)]
    return {"mean": float(ok.mean()) if len(ok) else float("nan"),
            "std": float(ok.std()) if len(ok) else float("nan"),
            "min": float(ok.min()) if len(ok) else float("nan"),
            "max": float(ok.max()) if len(ok) else float("nan"),
            "undefined_draws": int(np.isnan(v).sum())}


def study(correct: np.ndarray, labels: np.ndarray, *, names: Sequence[str] | None = None,
          per_class: Sequence[int] = (1, 5), draws: int = 10, seed: int = 0) -> dict:
    """The study on a boolean ``correct[model, image]`` matrix and the images' ``labels``.

    Ties in the small-set accuracy (common at 1 image per class) are broken uniformly at random,
    so the pick statistics do not favour models listed first.
    """
    correct = np.asarray(correct, bool)
    labels = np.asarray(labels)
    m, n = correct.shape
    if m < 2:
        raise UserError(f"the study compares models: give at least 2 (got {m})")
    if n == 0 or len(labels) != n:
        raise UserError("the validation pool is empty or its labels do not match")
    if draws < 1:
        raise UserError("--draws must be >= 1")
    names = list(names) if names is not None else [f"model{i}" for i in range(m)]
    full = 100.0 * correct.mean(1)
    best = int(np.argmax(full))
    order = np.argsort(-full, kind="stable")
    rank_of = np.empty(m, int)
    rank_of[order] = np.arange(1, m + 1)
    rng = np.random.default_rng(seed)
    sizes = {}
    for k in per_class:
        if k < 1:
            raise UserError(f"images per class must be >= 1, got {k}")
        accs, corrs, picks, ties = [], [], [], 0
        subset_size = None
        for _ in range(draws):
            idx = balanced_draw(labels, k, rng)
            subset_size = len(idx)
            acc = 100.0 * correct[:, idx].mean(1)
            top = np.flatnonzero(acc == acc.max())
            ties += len(top) > 1
            picks.append(int(rng.choice(top)))
            accs.append(acc)
            corrs.append(_corr(acc, full))
        accs = np.array(accs)
        picks = np.array(picks)
        regret = full[best] - full[picks]
        sizes[f"{k}_per_class"] = {
            "per_class": k,
            "images": subset_size,
            "accuracy_by_draw": accs.tolist(),
            "accuracy_mean": accs.mean(0).tolist(),
            "accuracy_std": accs.std(0).tolist(),
            "correlation": {c: _summary([d[c] for d in corrs]) for c in ("pearson", "spearman", "kendall")},
            "picks": picks.tolist(),
            "picks_best_fraction": float((picks == best).mean()),
            "pick_regret_points": _summary(regret),
            "pick_full_rank": _summary(rank_of[picks]),
            "draws_with_tied_best": int(ties),
        }
    return {
        "models": names,
        "pool_images": int(n),
        "classes": int(len(np.unique(labels))),
        "full_accuracy": full.tolist(),
        "full_best": best,
        "full_best_name": names[best],
        "draws": draws,
        "seed": seed,
        "sizes": sizes,
    }


def plot_study(result: dict, path: str | os.PathLike) -> None:
    """Small-set vs full-pool accuracy per model, one panel per subset size (paper Fig. 3).

    Points are the mean over draws with the spread (std) as error bars; the full-pool best model
    is a star, the model the small set picks most often is circled.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(result["sizes"].values())
    full = np.array(result["full_accuracy"])
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.8 * len(sizes), 4.3), squeeze=False)
    for ax, s in zip(axes[0], sizes):
        mean, std = np.array(s["accuracy_mean"]), np.array(s["accuracy_std"])
        ax.errorbar(full, mean, yerr=std, fmt="o", ms=4, alpha=0.8, capsize=2, label="models")
        lo, hi = min(full.min(), mean.min()) - 2, max(full.max(), mean.max()) + 2
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.7, ls=":")
        b = result["full_best"]
        ax.scatter([full[b]], [mean[b]], marker="*", s=220, color="red", zorder=5,
                   label=f"full-pool best ({result['models'][b]})")
        pick = int(np.bincount(s["picks"], minlength=len(full)).argmax())
        ax.scatter([full[pick]], [mean[pick]], s=260, facecolors="none", edgecolors="black",
                   lw=1.5, zorder=6, label=f"most frequent small-set pick (the best in {s['picks_best_fraction']:.0%} of draws)")
        r = s["correlation"]
        ax.set_title(f"{s['per_class']}/class ({s['images']} images)\n"
                     f"Pearson {r['pearson']['mean']:.2f}  Spearman {r['spearman']['mean']:.2f}  "
                     f"Kendall {r['kendall']['mean']:.2f}", fontsize=9)
        ax.set_xlabel(f"full pool accuracy (%) [{result['pool_images']} images]")
        ax.set_ylabel("small-set accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# I/O: checkpoints + a validation pool in, val_study.json + val_study.png out


def model_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Short unique names: the file stem, with parent folders added until they are unique."""
    ps = [Path(p).resolve() for p in paths]
    depth = 1
    while True:
        names = ["/".join(p.with_suffix("").parts[-depth:]) for p in ps]
        if len(set(names)) == len(names) or depth > 8:
            return names
        depth += 1


def run_val_study(models: Sequence[str], data: str, split: str, out_dir: str | os.PathLike, *,
                  per_class: Sequence[int] = (1, 5), draws: int = 10, seed: int = 0,
                  batch_size: int = 64, workers: int | None = None, overwrite: bool = False,
                  progress: bool = True) -> dict:
    """Score every model on the pool (logits via extraction, reused when done) and run the study."""
    from s4l.evaluation.extract import ExtractConfig, extract
    from s4l.evaluation.features import FeatureFile
    from s4l.provenance import file_sha256

    if len(models) < 2:
        raise UserError(f"the study compares models: give at least 2 (got {len(models)})")
    if len(set(map(str, models))) != len(models):
        raise UserError("a model is listed twice")
    out = Path(out_dir)
    report = out / "val_study.json"
    if report.exists() and not overwrite:
        raise UserError(f"{report} exists; pass --overwrite to replace it")
    for m in models:
        if not Path(m).is_file():
            raise UserError(f"model {m} does not exist")
    feat_dir = out / "logits"
    feat_dir.mkdir(parents=True, exist_ok=True)
    names = model_names(models)
    correct, labels, paths, inputs = [], None, None, []
    for m, name in zip(models, names):
        sha = file_sha256(m)
        h5 = feat_dir / f"{sha[:16]}.h5"
        if not h5.exists():
            log.info("scoring %s on the pool", name)
            extract(ExtractConfig(model=str(m), data=data, out=str(h5), split=split,
                                  layer="pre_logits", batch_size=batch_size, workers=workers,
                                  progress=progress))
        else:
            log.info("reusing %s for %s", h5, name)
        with FeatureFile(h5) as ff:
            if ff.attrs.get("data_root") != data or ff.attrs.get("split") != split:
                raise UserError(f"{h5} holds another pool ({ff.attrs.get('data_root')}); remove it")
            if ff.logits is None:
                raise UserError(f"{m} has no class head: the study needs a classifier's logits")
            logits = ff.read_logits()
            lab = ff.labels
            pth = ff.paths
            n_err = len(ff.errors)
        if paths is None:
            labels, paths = lab, pth
            if n_err:
                log.warning("%d pool images could not be decoded and are left out", n_err)
        elif pth != paths:
            raise RuntimeError(f"{h5}: rows are not the same images as the first model's")
        if logits.shape[1] <= int(labels.max()):
            raise UserError(f"{m} predicts {logits.shape[1]} classes but the pool has label {int(labels.max())}")
        correct.append(logits.argmax(1) == labels)
        inputs.append({"path": str(m), "name": name, "sha256": sha, "logits_file": str(h5)})
    keep = labels >= 0
    if not keep.any():
        raise UserError(f"{data} ({split}) has no labelled images")
    result = study(np.array(correct)[:, keep], labels[keep], names=names, per_class=per_class,
                   draws=draws, seed=seed)
    result.update({
        "kind": "s4l-val-study",
        "s4l_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data": data,
        "split": split,
        "inputs": inputs,
    })
    plot_study(result, out / "val_study.png")
    result["plot"] = "val_study.png"
    atomic_write_json(report, result, indent=2)
    for s in result["sizes"].values():
        log.info("%d/class: Spearman %.3f, picks the best model in %.0f%% of draws, mean regret %.2f points",
                 s["per_class"], s["correlation"]["spearman"]["mean"], 100 * s["picks_best_fraction"],
                 s["pick_regret_points"]["mean"])
    return result

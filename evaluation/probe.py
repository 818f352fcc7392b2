"""Linear probes on frozen features: the scikit-learn L-BFGS reference and a streaming SGD trainer.

The transfer protocol of the paper (S4L_REFERENCE.md section 4, after Kolesnikov et al. 2019):
multinomial logistic regression on frozen ``pre_logits`` features, trained with SGD momentum 0.9,
lr 0.1 per 256 images, x0.1 steps, in a ``short`` and a ``long`` schedule, with validation
accuracy recorded through training (the paper's Places205 figure). scikit-learn's L-BFGS on the
same (standardised) features, with the regularisation strength chosen on a held-out part of the
training features and then refitted on all of them, is the convex reference the SGD trainer is
checked against.

Compute only: these functions take arrays or :class:`FeatureFile` row sources and return dicts.
Reading files, writing report.json and plotting live in :mod:`s4l.evaluation.report`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from s4l.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Schedule:
    """SGD schedule: ``epochs`` passes, lr x0.1 at each fraction in ``decay_at`` of them.

    The reference only says "tens of epochs" (short) and "hundreds" (long); the defaults below
    follow the linear-evaluation schedules of Kolesnikov et al. 2019 (decays late in training).
    """

    epochs: int
    decay_at: tuple[float, ...]

    def boundaries(self) -> list[int]:
        return sorted({max(1, round(f * self.epochs)) for f in self.decay_at if 0 < f < 1})

    def lr_factor(self, epoch: int) -> float:
        """Multiplier of the base lr during (0-based) ``epoch``."""
        return 0.1 ** sum(1 for b in self.boundaries() if epoch >= b)


SCHEDULES: dict[str, Schedule] = {
    "short": Schedule(epochs=30, decay_at=(2 / 3, 5 / 6)),
    "long": Schedule(epochs=520, decay_at=(480 / 520, 500 / 520)),
}


def parse_schedules(spec: str | None) -> dict[str, Schedule]:
    """``"short=30,long=520"`` (epochs; decay fractions kept) -> schedules. None = defaults."""
    if not spec:
        return dict(SCHEDULES)
    chosen = {}
    for part in spec.split(","):
        name, _, epochs = part.partition("=")
        name = name.strip()
        if name not in SCHEDULES:
            raise UserError(f"unknown schedule {name!r}; known: {', '.join(SCHEDULES)}")
        try:
            e = int(epochs) if epochs else SCHEDULES[name].epochs
        except ValueError:
            raise UserError(f"schedule {name}: epochs must be an integer, got {epochs!r}") from None
        if e < 1:
            raise UserError(f"schedule {name}: epochs must be >= 1")
        chosen[name] = Schedule(e, SCHEDULES[name].decay_at)
    return chosen
    return chosen


# ----------------------------------------------------------------------------------------------
# Row sources: the same minibatch interface over arrays in memory and over an HDF5 file.


class ArrayRows:
    """Features and labels in memory."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        if x.ndim != 2 or len(x) != len(y):
            raise UserError(f"features {x.shape} and labels {y.shape} disagree")
        self.x, self.y = x, np.asarray(y, np.int64)

    @property
    def n(self) -> int:
        return len(self.y)

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])

    @property
    def labels(self) -> np.ndarray:
        return self.y

    def blocks(self, rng: np.random.Generator | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        idx = np.arange(self.n) if rng is None else rng.permutation(self.n)
        step = 65536
        for lo in range(0, self.n, step):
            sel = idx[lo : lo + step]
            yield self.x[sel], self.y[sel]

    def to_arrays(self, max_rows: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        if max_rows is None or self.n <= max_rows:
            return self.x, self.y
        sel = np.sort(np.random.default_rng(seed).choice(self.n, max_rows, replace=False))
        return self.x[sel], self.y[sel]


class FileRows:
    """The labelled rows of a feature file, streamed chunk by chunk (never all in memory).

    Shuffling permutes the order of stored chunks and then rows within a buffer of
    ``shuffle_blocks`` chunks: random enough for SGD on a convex problem while every read is a
    whole chunk (the file is chunked by rows for exactly this).
    """

    def __init__(self, ff, shuffle_blocks: int = 16):
        self.ff = ff
        self.shuffle_blocks = shuffle_blocks
        self._labels = ff.labels
        self._keep = self._labels >= 0

    @property
    def n(self) -> int:
        return int(self._keep.sum())

    @property
    def dim(self) -> int:
        return self.ff.dim

    @property
    def labels(self) -> np.ndarray:
        return self._labels[self._keep]

    def blocks(self, rng: np.random.Generator | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        b = self.ff.block_rows
        nblocks = (self.ff.n + b - 1) // b
        order = np.arange(nblocks) if rng is None else rng.permutation(nblocks)
        group = 1 if rng is None else self.shuffle_blocks
        for g in range(0, nblocks, group):
            xs, ys = [], []
            for lo, x in self.ff.iter_blocks(order[g : g + group]):
                keep = self._keep[lo : lo + len(x)]
                xs.append(x[keep])
                ys.append(self._labels[lo : lo + len(x)][keep])
            x, y = np.concatenate(xs), np.concatenate(ys)
            if rng is not None:
                p = rng.permutation(len(y))
                x, y = x[p], y[p]
            yield x, y

    def to_arrays(self, max_rows: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        rows = np.flatnonzero(self._keep)
        if max_rows is not None and len(rows) > max_rows:
            rows = np.sort(np.random.default_rng(seed).choice(rows, max_rows, replace=False))
        x = np.empty((len(rows), self.dim), np.float32)
        b = self.ff.block_rows
        at = 0
        for lo in range(0, self.ff.n, b):
            sel = rows[(rows >= lo) & (rows < lo + b)]
            if len(sel):
                x[at : at + len(sel)] = self.ff.rows(lo, lo + b)[sel - lo]
                at += len(sel)
        return x, self._labels[rows]


def batches(rows, batch_size: int, rng: np.random.Generator | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Fixed-size minibatches across block boundaries (the last one may be short)."""
    carry_x, carry_y = None, None
    for x, y in rows.blocks(rng):
        if carry_x is not None:
            x, y = np.concatenate([carry_x, x]), np.concatenate([carry_y, y])
        full = len(y) // batch_size * batch_size
        for lo in range(0, full, batch_size):
            yield x[lo : lo + batch_size], y[lo : lo + batch_size]
        carry_x, carry_y = x[full:], y[full:]
    if carry_y is not None and len(carry_y):
        yield carry_x, carry_y


@dataclass
class Standardizer:
    """Per-dimension mean/std of the training features (one streaming float64 pass).

    Both solvers see the same standardised features, so the SGD lr of the protocol works on
    features of any scale and the two solvers optimise the same problem.
    """

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, rows) -> Standardizer:
        s = np.zeros(rows.dim, np.float64)
        ss = np.zeros(rows.dim, np.float64)
        n = 0
        for x, _ in rows.blocks(None):
            x = x.astype(np.float64)
            s += x.sum(0)
            ss += (x * x).sum(0)
            n += len(x)
        mean = s / max(n, 1)
        var = np.maximum(ss / max(n, 1) - mean * mean, 0.0)
        scale = np.sqrt(var)
        scale[scale < 1e-8] = 1.0
        return cls(mean.astype(np.float32), scale.astype(np.float32))

    @classmethod
    def identity(cls, dim: int) -> Standardizer:
        return cls(np.zeros(dim, np.float32), np.ones(dim, np.float32))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, np.float32) - self.mean) / self.scale


def topk_accuracy(scores: np.ndarray, y: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent; k is capped at the number of classes."""
    out = {}
    if len(y) == 0:
        return {f"top{k}": float("nan") for k in ks}
    order = np.argsort(-scores, axis=1)
    for k in ks:
        kk = min(k, scores.shape[1])
        hit = (order[:, :kk] == np.asarray(y)[:, None]).any(1)
        out[f"top{k}"] = float(100.0 * hit.mean())
    return out


def class_coverage(train_labels: np.ndarray, val_labels: np.ndarray, class_names=None) -> dict:
    """Classes present in validation but never seen in training (always mispredicted)."""
    seen = set(np.unique(train_labels[train_labels >= 0]).tolist())
    vals, counts = np.unique(val_labels[val_labels >= 0], return_counts=True)
    missing = [
        {"class": int(c), "name": class_names[c] if class_names and c < len(class_names) else None,
         "val_images": int(k)}
        for c, k in zip(vals.tolist(), counts.tolist()) if c not in seen
    ]
    return {
        "train_classes": len(seen),
        "val_classes": len(vals),
        "missing_in_train": missing,
        "val_images_of_missing_classes": int(sum(m["val_images"] for m in missing)),
    }


# ----------------------------------------------------------------------------------------------
# scikit-learn L-BFGS: the convex reference


def fit_sklearn(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    *,
    num_classes: int,
    cs: Sequence[float] = (1e-3, 1e-2, 1e-1, 1.0, 10.0),
    holdout: float = 0.2,
    max_iter: int = 1000,
    seed: int = 0,
) -> dict:
    """Multinomial logistic regression by L-BFGS; C chosen on a held-out part of train, then refit.

    Features must already be standardised. Returns the chosen C, the held-out score of every C,
    and top-1/top-5 on ``val``; ``predict`` in the result maps features to class scores.
    """
    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    n = len(train_y)
    perm = rng.permutation(n)
    n_hold = int(round(holdout * n)) if len(cs) > 1 else 0
    hold, fit = perm[:n_hold], perm[n_hold:]
    scores = {}
    if n_hold and len(np.unique(train_y[fit])) >= 2:
        for c in cs:
            clf = LogisticRegression(C=c, max_iter=max_iter, tol=1e-6)
            clf.fit(train_x[fit], train_y[fit])
            s = _full_scores(clf, train_x[hold], num_classes)
            scores[c] = topk_accuracy(s, train_y[hold], (1,))["top1"]
        # Highest held-out accuracy; ties go to the stronger regulariser (smaller C).
        best_c = max(cs, key=lambda c: (scores[c], -c))
    else:
        best_c = cs[len(cs) // 2]
    if len(np.unique(train_y)) < 2:
        raise UserError("the training features hold fewer than 2 classes: nothing to classify")
    clf = LogisticRegression(C=best_c, max_iter=max_iter, tol=1e-6)
    clf.fit(train_x, train_y)
    val_scores = _full_scores(clf, val_x, num_classes)
    acc = topk_accuracy(val_scores, val_y)
    return {
        "C": float(best_c),
        "holdout_fraction": holdout if n_hold else 0.0,
        "holdout_top1_by_C": {repr(float(c)): v for c, v in scores.items()},
        "equivalent_weight_decay": 1.0 / (best_c * n),
        "n_train": int(n),
        "n_iter": int(np.max(clf.n_iter_)),
        "seconds": time.perf_counter() - t0,
        **acc,
        "_model": clf,
    }


def _full_scores(clf, x: np.ndarray, num_classes: int) -> np.ndarray:
    """Log-probabilities over ALL classes (classes absent from training get -inf)."""
    out = np.full((len(x), num_classes), -np.inf, np.float64)
    if len(x):
        out[:, clf.classes_] = clf.predict_log_proba(x)
    return out


def sklearn_linear(clf, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A fitted LogisticRegression as (W [C, D], b [C]) over ALL classes, in float64.

    Classes absent from training get weight 0 and a bias far below any real score (the
    reference's -inf, kept finite so the artifact stays plain numbers). A two-class fit has one
    row z (p = sigmoid(z)); the softmax rows (-z/2, +z/2) give the same probabilities.
    """
    coef = np.asarray(clf.coef_, np.float64)
    icpt = np.asarray(clf.intercept_, np.float64)
    if coef.shape[0] == 1 and len(clf.classes_) == 2:
        coef = np.concatenate([-coef / 2, coef / 2])
        icpt = np.concatenate([-icpt / 2, icpt / 2])
    w = np.zeros((num_classes, coef.shape[1]), np.float64)
    b = np.full(num_classes, ABSENT_CLASS_BIAS, np.float64)
    w[clf.classes_] = coef
    b[clf.classes_] = icpt
    return w, b


ABSENT_CLASS_BIAS = -1e4


# ----------------------------------------------------------------------------------------------
# Weighted kNN (Wu et al. 2018, as used by DINO and solo-learn), streamed


def knn_evaluate(train, val, *, num_classes: int, k: int = 20, temperature: float = 0.07,
                 val_block: int = 1024, train_block: int = 8192) -> dict:
    """Weighted k-nearest-neighbour top-1/top-5 of ``val`` against ``train`` (cosine similarity).

    Each of the k nearest training rows votes for its label with weight exp(sim / T); votes are
    summed per class (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance
    Discrimination", section 3.4; the DINO/solo-learn evaluation). Training rows are streamed
    block by block and a running top-k per validation row is kept, so memory is bounded by
    ``val_block x (k + train_block)`` similarities (32 MiB of float32 at the defaults, a few
    times that in temporaries) whatever the number of training rows.
    """
    t0 = time.perf_counter()
    kk = min(k, train.n)
    hits1 = hits5 = n = 0
    k5 = min(5, num_classes)
    for vx, vy in _val_chunks(val, val_block):
        q = _l2_normalize(vx)
        best_s = np.full((len(q), kk), -np.inf, np.float32)
        best_y = np.zeros((len(q), kk), np.int64)
        for bx, by in train.blocks(None):
            for lo in range(0, len(by), train_block):
                tx, ty = bx[lo : lo + train_block], by[lo : lo + train_block]
                sims = q @ _l2_normalize(tx).T  # [nv, B]
                cat_s = np.concatenate([best_s, sims], 1)
                cat_y = np.concatenate([best_y, np.broadcast_to(ty, sims.shape)], 1)
                top = np.argpartition(-cat_s, kk - 1, axis=1)[:, :kk]
                best_s = np.take_along_axis(cat_s, top, 1)
                best_y = np.take_along_axis(cat_y, top, 1)
        votes = np.zeros((len(q), num_classes), np.float64)
        np.add.at(votes, (np.arange(len(q))[:, None], best_y), np.exp(best_s.astype(np.float64) / temperature))
        order = np.argsort(-votes, axis=1, kind="stable")[:, :k5]
        vy = np.asarray(vy)
        hits1 += int((order[:, 0] == vy).sum())
        hits5 += int((order == vy[:, None]).any(1).sum())
        n += len(vy)
    return {"k": kk, "temperature": temperature, "metric": "cosine",
            "top1": 100.0 * hits1 / max(n, 1), "top5": 100.0 * hits5 / max(n, 1),
            "n_train": int(train.n), "n_val": int(n), "seconds": time.perf_counter() - t0}


def _val_chunks(val, size: int):
    bx, by, have = [], [], 0
    for x, y in val.blocks(None):
        bx.append(x)
        by.append(y)
        have += len(y)
        if have >= size:
            yield np.concatenate(bx), np.concatenate(by)
            bx, by, have = [], [], 0
    if have:
        yield np.concatenate(bx), np.concatenate(by)


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


# ----------------------------------------------------------------------------------------------
# SGD trainer (torch): the paper's protocol, streaming


@dataclass
class SGDSettings:
    batch_size: int = 256
    base_lr: float = 0.1  # per 256 images
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    device: str | None = None  # None: CUDA when available

    def lr(self) -> float:
        return self.base_lr * self.batch_size / 256


def fit_sgd(
    train,
    val,
    *,
    num_classes: int,
    schedule: Schedule,
    settings: SGDSettings | None = None,
    standardizer: Standardizer | None = None,
    progress: bool = False,
    desc: str = "probe",
    on_epoch: Callable[[dict], bool | None] | None = None,
) -> dict:
    """Train a linear classifier with SGD on streamed features; top-1/top-5 on ``val`` each epoch.

    ``train``/``val`` are :class:`ArrayRows` or :class:`FileRows`. The linear layer starts at
    zero (the problem is convex; zero makes runs reproducible). Weight decay is the coupled L2
    term of the release (S4L_REFERENCE.md section 3), on the kernel only.
    """
    import torch
    from tqdm import tqdm

    st = settings or SGDSettings()
    std = standardizer or Standardizer.identity(train.dim)
    device = torch.device(st.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(st.seed)
    rng = np.random.default_rng(st.seed)
    layer = torch.nn.Linear(train.dim, num_classes).to(device)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    lr = st.lr()
    opt = torch.optim.SGD(
        [{"params": [layer.weight], "weight_decay": st.weight_decay},
         {"params": [layer.bias], "weight_decay": 0.0}],
        lr=lr, momentum=st.momentum,
    )
    loss_fn = torch.nn.CrossEntropyLoss()
    steps_per_epoch = math.ceil(train.n / st.batch_size)
    curve = []
    t0 = time.perf_counter()
    bar = tqdm(total=schedule.epochs * steps_per_epoch, desc=desc, unit="step",
               disable=not progress, dynamic_ncols=True)
    for epoch in range(schedule.epochs):
        cur_lr = lr * schedule.lr_factor(epoch)
        for g in opt.param_groups:
            g["lr"] = cur_lr
        layer.train()
        total, count = 0.0, 0
        for xb, yb in batches(train, st.batch_size, rng):
            x = torch.from_numpy(std(xb)).to(device, non_blocking=True)
            y = torch.from_numpy(np.asarray(yb, np.int64)).to(device, non_blocking=True)
            loss = loss_fn(layer(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(yb)
            count += len(yb)
            bar.update(1)
        acc = evaluate_linear(layer, val, std, num_classes)
        point = {"epoch": epoch + 1, "lr": cur_lr, "train_loss": total / max(count, 1),
                 "seconds": time.perf_counter() - t0, **acc}
        curve.append(point)
        bar.set_postfix(top1=f"{acc['top1']:.2f}", loss=f"{point['train_loss']:.3f}")
        if on_epoch is not None and on_epoch(point):
            break  # the caller has seen enough (e.g. a time-to-accuracy benchmark)
    bar.close()
    return {
        "schedule": {"epochs": schedule.epochs, "decay_at_epochs": schedule.boundaries()},
        "settings": {**asdict(st), "lr": lr, "device": str(device)},
        "curve": curve,
        "top1": curve[-1]["top1"] if curve else float("nan"),
        "top5": curve[-1]["top5"] if curve else float("nan"),
        "best_top1": max((p["top1"] for p in curve), default=float("nan")),
        "seconds": time.perf_counter() - t0,
        "_layer": layer,
    }


def evaluate_linear(layer, rows, std: Standardizer, num_classes: int) -> dict[str, float]:
    """Top-1/top-5 of a torch linear layer over a row source, streamed."""
    import torch

    device = layer.weight.device
    hits1 = hits5 = n = 0
    k5 = min(5, num_classes)
    layer.eval()
    with torch.inference_mode():
        for xb, yb in rows.blocks(None):
            x = torch.from_numpy(std(xb)).to(device)
            y = torch.from_numpy(np.asarray(yb, np.int64)).to(device)
            top = layer(x).topk(k5, dim=1).indices
            hits1 += int((top[:, 0] == y).sum())
            hits5 += int((top == y[:, None]).any(1).sum())
            n += len(yb)
    if n == 0:
        return {"top1": float("nan"), "top5": float("nan")}
    return {"top1": 100.0 * hits1 / n, "top5": 100.0 * hits5 / n}


# ----------------------------------------------------------------------------------------------
# Both solvers on one train/val pair


@dataclass
class ProbeSettings:
    solvers: tuple[str, ...] = ("sklearn", "sgd")
    schedules: dict | None = None  # name -> Schedule; None = SCHEDULES
    sgd: SGDSettings | None = None
    weight_decay: float | str = "auto"  # "auto": sklearn's chosen C as coupled L2 (1 / (C n))
    cs: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    holdout: float = 0.2
    sklearn_max_rows: int = 200_000
    standardize: bool = True
    seed: int = 0
    knn_k: int = 20  # 0: no kNN evaluation
    knn_temperature: float = 0.07

    def to_dict(self) -> dict:
        d = asdict(self)
        d["schedules"] = {k: asdict(v) for k, v in (self.schedules or SCHEDULES).items()}
        return d


def fit_probe(train, val, *, num_classes: int, settings: ProbeSettings | None = None,
              class_names: Sequence[str] | None = None, progress: bool = False,
              desc: str = "probe") -> dict:
    """Fit the linear probe(s) on ``train`` rows and score them on ``val`` rows.

    ``train``/``val`` are :class:`ArrayRows` (arrays) or :class:`FileRows` (streamed from HDF5).
    """
    s = settings or ProbeSettings()
    unknown = set(s.solvers) - {"sklearn", "sgd"}
    if unknown:
        raise UserError(f"unknown solver(s) {sorted(unknown)}; use sklearn and/or sgd")
    if train.n == 0:
        raise UserError("the training features hold no labelled rows")
    if val.n == 0:
        raise UserError("the validation features hold no labelled rows")
    if train.dim != val.dim:
        raise UserError(f"train features are {train.dim}-d but validation features {val.dim}-d")
    for name, rows in (("train", train), ("val", val)):
        top = int(rows.labels.max())
        if top >= num_classes:
            raise UserError(f"{name} label {top} is out of range for {num_classes} classes")
    coverage = class_coverage(train.labels, val.labels, class_names)
    if coverage["missing_in_train"]:
        log.warning(
            "%d class(es) occur in validation but not in training (%d val images, always wrong): %s",
            len(coverage["missing_in_train"]), coverage["val_images_of_missing_classes"],
            ", ".join(str(m["name"] or m["class"]) for m in coverage["missing_in_train"][:10]),
        )
    std = Standardizer.fit(train) if s.standardize else Standardizer.identity(train.dim)
    result: dict = {"n_train": train.n, "n_val": val.n, "dim": train.dim,
                    "num_classes": num_classes, "coverage": coverage, "_standardizer": std}
    if s.knn_k:
        result["knn"] = knn_evaluate(train, val, num_classes=num_classes, k=s.knn_k,
                                     temperature=s.knn_temperature)
        log.info("weighted kNN (k=%d, T=%g): top1 %.2f top5 %.2f", s.knn_k, s.knn_temperature,
                 result["knn"]["top1"], result["knn"]["top5"])
    wd = s.weight_decay
    if "sklearn" in s.solvers:
        tx, ty = train.to_arrays(s.sklearn_max_rows, s.seed)
        vx, vy = val.to_arrays(None)
        log.info("scikit-learn L-BFGS on %d x %d features (C grid %s)", len(ty), train.dim, s.cs)
        sk = fit_sklearn(std(tx), ty, std(vx), vy, num_classes=num_classes, cs=s.cs,
                         holdout=s.holdout, seed=s.seed)
        clf = sk.pop("_model")
        sk["_linear"] = sklearn_linear(clf, num_classes)
        sk["subsampled"] = len(ty) < train.n
        result["sklearn"] = sk
        log.info("scikit-learn: C=%g top1 %.2f top5 %.2f", sk["C"], sk["top1"], sk["top5"])
        if wd == "auto":
            wd = 1.0 / (sk["C"] * len(ty))
    if wd == "auto":
        wd = 0.0
    if "sgd" in s.solvers:
        base = s.sgd or SGDSettings(seed=s.seed)
        sgd_settings = SGDSettings(**{**asdict(base), "weight_decay": float(wd)})
        result["sgd"] = {}
        for name, sched in (s.schedules or SCHEDULES).items():
            log.info("SGD %s schedule: %d epochs, lr %.3g, wd %.3g", name, sched.epochs,
                     sgd_settings.lr(), sgd_settings.weight_decay)
            r = fit_sgd(train, val, num_classes=num_classes, schedule=sched,
                        settings=sgd_settings, standardizer=std, progress=progress,
                        desc=f"{desc} {name}")
            layer = r.pop("_layer")
            r["_linear"] = (layer.weight.detach().cpu().double().numpy(),
                            layer.bias.detach().cpu().double().numpy())
            result["sgd"][name] = r
            log.info("SGD %s: top1 %.2f top5 %.2f", name, r["top1"], r["top5"])
    return result

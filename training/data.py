"""Torch datasets and deterministic, resumable, DDP-aware loaders for S4L's two training streams.

The release trains every step on a labelled batch (images named in the label map) and an
unlabelled batch drawn from the WHOLE training split (labelled images included), concatenated
into one forward (S4L_REFERENCE.md "Batches"). An epoch counts passes over the labelled subset:
steps_per_epoch = n_labelled // batch_size.

API (what the trainer calls)
----------------------------
::

    from s4l.datasets import open_source, training_subsets, check_same_classes
    from s4l.imaging import PreprocessSpec
    from s4l.training.data import make_train_loaders, make_eval_loader

    src = open_source(cfg.data.root, cfg.data.train_split)
    sub = training_subsets(src, label_map=cfg.data.labels, labels_per_class=...,
                           label_fraction=..., label_seed=..., val_per_class=...)
    data = make_train_loaders(
        src, sub.labelled, sub.unlabelled,
        batch_size=B, unsup_batch_size=B * unsup_batch_mult,   # GLOBAL batch sizes; 0 = no stream
        image_size=224, copies=1 (8 for exemplar), hsv_noise=False, crop_min_area=0.05,
        seed=cfg.seed, rank=env.rank, world_size=env.world_size, workers=cfg.data.workers)
    data.load_state_dict(ckpt["data_state"])       # when resuming (strict)
    for (x_l, y_l), unlabelled in data:             # infinite; unlabelled is None without it
        # (with hsv_noise + hsv_on_device=True each stream's batch is (x, y, hsv_params) and
        #  x = apply_deferred_hsv(x.to(dev), hsv_params.to(dev)) adds the release's HSV noise)
        x_u, _ = unlabelled                         # its labels are all -1
        ...                                         # one training step
        ckpt["data_state"] = data.state_dict()      # position AFTER the batches consumed

    val_src = open_source(cfg.data.root, cfg.data.eval_split); check_same_classes(src, val_src)
    ev = make_eval_loader(val_src, spec=PreprocessSpec(256, 224), batch_size=..., workers=...)
    for x, y in ev: ...                             # held-out images: make_eval_loader(src, sub.val, ...)

Shapes: every batch is `x: float32 [b, K, 3, S, S]` in [-1, 1] and `y: int64 [b]`, with b the
per-process batch (global // world_size) and K the copies per image (1, or 8 for exemplar);
`x.flatten(0, 1)` is image-major (copy k of image i at i*K + k, so an exemplar identity is
i). Rotations are NOT applied here: call `s4l.training.transforms.rotate4` on the device.

Determinism and resume
----------------------
The order of each stream is a pure function of (seed, stream, epoch): a permutation of its
index list per epoch, cut into global batches (the last partial batch of an epoch is dropped,
so no batch holds one image twice). With world size W, rank r takes the r-th contiguous slice
of every global batch, so the concatenation over ranks is the same global batch for any W.
A sample's augmentation is seeded from (seed, stream, epoch, position), so it is identical
whatever the worker count or rank. `state_dict()` holds each stream's (epoch, batch) position
as consumed by the caller (not as prefetched by workers); a resumed run yields exactly the
batches the uninterrupted run would have, and a state from a different data set size, batch
size, seed or image/label list (a fingerprint of the stream's names and labels) is refused.

Corrupt images
--------------
Training streams skip an undecodable image: it is counted (`dataset.skipped`, per process),
logged as a warning with its path and reason, and replaced by the next image of the same
stream's index list (deterministic, so resume stays exact); more than `max_skips` in a row is
an error. The eval loader cannot substitute without changing the metric: it yields an all-zero
image with label -1 (logged and counted), which counts as a miss; feature extraction records
such files in the HDF5 `errors` dataset instead.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from s4l.errors import UserError
from s4l.imaging import ImageError, PreprocessSpec
from s4l.training.transforms import AREA_RANGE, EvalTransform, TrainTransform

log = logging.getLogger(__name__)

LABELLED, UNLABELLED = 0, 1  # stream ids: they separate the random streams of the two loaders
_ORDER, _AUGMENT = 0, 1      # domain tags of the seed sequences
DEFAULT_MAX_SKIPS = 32


def augment_rng(seed: int, stream: int, epoch: int, position: int) -> np.random.Generator:
    """The generator one sample's augmentation draws from: a pure function of its key."""
    return np.random.default_rng([seed, _AUGMENT, stream, epoch, position])


# --------------------------------------------------------------------------------------------
# Datasets


class TrainDataset(Dataset):
    """Training images of one stream: `dataset[(epoch, position)] -> (x [K,3,S,S], label)`,
    plus the HSV parameters `[K, 7]` when the transform defers its HSV noise.

    `position` indexes `indices` (into `source`); the label is the source's, or `labels[i]`
    when a per-source-index override is given (pseudo-labels), or -1 for the unlabelled stream.
    """

    def __init__(self, source, indices: Sequence[int], transform: TrainTransform, *, seed: int,
                 stream: int, labels: Sequence[int] | np.ndarray | None = None,
                 unlabelled: bool = False, max_skips: int = DEFAULT_MAX_SKIPS) -> None:
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.seed = seed
        self.stream = stream
        self.unlabelled = unlabelled
        self.max_skips = max_skips
        if labels is not None:
            labels = np.asarray(labels, dtype=np.int64)
            if labels.shape != (len(source),):
                raise UserError(f"label override has shape {labels.shape}, expected ({len(source)},)")
        self.labels = labels
        self.skipped = 0

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the stream's (name, label) list: a resumed run must see the same images."""
        h = hashlib.sha256()
        for i in self.indices.tolist():
            h.update(f"{self.source.relpath(i)}\t{self.label_of(i)}\n".encode())
        return h.hexdigest()

    def __len__(self) -> int:
        return len(self.indices)

    def label_of(self, i: int) -> int:
        if self.unlabelled:
            return -1
        return int(self.labels[i]) if self.labels is not None else int(self.source.samples[i][1])

    def __getitem__(self, key: tuple[int, int] | int) -> tuple:
        epoch, pos = (0, key) if isinstance(key, (int, np.integer)) else key
        rng = augment_rng(self.seed, self.stream, int(epoch), int(pos))
        n = len(self.indices)
        for attempt in range(min(self.max_skips, n - 1) + 1):
            i = int(self.indices[(pos + attempt) % n])
            try:
                img = self.source.load(i)
            except ImageError as e:
                self.skipped += 1
                log.warning("skipping undecodable training image %s (%s: %s); %d skipped so far "
                            "in this process", self.source.path(i), e.code, e.message, self.skipped)
                continue
            x, hsv = self.transform.draw(img, rng)
            if hsv is not None:
                return x, self.label_of(i), hsv
            return x, self.label_of(i)
        raise UserError(
            f"{min(self.max_skips, n - 1) + 1} consecutive training images from "
            f"{self.source.path(int(self.indices[pos % n]))!r} on cannot be decoded; check the data"
        )


class EvalDataset(Dataset):
    """Evaluation images: `dataset[j] -> (x [1,3,crop,crop], label)` via `s4l.imaging.eval_crop`.

    An undecodable image gives zeros and label -1 (see the module docstring); `errors` lists
    (path, reason) for them, per process.
    """

    def __init__(self, source, indices: Sequence[int] | None = None,
                 spec: PreprocessSpec = PreprocessSpec()) -> None:
        self.source = source
        self.indices = np.arange(len(source)) if indices is None else np.asarray(indices, np.int64)
        self.transform = EvalTransform(spec)
        self.spec = spec
        self.errors: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, int]:
        i = int(self.indices[j])
        try:
            img = self.source.load(i)
        except ImageError as e:
            self.errors.append((self.source.path(i), e.message))
            log.warning("undecodable eval image %s (%s: %s): zeros, label -1",
                        self.source.path(i), e.code, e.message)
            return torch.zeros(1, 3, self.spec.crop, self.spec.crop), -1
        return self.transform(img), int(self.source.samples[i][1])


# --------------------------------------------------------------------------------------------
# Sampling


class GlobalBatchSampler:
    """Infinite batch sampler over `n` items: rank `rank`'s slice of every global batch.

    Yields lists of `(epoch, position)` keys. Epoch e's order is a permutation drawn from
    (seed, stream, e); global batch b of it is order[b*B:(b+1)*B]; the rank's slice is
    [r*B/W:(r+1)*B/W]. `start = (epoch, batch)` is where the next iteration begins.
    """

    def __init__(self, n: int, global_batch: int, *, seed: int, stream: int = LABELLED,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True, name: str = "") -> None:
        what = f"the {name} stream" if name else "the data"
        if n < 1:
            raise UserError(f"{what} is empty: nothing to sample from")
        if global_batch < 1:
            raise UserError(f"batch size must be >= 1, got {global_batch}")
        if global_batch > n:
            raise UserError(f"batch size {global_batch} is larger than {what} ({n} images)")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"bad rank {rank} for world size {world_size}")
        if global_batch % world_size:
            raise UserError(f"batch size {global_batch} is not divisible by the world size {world_size}")
        if seed < 0:
            raise UserError(f"seed must be >= 0, got {seed}")
        self.n, self.global_batch, self.seed, self.stream = n, global_batch, seed, stream
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.local_batch = global_batch // world_size
        self.steps_per_epoch = n // global_batch
        self.start = (0, 0)
        self._cache: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != epoch:
            perm = (np.random.default_rng([self.seed, _ORDER, self.stream, epoch]).permutation(self.n)
                    if self.shuffle else np.arange(self.n))
            self._cache = (epoch, perm)
        return self._cache[1]

    def global_batch_positions(self, epoch: int, batch: int) -> np.ndarray:
        b = self.global_batch
        return self.order(epoch)[batch * b:(batch + 1) * b]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, batch = self.start
        lo, hi = self.rank * self.local_batch, (self.rank + 1) * self.local_batch
        while True:
            for b in range(batch, self.steps_per_epoch):
                local = self.global_batch_positions(epoch, b)[lo:hi]
                yield [(epoch, int(p)) for p in local]
            epoch, batch = epoch + 1, 0


class StreamLoader:
    """A DataLoader over a `GlobalBatchSampler` that tracks the position its caller consumed."""

    def __init__(self, dataset: TrainDataset, sampler: GlobalBatchSampler, *, workers: int,
                 pin_memory: bool, name: str, prefetch_factor: int = 2) -> None:
        self.dataset, self.sampler, self.name = dataset, sampler, name
        kw: dict[str, Any] = {}
        if workers > 0:
            kw.update(persistent_workers=True, prefetch_factor=prefetch_factor)
        self.loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                 pin_memory=pin_memory, **kw)
        self.epoch, self.batch = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Infinite. Use one iterator at a time; a new one restarts from the saved position."""
        self.sampler.start = (self.epoch, self.batch)
        for xb in self.loader:
            self.batch += 1
            if self.batch == self.sampler.steps_per_epoch:
                self.epoch, self.batch = self.epoch + 1, 0
            yield xb

    def state_dict(self) -> dict[str, int]:
        s = self.sampler
        return {"epoch": self.epoch, "batch": self.batch, "n": s.n,
                "global_batch": s.global_batch, "seed": s.seed, "stream": s.stream,
                "fingerprint": self.dataset.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        s = self.sampler
        mine = {"n": s.n, "global_batch": s.global_batch, "seed": s.seed, "stream": s.stream}
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if not diff and state.get("fingerprint") != self.dataset.fingerprint:
            diff["images/labels"] = ("saved list", "a different list of the same size")
        if diff:
            raise UserError(
                f"cannot resume the {self.name} stream exactly: saved vs now differ in "
                + ", ".join(f"{k} ({a} vs {b})" for k, (a, b) in diff.items()))
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch < s.steps_per_epoch:
            raise UserError(f"bad {self.name} stream position epoch={epoch} batch={batch}")
        self.epoch, self.batch = epoch, batch


@dataclasses.dataclass
class TrainData:
    """The labelled stream, the optional unlabelled stream and what the trainer needs about them.

    Iterating yields `((x_l, y_l), (x_u, y_u) or None)` forever; `steps_per_epoch` is the
    labelled stream's (an epoch = one pass over the labelled subset).
    """

    labelled: StreamLoader
    unlabelled: StreamLoader | None
    classes: list[str]

    @property
    def steps_per_epoch(self) -> int:
        return self.labelled.steps_per_epoch

    def __iter__(self):
        lab = iter(self.labelled)
        if self.unlabelled is None:
            for b in lab:
                yield b, None
        else:
            unl = iter(self.unlabelled)
            for b in lab:
                yield b, next(unl)

    def skipped(self) -> int:
        """Undecodable images skipped in THIS process (workers count their own; see the logs)."""
        return self.labelled.dataset.skipped + (self.unlabelled.dataset.skipped if self.unlabelled else 0)

    def state_dict(self) -> dict[str, Any]:
        return {"labelled": self.labelled.state_dict(),
                "unlabelled": self.unlabelled.state_dict() if self.unlabelled else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "labelled" not in state:
            raise UserError("data state is missing or malformed; cannot resume exactly")
        if (state.get("unlabelled") is None) != (self.unlabelled is None):
            raise UserError("data state and this run disagree on having an unlabelled stream")
        self.labelled.load_state_dict(state["labelled"])
        if self.unlabelled is not None:
            self.unlabelled.load_state_dict(state["unlabelled"])


def make_train_loaders(source, labelled: Sequence[int], unlabelled: Sequence[int] | None = None,
                       *, batch_size: int, unsup_batch_size: int = 0, image_size: int = 224,
                       copies: int = 1, hsv_noise: bool = False,
                       crop_min_area: float = AREA_RANGE[0], augment: str = "inception",
                       pad: int = 4, seed: int = 0, rank: int = 0,
                       world_size: int = 1, workers: int = 4, pin_memory: bool | None = None,
                       labels: Sequence[int] | np.ndarray | None = None,
                       hsv_on_device: bool = False,
                       max_skips: int = DEFAULT_MAX_SKIPS) -> TrainData:
    """Build the labelled stream and (if unsup_batch_size > 0) the unlabelled stream.

    batch sizes are GLOBAL (split evenly over `world_size` ranks). `unlabelled` defaults to the
    whole split. `labels` overrides the labels per source index (pseudo-label students).
    Both streams use the same transform (the release applies the same preprocessing to both).
    With hsv_noise and hsv_on_device, the HSV noise is drawn in the workers but NOT applied:
    each batch is `(x, y, hsv_params [b, K, 7])` and the caller applies
    `s4l.training.transforms.apply_deferred_hsv(x, hsv_params)` on its device.
    """
    if len(labelled) == 0:
        raise UserError("the labelled subset is empty: no training image carries a label")
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    transform = TrainTransform(size=image_size, copies=copies, hsv_noise=hsv_noise,
                               area_range=(crop_min_area, 1.0), crop=augment, pad=pad,
                               defer_hsv=hsv_noise and hsv_on_device)
    lab_ds = TrainDataset(source, labelled, transform, seed=seed, stream=LABELLED,
                          labels=labels, max_skips=max_skips)
    lab = StreamLoader(lab_ds, GlobalBatchSampler(len(labelled), batch_size, seed=seed,
                                                  stream=LABELLED, rank=rank,
                                                  world_size=world_size, name="labelled"),
                       workers=workers, pin_memory=pin_memory, name="labelled")
    unl = None
    if unsup_batch_size > 0:
        idx = range(len(source)) if unlabelled is None else unlabelled
        unl_ds = TrainDataset(source, idx, transform, seed=seed, stream=UNLABELLED,
                              unlabelled=True, max_skips=max_skips)
        unl = StreamLoader(unl_ds, GlobalBatchSampler(len(unl_ds), unsup_batch_size, seed=seed,
                                                      stream=UNLABELLED, rank=rank,
                                                      world_size=world_size, name="unlabelled"),
                           workers=workers, pin_memory=pin_memory, name="unlabelled")
    return TrainData(labelled=lab, unlabelled=unl, classes=list(source.classes))


def make_eval_loader(source, indices: Sequence[int] | None = None, *,
                     spec: PreprocessSpec = PreprocessSpec(), batch_size: int = 256,
                     workers: int = 0, rank: int = 0, world_size: int = 1,
                     limit: int | None = None, pin_memory: bool | None = None) -> DataLoader:
    """Sequential eval loader (eval_crop, no augmentation); `batch_size` is per process.

    With world_size > 1 rank r takes every W-th image (r, r+W, ...), so the ranks together
    cover each image exactly once; `limit` keeps the first `limit` images (before sharding).
    """
    idx = np.arange(len(source)) if indices is None else np.asarray(indices, np.int64)
    if limit is not None:
        if limit < 1:
            raise UserError(f"eval limit must be >= 1, got {limit}")
        idx = idx[:limit]
    if len(idx) == 0:
        raise UserError(f"nothing to evaluate in {source!r}")
    if batch_size < 1:
        raise UserError(f"eval batch size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"bad rank {rank} for world size {world_size}")
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    ds = EvalDataset(source, idx[rank::world_size], spec)
    kw: dict[str, Any] = {"persistent_workers": True} if workers > 0 else {}
    return DataLoader(ds, batch_size=batch_size, shuffle=False, drop_last=False,
                      num_workers=workers, pin_memory=pin_memory, **kw)

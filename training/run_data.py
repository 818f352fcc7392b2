"""The training run's images: the labelled / unlabelled / held-out index lists of its source, the
eval splits, and the training stream cut into BN shards (`s4l.training.data` does the
deterministic, resumable, rank-sliced loading)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from s4l.errors import UserError
from s4l.imaging import PreprocessSpec
from s4l.training import config as C
from s4l.training import distributed as D
from s4l.training.objectives import Objective

if TYPE_CHECKING:
    from s4l.training.trainer import Plan


class RunData:
    """The run's images: training source, labelled / unlabelled / held-out index lists, the
    eval split, and the training stream cut into BN shards (`s4l.training.data` does the
    deterministic, resumable, rank-sliced loading)."""

    def __init__(self, cfg: C.TrainConfig, env: D.DistEnv) -> None:
        from s4l.datasets import check_same_classes, open_source, training_subsets

        d = cfg.data
        self.cfg, self.env = cfg, env
        self.source = open_source(d.root, d.train_split)
        self.class_names = list(self.source.classes)
        if len(self.class_names) < 2:
            raise UserError(f"{d.root} has {len(self.class_names)} class(es); need at least 2")
        sub = training_subsets(self.source, label_map=d.labels,
                               labels_per_class=d.labels_per_class,
                               label_fraction=d.label_fraction, label_seed=d.label_seed,
                               val_per_class=d.val_per_class)
        self.labelled, self.unlabelled, self.heldout = sub.labelled, sub.unlabelled, sub.val
        self.label_override = None
        if d.pseudo_labels:
            from s4l.training.teacher_labels import read_pseudo_labels

            if any(v is not None for v in (d.labels, d.labels_per_class, d.label_fraction)):
                raise UserError("data.pseudo_labels trains on ALL images with the file's labels; "
                                "do not also give a labelled subset (--labels*)")
            # The student's labelled stream is every training image (minus the held-out ones)
            # with the file's hard labels: ground truth where labelled, the teacher's otherwise.
            self.label_override = read_pseudo_labels(d.pseudo_labels, self.source)
            self.labelled = list(self.unlabelled)
        self.eval_source = open_source(d.root, d.eval_split)
        check_same_classes(self.source, self.eval_source)
        self.n_labelled = len(self.labelled)
        self.n_unlabelled = len(self.unlabelled)

    def stream(self, objective: Objective, plan: Plan, env: D.DistEnv) -> ShardStream:
        from s4l.training.data import make_train_loaders

        d, o = self.cfg.data, self.cfg.optim
        common = dict(image_size=d.image_size, copies=objective.copies, hsv_noise=d.hsv_noise,
                      crop_min_area=d.crop_min_area, augment=d.augment, pad=d.pad_crop,
                      seed=self.cfg.seed, rank=env.rank,
                      world_size=env.world_size, workers=d.workers)
        if objective.uses_labelled:
            data = make_train_loaders(
                self.source, self.labelled, self.unlabelled, batch_size=o.batch_size,
                unsup_batch_size=o.batch_size * o.unsup_batch_mult if objective.uses_unlabelled
                else 0, labels=self.label_override, **common)
        else:
            # Purely self-supervised: the one stream is the whole split (no labels used).
            data = make_train_loaders(self.source, self.unlabelled, None,
                                      batch_size=o.batch_size * o.unsup_batch_mult, **common)
        return ShardStream(data, objective, plan)

    def eval_loaders(self) -> dict[str, Any]:
        """{"eval": the eval split, "heldout": the tiny validation split (if any)}; built once."""
        if getattr(self, "_eval_loaders", None) is None:
            self._eval_loaders = self._make_eval_loaders()
        return self._eval_loaders

    def _make_eval_loaders(self) -> dict[str, Any]:
        from s4l.training.data import make_eval_loader

        d = self.cfg.data
        spec = PreprocessSpec(resize=d.eval_resize, crop=d.image_size, interpolation="area")
        kw = dict(spec=spec, batch_size=d.eval_batch_size, workers=min(d.workers, 2),
                  rank=self.env.rank, world_size=self.env.world_size)
        idx = None
        if d.eval_limit is not None and d.eval_limit < len(self.eval_source):
            # A fixed random subset (the split is sorted by class: its first N would be one class).
            import numpy as np

            idx = np.sort(np.random.default_rng(0).permutation(len(self.eval_source))[:d.eval_limit])
        loaders = {"eval": make_eval_loader(self.eval_source, idx, **kw)}
        if self.heldout:
            loaders["heldout"] = make_eval_loader(self.source, self.heldout, **kw)
        return loaders


class ShardStream:
    """Yields, per step, this process's list of BN shards (batch dicts for the objective)."""

    def __init__(self, data, objective: Objective, plan: Plan) -> None:
        self.data, self.objective, self.plan = data, objective, plan
        self._it = None

    def __next__(self) -> list[dict[str, torch.Tensor]]:
        # Starting DataLoader iterators (lazily, on the first next) draws worker base seeds from
        # torch's global RNG; keep that out of the training RNG (VAT noise) so a resumed run,
        # which starts its iterators at step k rather than 0, draws the same numbers as an
        # uninterrupted one. Augmentation does not depend on it (seeded per sample by
        # s4l.training.data).
        with torch.random.fork_rng(devices=[]):
            if self._it is None:
                self._it = iter(self.data)
            (x_l, y_l), unl = next(self._it)
        obj, p = self.objective, self.plan
        shards = []
        for j in range(p.shards_per_process):
            batch: dict[str, torch.Tensor] = {}
            if obj.uses_labelled:
                sl = slice(j * p.labelled_per_shard, (j + 1) * p.labelled_per_shard)
                batch["labelled"], batch["labels"] = x_l[sl], y_l[sl]
                if obj.uses_unlabelled:
                    su = slice(j * p.unlabelled_per_shard, (j + 1) * p.unlabelled_per_shard)
                    batch["unlabelled"] = unl[0][su]
            else:
                su = slice(j * p.unlabelled_per_shard, (j + 1) * p.unlabelled_per_shard)
                batch["unlabelled"] = x_l[su]
            shards.append(batch)
        return shards

    def state_dict(self) -> dict[str, Any]:
        return self.data.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._it is not None:
            raise RuntimeError("load the data state before the first batch")
        self.data.load_state_dict(state)

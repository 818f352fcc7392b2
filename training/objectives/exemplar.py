"""Exemplar objectives: self-supervised Exemplar and S4L-Exemplar (batch-hard triplet loss).

S4L_REFERENCE.md sections 1 and 3 (the release's semi_supervised/exemplar.py): the data pipeline
turns every image into `copies` = 8 augmentations ([B, 8, 3, H, W]); the copies of one image
share an identity; an `embedding` head (1000-d) is trained with the batch-hard soft-margin
triplet loss on L2-normalised embeddings (`losses.batch_hard_triplet`). S4L-Exemplar runs both
streams through ONE forward and adds the class loss on all 8 copies of each labelled image:

    L = CE_class(all copies of labelled) + w * 0.5 * (T(unlabelled) + T(labelled)),  w = 1.

Self-supervised Exemplar uses T(unlabelled) only. Each stream's triplet loss mines within that
stream of the local (per-device) batch, as the release does; `exemplar_grouping_bug`
reproduces the release's identity labels (`losses.exemplar_identities`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from s4l.training.objectives.base import Objective, ObjectiveOutput
from s4l.training.objectives.losses import (
    accuracy,
    batch_hard_triplet,
    cross_entropy,
    exemplar_identities,
)

EXEMPLAR_COPIES = 8


class _ExemplarBase(Objective):
    copies: ClassVar[int] = EXEMPLAR_COPIES

    def _triplet(self, embeddings: torch.Tensor, copies: int) -> torch.Tensor:
        """Triplet loss of one stream of num_images * copies embeddings (image-major)."""
        num_images = embeddings.shape[0] // copies
        ids = exemplar_identities(num_images, copies, grouping_bug=self.cfg.exemplar_grouping_bug)
        return batch_hard_triplet(embeddings, ids)


class ExemplarObjective(_ExemplarBase):
    """Self-supervised Exemplar on the unlabelled stream: L = T(unlabelled).

    Metrics: loss, loss_triplet.
    """

    name: ClassVar[str] = "exemplar"
    uses_labelled: ClassVar[bool] = False
    uses_unlabelled: ClassVar[bool] = True
    metric_names: ClassVar[tuple[str, ...]] = ("loss", "loss_triplet")

    def heads(self) -> dict[str, int]:
        return {"embedding": self.cfg.embedding_dim}

    def __call__(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> ObjectiveOutput:
        images, k = self._unlabelled(batch)
        emb = model(images, heads=("embedding",))["embedding"]
        loss = self._triplet(emb, k)
        return ObjectiveOutput(
            loss=loss, metrics={"loss": loss.detach(), "loss_triplet": loss.detach()}
        )


class S4LExemplarObjective(_ExemplarBase):
    """S4L-Exemplar: L = CE_class + triplet_weight * mean(T_unl, T_lab).

    Metrics: loss, loss_class, loss_triplet, loss_triplet_labelled, loss_triplet_unlabelled,
    acc_class.
    """

    name: ClassVar[str] = "s4l-exemplar"
    uses_labelled: ClassVar[bool] = True
    uses_unlabelled: ClassVar[bool] = True
    metric_names: ClassVar[tuple[str, ...]] = (
        "loss",
        "loss_class",
        "loss_triplet",
        "loss_triplet_labelled",
        "loss_triplet_unlabelled",
        "acc_class",
    )

    def heads(self) -> dict[str, int]:
        return {"classes": self.num_classes, "embedding": self.cfg.embedding_dim}

    def __call__(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> ObjectiveOutput:
        images_l, labels, k_l = self._labelled(batch)
        images_u, k_u = self._unlabelled(batch)
        n = images_l.shape[0]
        out = model(torch.cat([images_l, images_u]), heads=("classes", "embedding"))
        loss_class = cross_entropy(out["classes"][:n], labels)
        t_l = self._triplet(out["embedding"][:n], k_l)
        t_u = self._triplet(out["embedding"][n:], k_u)
        loss_triplet = 0.5 * (t_u + t_l)
        loss = loss_class + self.cfg.triplet_weight * loss_triplet
        return ObjectiveOutput(
            loss=loss,
            metrics={
                "loss": loss.detach(),
                "loss_class": loss_class.detach(),
                "loss_triplet": loss_triplet.detach(),
                "loss_triplet_labelled": t_l.detach(),
                "loss_triplet_unlabelled": t_u.detach(),
                "acc_class": accuracy(out["classes"][:n], labels),
            },
        )

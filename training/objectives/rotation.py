"""Rotation objectives: self-supervised Rotation and S4L-Rotation.

S4L_REFERENCE.md sections 1 and 3 (the release's semi_supervised/rotation.py): every image is
turned into its 4 exact rot90 copies (0, 90, 180, 270 degrees; made here on the device) and a
4-way `rotation` head predicts which. S4L-Rotation runs the rotated labelled and unlabelled
images through ONE forward (joint BN statistics), puts the class loss on all 4 rotated copies of
each labelled image and the rotation loss on both streams:

    L = CE_class(rotated labelled) + w * 0.5 * (CE_rot(unlabelled) + CE_rot(labelled)),  w = 1.

Self-supervised Rotation uses the rotation loss on the unlabelled stream only (no labels).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from s4l.training.objectives.base import Objective, ObjectiveOutput
from s4l.training.objectives.losses import (
    NUM_ROTATIONS,
    accuracy,
    cross_entropy,
    rotate_copies,
)


class RotationObjective(Objective):
    """Self-supervised rotation prediction on the unlabelled stream: L = CE_rot.

    Metrics: loss, loss_rotation, acc_rotation.
    """

    name: ClassVar[str] = "rotation"
    device_rotations: ClassVar[int] = NUM_ROTATIONS
    uses_labelled: ClassVar[bool] = False
    uses_unlabelled: ClassVar[bool] = True
    metric_names: ClassVar[tuple[str, ...]] = ("loss", "loss_rotation", "acc_rotation")

    def heads(self) -> dict[str, int]:
        return {"rotation": NUM_ROTATIONS}

    def __call__(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> ObjectiveOutput:
        images, _ = self._unlabelled(batch)
        rotated, rot_labels = rotate_copies(images)
        logits = model(rotated, heads=("rotation",))["rotation"]
        loss = cross_entropy(logits, rot_labels)
        return ObjectiveOutput(
            loss=loss,
            metrics={
                "loss": loss.detach(),
                "loss_rotation": loss.detach(),
                "acc_rotation": accuracy(logits, rot_labels),
            },
        )


class RotationForward:
    """The shared first half of S4L-Rotation and MOAM: rotate both streams, one forward.

    Attributes after construction: n_l (rows of the labelled stream), class_labels [n_l],
    rot_labels_l [n_l], rot_labels_u [n_u], images_u (rotated unlabelled images), out (the
    model's output dict over [labelled; unlabelled]).
    """

    def __init__(
        self, objective: Objective, model: nn.Module, batch: Mapping[str, torch.Tensor]
    ) -> None:
        images_l, labels, _ = objective._labelled(batch)
        images_u, _ = objective._unlabelled(batch)
        rot_l, self.rot_labels_l = rotate_copies(images_l)
        self.images_u, self.rot_labels_u = rotate_copies(images_u)
        self.class_labels = labels.repeat_interleave(NUM_ROTATIONS)
        # objective.class_rotations = "upright": the class loss sees the 0-degree copies only.
        self.upright_only = objective.cfg.class_rotations == "upright"
        self.n_l = rot_l.shape[0]
        self.out = model(torch.cat([rot_l, self.images_u]), heads=("classes", "rotation"))

    def losses(self) -> dict[str, torch.Tensor]:
        """loss_class, loss_rotation (= mean of the two streams' CE_rot) and their parts."""
        classes, rotation, n = self.out["classes"], self.out["rotation"], self.n_l
        rot_l = cross_entropy(rotation[:n], self.rot_labels_l)
        rot_u = cross_entropy(rotation[n:], self.rot_labels_u)
        if self.upright_only:
            keep = self.rot_labels_l == 0
            loss_class = cross_entropy(classes[:n][keep], self.class_labels[keep])
        else:
            loss_class = cross_entropy(classes[:n], self.class_labels)
        return {
            "loss_class": loss_class,
            "loss_rotation": 0.5 * (rot_u + rot_l),
            "loss_rotation_labelled": rot_l,
            "loss_rotation_unlabelled": rot_u,
        }

    def accuracies(self) -> dict[str, torch.Tensor]:
        """acc_class on the rotated labelled copies, acc_rotation over both streams."""
        rot_labels = torch.cat([self.rot_labels_l, self.rot_labels_u])
        return {
            "acc_class": accuracy(self.out["classes"][: self.n_l], self.class_labels),
            "acc_rotation": accuracy(self.out["rotation"], rot_labels),
        }


class S4LRotationObjective(Objective):
    """S4L-Rotation: L = CE_class + rotation_weight * mean(CE_rot_unl, CE_rot_lab).

    Metrics: loss, loss_class, loss_rotation, loss_rotation_labelled, loss_rotation_unlabelled,
    acc_class, acc_rotation.
    """

    name: ClassVar[str] = "s4l-rotation"
    device_rotations: ClassVar[int] = NUM_ROTATIONS
    uses_labelled: ClassVar[bool] = True
    uses_unlabelled: ClassVar[bool] = True
    rotation_eval: ClassVar[bool] = True
    metric_names: ClassVar[tuple[str, ...]] = (
        "loss",
        "loss_class",
        "loss_rotation",
        "loss_rotation_labelled",
        "loss_rotation_unlabelled",
        "acc_class",
        "acc_rotation",
    )

    def heads(self) -> dict[str, int]:
        return {"classes": self.num_classes, "rotation": NUM_ROTATIONS}

    def __call__(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> ObjectiveOutput:
        fwd = RotationForward(self, model, batch)
        parts = fwd.losses()
        loss = parts["loss_class"] + self.cfg.rotation_weight * parts["loss_rotation"]
        metrics = {"loss": loss.detach()}
        metrics.update({k: v.detach() for k, v in parts.items()})
        metrics.update(fwd.accuracies())
        return ObjectiveOutput(loss=loss, metrics=metrics)

"""The supervised baseline: cross-entropy on the labelled images only.

S4L_REFERENCE.md section 2/3 ("Supervised baseline", the release's semi_supervised/
supervised.py): L = CE(classes(x_l), y_l), mean over the labelled batch. With copies > 1 (not
used by the presets) every copy carries its image's label.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from s4l.training.objectives.base import Objective, ObjectiveOutput
from s4l.training.objectives.losses import accuracy, cross_entropy


class SupervisedObjective(Objective):
    """L = CE on the labelled batch. Metrics: loss, loss_class, acc_class."""

    name: ClassVar[str] = "supervised"
    uses_labelled: ClassVar[bool] = True
    uses_unlabelled: ClassVar[bool] = False
    metric_names: ClassVar[tuple[str, ...]] = ("loss", "loss_class", "acc_class")

    def heads(self) -> dict[str, int]:
        return {"classes": self.num_classes}

    def __call__(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> ObjectiveOutput:
        images, labels, _ = self._labelled(batch)
        logits = model(images, heads=("classes",))["classes"]
        loss = cross_entropy(logits, labels)
        return ObjectiveOutput(
            loss=loss,
            metrics={
                "loss": loss.detach(),
                "loss_class": loss.detach(),
                "acc_class": accuracy(logits, labels),
            },
        )

"""Linear evaluation of a frozen backbone ("Self-sup. + Linear" rows of Table 1).

S4L_REFERENCE.md section 2: a linear classifier on the frozen self-supervised representation
(`pre_logits`), trained with cross-entropy on the labelled images. The backbone is in inference
mode: no gradients and BN running statistics used, not updated. This objective enforces that:
`prepare(model)` (once, before the optimiser and any DDP wrapper, so neither sees backbone
parameters as trainable) sets requires_grad=False on the backbone, and `train_mode(model)`
(instead of model.train()) keeps the backbone in eval mode while the heads train. Calling the
objective on a model where either was skipped raises instead of silently fine-tuning.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from s4l.training.objectives.base import ObjectiveOutput, unwrap_model
from s4l.training.objectives.supervised import SupervisedObjective


class LinearObjective(SupervisedObjective):
    """L = CE on the class head over a frozen backbone. Metrics: loss, loss_class, acc_class."""

    name: ClassVar[str] = "linear"
    frozen_backbone: ClassVar[bool] = True

    def prepare(self, model: nn.Module) -> None:
        unwrap_model(model).backbone.requires_grad_(False)

    def train_mode(self, model: nn.Module) -> None:
        model.train()
        unwrap_model(model).backbone.eval()

    def __call__(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> ObjectiveOutput:
        backbone = unwrap_model(model).backbone
        if backbone.training or any(p.requires_grad for p in backbone.parameters()):
            raise RuntimeError(
                "the linear objective needs a frozen backbone: call objective.prepare(model) "
                "once before building the optimiser/DDP, and objective.train_mode(model) "
                "instead of model.train()"
            )
        return super().__call__(model, batch)

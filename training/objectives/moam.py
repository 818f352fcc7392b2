"""MOAM step 1 ("Mix Of All Models"): S4L-Rotation + VAT + Entropy Minimisation.

S4L_REFERENCE.md sections 2 and 3 (the release's semi_supervised/rotation_vat.py with
config/moam_step_1.sh): one forward over the rotated labelled and rotated unlabelled images,
then

    L = 0.4 * L_rot + 0.3 * CE + 0.3 * KL_vat + 0.3 * H,   L_rot = 0.5 * (CE_rot_unl + CE_rot_lab)

with the class loss on all 4 rotated copies of each labelled image, and VAT (eps 32) and the
entropy H on the rotated UNLABELLED images only. The release writes the weights as
(1 - wc - wv) * L_rot + wc * CE + wv * KL_vat + entmin_factor * H; here each is its own config
field (moam_rotation_weight, moam_class_weight, moam_vat_weight, moam_entmin_weight).

The clean logits of the unlabelled images come from the joint forward (BN statistics over both
streams), but the perturbed passes see the unlabelled images alone. The KL loss compares them as
the release does; the power iteration, however, differences against a fresh float32 forward of
the unlabelled images alone (the release's vat_utils docstring requires logits "equal to
net(x)"; against the joint-batch logits its xi = 1e-6 finite difference would measure the BN
batch change, not the Hessian). Synchronised BN and Polyak averaging are the trainer's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from s4l.training.objectives.base import ObjectiveOutput
from s4l.training.objectives.losses import entropy
from s4l.training.objectives.rotation import RotationForward, S4LRotationObjective
from s4l.training.objectives.vat import vat_loss


class MOAMObjective(S4LRotationObjective):
    """MOAM step 1: S4L-Rotation's two heads and forward pass, with its own loss weights plus
    VAT and entropy minimisation on the unlabelled stream. Metrics: S4L-Rotation's, with
    loss_vat and entropy."""

    name: ClassVar[str] = "moam"
    metric_names: ClassVar[tuple[str, ...]] = (
        *S4LRotationObjective.metric_names[:5], "loss_vat", "entropy",
        *S4LRotationObjective.metric_names[5:],
    )

    def __call__(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> ObjectiveOutput:
        fwd = RotationForward(self, model, batch)
        parts = fwd.losses()
        logits_u = fwd.out["classes"][fwd.n_l :]
        cfg = self.cfg
        ent = entropy(logits_u)
        loss_vat = vat_loss(
            model,
            fwd.images_u,
            logits_u,
            eps=cfg.moam_vat_eps,
            xi=cfg.vat_xi,
            iterations=cfg.vat_power_iterations,
            direction=cfg.vat_kl_direction,
            reference_is_clean=False,
            method=cfg.vat_hessian_product,
        )
        loss = (
            cfg.moam_rotation_weight * parts["loss_rotation"]
            + cfg.moam_class_weight * parts["loss_class"]
            + cfg.moam_vat_weight * loss_vat
            + cfg.moam_entmin_weight * ent
        )
        metrics = {"loss": loss.detach()}
        metrics.update({k: v.detach() for k, v in parts.items()})
        metrics["loss_vat"] = loss_vat.detach()
        metrics["entropy"] = ent.detach()
        metrics.update(fwd.accuracies())
        return ObjectiveOutput(loss=loss, metrics=metrics)

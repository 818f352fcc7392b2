"""Fine-tuning a self-supervised model on the labelled images ("Self-sup. + Fine-tune" rows).

S4L_REFERENCE.md section 2, Table 1: a self-supervised Rotation/Exemplar network is fine-tuned on
the labelled subset with the supervised loss. The loss is exactly the supervised one; the
trainer (not this objective) loads the pretrained backbone as the initialisation and builds a
fresh `classes` head.
"""

from __future__ import annotations

from typing import ClassVar

from s4l.training.objectives.supervised import SupervisedObjective


class FineTuneObjective(SupervisedObjective):
    """L = CE on the labelled batch, whole network trained. Metrics: loss, loss_class, acc_class."""

    name: ClassVar[str] = "fine-tune"

"""The pseudo-label student: cross-entropy on hard labels for ALL training images.

S4L_REFERENCE.md section 3 ("Pseudo-labels") and MOAM step 2: a trained teacher labels every
training image; the student is trained from scratch on all images with hard labels (ground truth
where the image is in the labelled list, the teacher's label otherwise), no confidence threshold.
Producing those labels is the data pipeline's job: they arrive in batch["labels"] for every image
of batch["labelled"] (the whole training set is the "labelled" stream here). The loss is the
supervised one; the name keeps runs and presets honest about what they train on.
"""

from __future__ import annotations

from typing import ClassVar

from s4l.training.objectives.supervised import SupervisedObjective


class PseudoLabelObjective(SupervisedObjective):
    """L = CE(classes(x), hard pseudo-label) over all images. Metrics: loss, loss_class, acc_class
    (acc_class is agreement with the hard labels in the batch, teacher's or ground truth)."""

    name: ClassVar[str] = "pseudo-label"

"""Training objectives: one name -> class table (`OBJECTIVES`) behind one call signature.

THE CONTRACT (the trainer and the data pipeline rely on exactly this):

    obj = build_objective(name, ObjectiveConfig(...), num_classes)   # or OBJECTIVES[name](cfg, C)
    spec = ModelSpec(..., heads=obj.heads())     # e.g. {"classes": C, "rotation": 4}
    model = build_model(spec)
    obj.prepare(model)                           # once, unwrapped, BEFORE the optimiser and DDP
    ...
    obj.train_mode(model)                        # instead of model.train() (linear: backbone eval)
    out = obj(model, batch)                      # model may be DDP-wrapped; autocast is the caller's
    out.loss.backward()                          # out.metrics: detached 0-d tensors, names =
                                                 # type(obj).metric_names

Class attributes: `name`, `copies` (K: images per source image the data pipeline makes: 1, or 8
for exemplar), `uses_labelled`, `uses_unlabelled`, `rotation_eval` (also report
rotation-averaged accuracy), `frozen_backbone` (linear), `metric_names`.

The batch (keys present iff the objective uses the stream):
    "labelled"   [B_l, K, 3, H, W] float in [-1, 1]   (uses_labelled)
    "labels"     [B_l] int64 class indices            (uses_labelled; pseudo-label: hard labels)
    "unlabelled" [B_u, K, 3, H, W] float in [-1, 1]   (uses_unlabelled)
Rotations are made here, on the device (`losses.rotate_copies`); images must be square for the
rotation family. Labelled and unlabelled images go through ONE forward (joint BN statistics, as
the release) and the outputs are split back.

Evaluation: `predict_logits(model, images, rotation_average)`: class logits on the images as
given, or the mean of the logits over the 4 rotations.

Objectives and their metrics (every objective also returns "loss", the total):
    supervised, fine-tune, pseudo-label, linear: loss_class, acc_class
    rotation:      loss_rotation, acc_rotation                     (self-supervised, unlabelled only)
    s4l-rotation:  loss_class, loss_rotation, loss_rotation_labelled, loss_rotation_unlabelled,
                   acc_class, acc_rotation
    exemplar:      loss_triplet                                    (self-supervised, unlabelled only)
    s4l-exemplar:  loss_class, loss_triplet, loss_triplet_labelled, loss_triplet_unlabelled,
                   acc_class
    vat:           loss_class, loss_vat, entropy (reported, not weighted), acc_class
    vat-entmin:    loss_class, loss_vat, entropy, acc_class
    moam:          loss_class, loss_rotation, loss_rotation_labelled, loss_rotation_unlabelled,
                   loss_vat, entropy, acc_class, acc_rotation

Notes for the trainer:
- `linear` trains the class head on a frozen backbone: `prepare` sets requires_grad=False on
  the backbone and `train_mode` keeps the backbone in eval mode (BN running statistics used and
  not updated); calling the objective otherwise raises.
- VAT-family objectives (`vat`, `vat-entmin`, `moam`) run their extra perturbed forwards on the
  UNWRAPPED module (`base.unwrap_model`: DDP's `.module`, torch.compile's `_orig_mod`, so
  under torch.compile these passes run eagerly), so they skip DDP's per-forward
  work (buffer broadcast, unused-parameter search) and DDP sees one forward per backward; the
  perturbed forward's gradients reach the same parameters and DDP's hooks average them with
  the rest in the one backward (tested against an unwrapped model). Every parameter the
  perturbed passes use is also used by the wrapped forward, and every objective uses all the
  heads it asks for, so find_unused_parameters is not needed. Those passes use batch
  statistics but leave BN running statistics and num_batches_tracked untouched (they toggle
  BN's track_running_stats for the pass: a torch.compile'd model may recompile for it), and
  the power iteration runs in float32 with autocast disabled. They draw r ~ N(0, I) from
  torch's global RNG (seed it per rank). With the release's xi = 1e-6 the float32 finite
  difference is rounding-dominated (see vat.py); `vat_hessian_product="forward_mode"` is the
  exact alternative.
- Metrics are per-process values; all-reduce them for logging if wanted.
- `Objective(cfg, num_classes)` takes an ObjectiveConfig (ObjectiveConfig.from_dict for a dict;
  bad values raise s4l.errors.UserError).
- Every loss is a mean over the local batch, so with equal per-process batch sizes DDP's
  gradient averaging gives the global-batch gradient. Exceptions inherited from the release
  (documented, not hidden): BN statistics are per device unless the trainer uses SyncBatchNorm,
  and the exemplar triplet loss mines hard positives/negatives within each device's batch
  ("computed per device"), so its value depends on the per-device batch.
"""

from __future__ import annotations

from s4l.errors import UserError
from s4l.training.objectives.base import (
    Objective,
    ObjectiveConfig,
    ObjectiveOutput,
    predict_logits,
    unwrap_model,
)
from s4l.training.objectives.exemplar import ExemplarObjective, S4LExemplarObjective
from s4l.training.objectives.fine_tune import FineTuneObjective
from s4l.training.objectives.linear import LinearObjective
from s4l.training.objectives.moam import MOAMObjective
from s4l.training.objectives.pseudo_label import PseudoLabelObjective
from s4l.training.objectives.rotation import RotationObjective, S4LRotationObjective
from s4l.training.objectives.supervised import SupervisedObjective
from s4l.training.objectives.vat import VATEntMinObjective, VATObjective

OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls
    for cls in (
        SupervisedObjective,
        RotationObjective,
        S4LRotationObjective,
        ExemplarObjective,
        S4LExemplarObjective,
        VATObjective,
        VATEntMinObjective,
        PseudoLabelObjective,
        MOAMObjective,
        LinearObjective,
        FineTuneObjective,
    )
}


def build_objective(name: str, cfg: ObjectiveConfig | None, num_classes: int) -> Objective:
    """OBJECTIVES[name](cfg or ObjectiveConfig(), num_classes), with a clear error for a bad name."""
    try:
        cls = OBJECTIVES[name]
    except KeyError:
        raise UserError(
            f"unknown objective {name!r}; valid: {', '.join(sorted(OBJECTIVES))}"
        ) from None
    return cls(cfg if cfg is not None else ObjectiveConfig(), num_classes)


__all__ = [
    "OBJECTIVES",
    "Objective",
    "ObjectiveConfig",
    "ObjectiveOutput",
    "build_objective",
    "predict_logits",
    "unwrap_model",
]

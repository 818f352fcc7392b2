"""The Objective interface, its typed config (release defaults) and the shared batch helpers.

An objective turns (model, batch) into a scalar loss and detached metrics; the trainer owns
everything else (optimiser, schedule, DDP, autocast, checkpoints). See `__init__.py` for the
contract the trainer relies on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from s4l.errors import UserError
from s4l.training.objectives.losses import (
    HESSIAN_PRODUCTS,
    KL_DIRECTIONS,
    flatten_copies,
    rotate_copies,
)

CLASS_ROTATIONS = ("all", "upright")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Every loss weight and switch of every objective; defaults = the original release.

    S4L_REFERENCE.md section 3 ("Losses"):
    - rotation_weight: w in S4L-Rotation's L = CE + w * mean(CE_rot_unl, CE_rot_lab) (1.0).
    - triplet_weight: w in S4L-Exemplar's L = CE + w * mean(T_unl, T_lab) (1.0).
    - embedding_dim: size of the exemplar `embedding` head (the release's 1000).
    - exemplar_grouping_bug: reproduce the release's swapped-argument identity labels
      (see `losses.exemplar_identities`); off = one source image is one identity.
    - vat_eps: absolute per-image L2 norm of r_adv in [-1, 1] pixel space (40 for VAT).
    - vat_xi: norm of the finite-difference probe d in the power iteration (1e-6).
    - vat_power_iterations: power-method iterations (1).
    - vat_hessian_product: "finite_difference" = the release's grad of the KL at ||d|| = xi
      (float32 cannot resolve xi = 1e-6, see vat.py); "forward_mode" = the exact xi -> 0
      Hessian-vector product by forward-mode AD (not in the release).
    - vat_weight / entmin_weight: VAT config's L = CE + 0.5 * KL_vat (+ 1.0 * H).
    - vat_kl_direction: "perturbed_clean" = the release's KL[p(x + r_adv) || p(x)];
      "clean_perturbed" = KL[p(x) || p(x + r_adv)] (Miyato et al.'s code, most PyTorch ports).
    - class_rotations: which rotated copies of a labelled image carry the class loss in
      S4L-Rotation and MOAM: "all" 4 (the release) or "upright" only (a diagnosis switch).
    - moam_*: MOAM step 1's L = 0.4 * L_rot + 0.3 * CE + 0.3 * KL_vat + 0.3 * H with eps 32
      (the release's rotation_vat.py with sup_weight 0.3, vat_weight 0.3, entmin_factor 0.3).
    """

    rotation_weight: float = 1.0
    triplet_weight: float = 1.0
    embedding_dim: int = 1000
    exemplar_grouping_bug: bool = False
    vat_eps: float = 40.0
    vat_xi: float = 1e-6
    vat_power_iterations: int = 1
    vat_weight: float = 0.5
    entmin_weight: float = 1.0
    vat_kl_direction: str = "perturbed_clean"
    vat_hessian_product: str = "finite_difference"
    moam_rotation_weight: float = 0.4
    moam_class_weight: float = 0.3
    moam_vat_weight: float = 0.3
    moam_entmin_weight: float = 0.3
    moam_vat_eps: float = 32.0
    class_rotations: str = "all"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("float", float):
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise UserError(f"objective.{f.name} must be a number, got {value!r}")
                object.__setattr__(self, f.name, float(value))
            elif f.type in ("int", int):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise UserError(f"objective.{f.name} must be an integer, got {value!r}")
            elif f.type in ("bool", bool):
                if not isinstance(value, bool):
                    raise UserError(f"objective.{f.name} must be true or false, got {value!r}")
        for name in ("vat_eps", "vat_xi", "moam_vat_eps"):
            if not getattr(self, name) > 0:
                raise UserError(f"objective.{name} must be > 0, got {getattr(self, name)}")
        for f in dataclasses.fields(self):
            if f.name.endswith("_weight") and getattr(self, f.name) < 0:
                raise UserError(f"objective.{f.name} must be >= 0, got {getattr(self, f.name)}")
        if self.embedding_dim < 1:
            raise UserError(f"objective.embedding_dim must be >= 1, got {self.embedding_dim}")
        if self.vat_power_iterations < 1:
            raise UserError(
                f"objective.vat_power_iterations must be >= 1, got {self.vat_power_iterations}"
            )
        if self.vat_kl_direction not in KL_DIRECTIONS:
            raise UserError(
                f"objective.vat_kl_direction {self.vat_kl_direction!r} is not one of "
                f"{', '.join(KL_DIRECTIONS)}"
            )
        if self.class_rotations not in CLASS_ROTATIONS:
            raise UserError(
                f"objective.class_rotations {self.class_rotations!r} is not one of "
                f"{', '.join(CLASS_ROTATIONS)}"
            )
        if self.vat_hessian_product not in HESSIAN_PRODUCTS:
            raise UserError(
                f"objective.vat_hessian_product {self.vat_hessian_product!r} is not one of "
                f"{', '.join(HESSIAN_PRODUCTS)}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ObjectiveConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown objective config keys {unknown}; valid: {sorted(known)}")
        return cls(**dict(d))


@dataclasses.dataclass
class ObjectiveOutput:
    """The scalar loss to back-propagate and detached 0-d metric tensors (no host sync)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The S4LModel inside any DistributedDataParallel / DataParallel / torch.compile wrappers.

    torch.compile's OptimizedModule is recognised by its `_orig_mod` (so torch._dynamo is not
    imported here); the VAT passes therefore run eagerly under a compiled model.
    """
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


class Objective:
    """One training objective; subclasses set the class attributes and implement `__call__`.

    Class attributes (read by the trainer and the data pipeline):
    - name: the key in `OBJECTIVES`.
    - copies: images per source image the data pipeline must produce (K in [B, K, 3, H, W]):
      1, or 8 for the exemplar family. Rotations are NOT copies: they are made on the device
      inside the objective.
    - device_rotations: rotated versions the objective makes of each image on the device (4 for
      the rotation family, else 1); with `copies`, what `forwarded_per_step` counts.
    - uses_labelled / uses_unlabelled: which streams the batch carries.
    - rotation_eval: the model has class and rotation heads; also report rotation-averaged
      accuracy (`predict_logits(..., rotation_average=True)`).
    - frozen_backbone: only the heads train (`linear`); see `prepare` and `train_mode`.
    - metric_names: exactly the keys of `ObjectiveOutput.metrics`.
    """

    name: ClassVar[str]
    copies: ClassVar[int] = 1
    device_rotations: ClassVar[int] = 1
    uses_labelled: ClassVar[bool] = True
    uses_unlabelled: ClassVar[bool] = False
    rotation_eval: ClassVar[bool] = False
    frozen_backbone: ClassVar[bool] = False
    metric_names: ClassVar[tuple[str, ...]]

    def __init__(self, cfg: ObjectiveConfig, num_classes: int) -> None:
        if not isinstance(cfg, ObjectiveConfig):
            raise TypeError(f"cfg must be an ObjectiveConfig, got {type(cfg).__name__}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise UserError(f"an objective needs num_classes >= 2, got {num_classes!r}")
        self.cfg = cfg
        self.num_classes = num_classes

    @classmethod
    def forwarded_per_step(cls, batch_size: int, unsup_batch_mult: int) -> tuple[int, int, int]:
        """(images through forward+backward per step, labelled batch, unlabelled batch) for a
        labelled batch of `batch_size`: only the streams the objective reads, each image counted
        once per data copy and per on-device rotation. A purely self-supervised objective reads one
        stream of `batch_size x unsup_batch_mult` images."""
        b_l = batch_size if cls.uses_labelled else 0
        b_u = batch_size * unsup_batch_mult if cls.uses_unlabelled or not cls.uses_labelled else 0
        return (b_l + b_u) * cls.copies * cls.device_rotations, b_l, b_u

    def heads(self) -> dict[str, int]:
        """Head name -> output size the model must have (ModelSpec.heads)."""
        raise NotImplementedError

    def prepare(self, model: nn.Module) -> None:
        """Called once on the unwrapped model, before the optimiser and any DDP wrapper."""

    def train_mode(self, model: nn.Module) -> None:
        """Put the model in training mode for this objective (call instead of model.train())."""
        model.train()

    def __call__(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> ObjectiveOutput:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, num_classes={self.num_classes})"

    # -- batch helpers shared by the subclasses ------------------------------------------------

    def _labelled(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(images [B*K, 3, H, W], labels repeated per copy [B*K], K) of the labelled stream."""
        images = _stream(batch, "labelled", self.name)
        labels = batch.get("labels")
        if labels is None:
            raise ValueError(f"objective {self.name!r} needs batch['labels']")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0] or labels.is_floating_point():
            raise ValueError(
                f"batch['labels'] must be integer class indices [B]={images.shape[0]}, got "
                f"{labels.dtype} {tuple(labels.shape)}"
            )
        k = images.shape[1]
        return flatten_copies(images), labels.repeat_interleave(k), k

    def _unlabelled(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(images [B*K, 3, H, W], K) of the unlabelled stream."""
        images = _stream(batch, "unlabelled", self.name)
        return flatten_copies(images), images.shape[1]


def _stream(batch: Mapping[str, torch.Tensor], key: str, objective: str) -> torch.Tensor:
    images = batch.get(key)
    if images is None:
        raise ValueError(f"objective {objective!r} needs batch[{key!r}]")
    if images.dim() != 5 or images.shape[2] != 3 or not images.is_floating_point():
        raise ValueError(
            f"batch[{key!r}] must be float images [B, K, 3, H, W], got {images.dtype} "
            f"{tuple(images.shape)}"
        )
    if images.shape[0] == 0:
        raise ValueError(f"batch[{key!r}] is empty")
    return images


def predict_logits(
    model: nn.Module, images: torch.Tensor, rotation_average: bool = False
) -> torch.Tensor:
    """Class logits for evaluation: on the images as given, or averaged over the 4 rotations.

    S4L_REFERENCE.md section 3 ("Preprocessing"): rotation-family models are evaluated
    "unrotated" (rotation-0 logits) and "rotation-averaged" (mean of the logits over the 4 rot90
    rotations, the release's `tf.reduce_mean(logits_class, axis=1)`). The 4 rotations go through
    ONE forward. Gradient mode and model.eval() are the caller's.
    """
    if images.dim() != 4:
        raise ValueError(f"expected images [N, 3, H, W], got shape {tuple(images.shape)}")
    if not rotation_average:
        return model(images, heads=("classes",))["classes"]
    rotated, _ = rotate_copies(images)
    logits = model(rotated, heads=("classes",))["classes"]
    return logits.reshape(images.shape[0], 4, logits.shape[-1]).mean(dim=1)

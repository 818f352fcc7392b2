"""Virtual Adversarial Training (VAT) and VAT + Entropy Minimisation, with the shared VAT machinery.

S4L_REFERENCE.md section 3 (the release's semi_supervised/vat.py and vat_utils.py):

- r ~ N(0, I); d = xi * r / ||r|| per image (xi = 1e-6); one power iteration: g = grad_d of
  KL(net(x + d), net(x)); r_adv = eps * g / ||g|| per image, eps an absolute L2 norm in [-1, 1]
  pixel space (40 for VAT, 32 for MOAM);
- loss = KL between the predictions at x + r_adv and at x, the clean prediction a constant;
  direction switch `vat_kl_direction`, default the release's KL[p(x + r_adv) || p(x)];
- the perturbed forwards use batch statistics but must NOT update BN running statistics (the
  release passes momentum/decay 1.0 to its BN); here `frozen_bn_statistics` turns off
  `track_running_stats` for the pass, so neither running_mean/var nor num_batches_tracked move;
- xi spread over all pixels is below bf16/fp16 resolution, so the power iteration (and the clean
  reference it differences against) runs in float32 with autocast disabled, whatever the caller's
  autocast; the final perturbed forward (eps-sized, no precision issue) keeps the caller's
  autocast;
- measured precision (tests/test_objectives.py, power-iteration tests): in float64 the finite
  difference at xi = 1e-6 and at 1e-9 give the same direction (it is the Hessian-vector
  product), and float32 at xi = 1e-3 matches it (cosine > 0.95); float32 at the release's
  xi = 1e-6 does NOT (per-image cosines around +-0.5 on the tiny test network): d's per-pixel
  size (xi / sqrt(3HW): 2e-8 at 32 px, 3e-9 at 224 px) is below float32's spacing for pixel
  values of magnitude 0.25-1 (3e-8 to 1.2e-7), so x + d rounds most of d away and the logit
  change is at rounding level. That direction is still a combination of the
  network's input gradients and raises the KL far more than a random one, which is presumably
  why the release works. `vat_hessian_product="forward_mode"` computes the exact xi -> 0
  direction instead (forward-mode AD, correct in float32); the default stays the release's
  finite difference at xi = 1e-6;
- VAT config: L = CE(labelled) + 0.5 * KL_vat (+ 1.0 * H for VAT+EntMin), VAT and the entropy H
  on the labelled AND unlabelled images (the release's apply_vat_to_labeled), all from one clean
  forward over [labelled; unlabelled].

Perturbed passes run on the unwrapped module (DDP's `.module`): see the package docstring.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import ClassVar

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from s4l.training.objectives.base import Objective, ObjectiveOutput, unwrap_model
from s4l.training.objectives.losses import (
    HESSIAN_PRODUCTS,
    accuracy,
    cross_entropy,
    entropy,
    vat_kl,
)


@contextlib.contextmanager
def frozen_bn_statistics(module: nn.Module) -> Iterator[None]:
    """Within the block, BatchNorm layers in training mode normalise with batch statistics but
    update neither running_mean/running_var nor num_batches_tracked (eval-mode layers still use
    their running statistics). Restores the layers' `track_running_stats` on exit."""
    layers = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


def normalize_per_example(v: torch.Tensor) -> torch.Tensor:
    """v / ||v|| per example over all non-batch dimensions (zero stays zero).

    Divides by the per-example max-abs first (as Miyato et al.'s `get_normalized_vector`) so a
    gradient of order xi does not underflow the squared norm; the release's
    `l2_normalize(epsilon=1e-12)` instead clamps sum(v^2) at 1e-12, which silently shrinks tiny
    vectors.
    """
    flat = v.flatten(1)
    flat = flat / flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return flat.reshape(v.shape)


def virtual_adversarial_direction(
    forward: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    reference_logits: torch.Tensor | None,
    *,
    xi: float,
    iterations: int = 1,
    direction: str = "perturbed_clean",
    noise: torch.Tensor | None = None,
    method: str = "finite_difference",
) -> torch.Tensor:
    """Unit-norm (per image) approximation of the top eigenvector of the KL's Hessian at x.

    The power method, in float32 (float64 if given float64) with autocast off, starting from
    `noise` (default r ~ N(0, I) from torch's global RNG). `forward` maps images to class logits
    (it should leave BN statistics alone: see `frozen_bn_statistics`). The Hessian-vector
    product H d comes from
    - method "finite_difference" (the release's vat_utils.py): grad_d KL(forward(x + d),
      reference) at ||d|| = xi. `reference_logits` must equal forward(images) in float32; None
      computes it here (needed when the caller's clean logits came from bf16 autocast or from a
      different batch composition, where their difference to the perturbed pass would swamp the
      xi-sized signal);
    - method "forward_mode": the exact xi -> 0 limit, J^T F J d with J the Jacobian of the logits
      w.r.t. the images (J d by forward-mode AD, J^T by one backward) and F = diag(p) - p p^T
      the Hessian of either KL direction at p = softmax(forward(x)). No xi, no reference, no
      rounding problem in float32.
    """
    if method not in HESSIAN_PRODUCTS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(HESSIAN_PRODUCTS)}")
    with torch.autocast(device_type=images.device.type, enabled=False), torch.enable_grad():
        x = images.detach()
        x = x if x.dtype == torch.float64 else x.float()
        d = torch.randn_like(x) if noise is None else noise.detach().to(x.dtype)
        if method == "forward_mode":
            for _ in range(iterations):
                d = _fisher_vector_product(forward, x, normalize_per_example(d))
            return normalize_per_example(d)
        if reference_logits is None:
            with torch.no_grad():
                reference_logits = forward(x)
        reference = reference_logits.detach().to(x.dtype)
        for _ in range(iterations):
            d = (xi * normalize_per_example(d)).requires_grad_(True)
            divergence = vat_kl(forward(x + d), reference, direction)
            (d,) = torch.autograd.grad(divergence, d)
        return normalize_per_example(d.detach())


def _fisher_vector_product(
    forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, d: torch.Tensor
) -> torch.Tensor:
    """J^T F J d at x (see `virtual_adversarial_direction`, method "forward_mode")."""
    x = x.detach().requires_grad_(True)
    with fwAD.dual_level():
        logits, jd = fwAD.unpack_dual(forward(fwAD.make_dual(x, d)))
    p = torch.softmax(logits.detach(), dim=-1)
    fjd = p * jd - p * (p * jd).sum(dim=-1, keepdim=True)
    (g,) = torch.autograd.grad(logits, x, grad_outputs=fjd.detach())
    return g.detach()


def vat_loss(
    model: nn.Module,
    images: torch.Tensor,
    clean_logits: torch.Tensor,
    *,
    eps: float,
    xi: float,
    iterations: int,
    direction: str,
    reference_is_clean: bool,
    method: str = "finite_difference",
) -> torch.Tensor:
    """KL_vat of `images` against their (detached) clean class logits; see the module docstring.

    reference_is_clean: `clean_logits` are exactly the float32 forward of `images` alone (same
    batch composition, no autocast), so the power iteration may difference against them instead
    of running one more clean forward.
    """
    module = unwrap_model(model)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return module(x, heads=("classes",))["classes"]

    can_reuse = (
        reference_is_clean
        and clean_logits.dtype == torch.float32
        and not torch.is_autocast_enabled(images.device.type)
    )
    with frozen_bn_statistics(module):
        direction_unit = virtual_adversarial_direction(
            forward,
            images,
            clean_logits if can_reuse else None,
            xi=xi,
            iterations=iterations,
            direction=direction,
            method=method,
        )
        r_adv = eps * direction_unit.to(images.dtype)
        perturbed_logits = forward(images.detach() + r_adv)
    return vat_kl(perturbed_logits, clean_logits.detach(), direction)


class VATObjective(Objective):
    """VAT: L = CE(labelled) + vat_weight * KL_vat(labelled + unlabelled).

    Metrics: loss, loss_class, loss_vat, entropy (reported, not in the loss), acc_class.
    """

    name: ClassVar[str] = "vat"
    uses_labelled: ClassVar[bool] = True
    uses_unlabelled: ClassVar[bool] = True
    metric_names: ClassVar[tuple[str, ...]] = (
        "loss",
        "loss_class",
        "loss_vat",
        "entropy",
        "acc_class",
    )
    entmin: ClassVar[bool] = False

    def heads(self) -> dict[str, int]:
        return {"classes": self.num_classes}

    def __call__(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> ObjectiveOutput:
        images_l, labels, _ = self._labelled(batch)
        images_u, _ = self._unlabelled(batch)
        n = images_l.shape[0]
        images = torch.cat([images_l, images_u])
        logits = model(images, heads=("classes",))["classes"]
        loss_class = cross_entropy(logits[:n], labels)
        ent = entropy(logits)
        cfg = self.cfg
        loss_vat = vat_loss(
            model,
            images,
            logits,
            eps=cfg.vat_eps,
            xi=cfg.vat_xi,
            iterations=cfg.vat_power_iterations,
            direction=cfg.vat_kl_direction,
            reference_is_clean=True,
            method=cfg.vat_hessian_product,
        )
        loss = loss_class + cfg.vat_weight * loss_vat
        if self.entmin:
            loss = loss + cfg.entmin_weight * ent
        return ObjectiveOutput(
            loss=loss,
            metrics={
                "loss": loss.detach(),
                "loss_class": loss_class.detach(),
                "loss_vat": loss_vat.detach(),
                "entropy": ent.detach(),
                "acc_class": accuracy(logits[:n], labels),
            },
        )


class VATEntMinObjective(VATObjective):
    """VAT + EntMin: L = CE + vat_weight * KL_vat + entmin_weight * H (labelled + unlabelled).

    Metrics: loss, loss_class, loss_vat, entropy, acc_class.
    """

    name: ClassVar[str] = "vat-entmin"
    entmin: ClassVar[bool] = True

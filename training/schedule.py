"""The release's learning-rate schedule: linear warmup from 0, then x0.1 at each boundary.

S4L_REFERENCE.md section 3 ("Hyper-parameters"): every preset warms the learning rate up
linearly from 0 over `warmup_epochs`, then multiplies it by 0.1 at each of the decay epochs
(e.g. 140, 160, 180 of 200). Epochs count passes over the LABELLED subset, so the trainer
converts them to steps with steps_per_epoch = n_labelled // batch_size (the release's
`steps_per_epoch`). The schedule is a pure function of the global step, so resuming at step s
continues it exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StepSchedule:
    """Warmup + piecewise-constant decay, expressed in optimiser steps."""

    base_lr: float
    warmup_steps: int
    boundaries: tuple[int, ...]
    total_steps: int
    factor: float = 0.1

    @classmethod
    def from_epochs(
        cls,
        base_lr: float,
        steps_per_epoch: int,
        warmup_epochs: float,
        decay_epochs: Sequence[float],
        total_epochs: float,
        factor: float = 0.1,
    ) -> StepSchedule:
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        if sorted(decay_epochs) != list(decay_epochs):
            raise ValueError(f"decay epochs must be increasing, got {list(decay_epochs)}")
        return cls(
            base_lr=float(base_lr),
            warmup_steps=int(round(warmup_epochs * steps_per_epoch)),
            boundaries=tuple(int(round(e * steps_per_epoch)) for e in decay_epochs),
            total_steps=max(1, int(round(total_epochs * steps_per_epoch))),
            factor=factor,
        )

    def lr_at(self, step: int) -> float:
        """Learning rate used for the update that takes the model from `step` to `step + 1`.

        The release computes lr * global_step / warmup_steps during warmup (so the very first
        update uses lr 0) and lr * 0.1 ** (number of boundaries passed) afterwards.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return self.base_lr * step / self.warmup_steps
        passed = sum(1 for b in self.boundaries if step >= b)
        return self.base_lr * self.factor**passed


def set_lr(optimizer, lr: float) -> None:
    """Write `lr` into every parameter group (groups differ only in weight decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr

"""Polyak averaging (exponential moving average) of the trainable weights.

S4L_REFERENCE.md section 3: MOAM keeps an EMA of the trainable weights with decay
0.5 ** (1 / steps_per_epoch), i.e. a half-life of one epoch, and evaluates and exports with the
averaged weights. The release averages trainable variables only (tf.train.ExponentialMovingAverage
over `tf.trainable_variables()`); BatchNorm running statistics are not trainable, so the EMA
model takes them as they are from the live model whenever the averaged weights are used.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay(half_life_epochs: float, steps_per_epoch: int) -> float:
    """decay = 0.5 ** (1 / (half_life_epochs * steps_per_epoch)): weights halve per half-life."""
    if half_life_epochs <= 0:
        raise ValueError(f"EMA half-life must be > 0 epochs, got {half_life_epochs}")
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    return 0.5 ** (1.0 / (half_life_epochs * steps_per_epoch))


class EMA:
    """An averaged copy of a model: `update(model)` after every optimiser step.

    The averaged copy is a full module (`self.module`) so it can be evaluated, checkpointed
    (`state_dict`) and exported like the live model. Parameters are averaged in fp32;
    buffers (BN running statistics, counters) are copied from the live model on `update`.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_params = dict(self.module.named_parameters())
        params = [(ema_params[n], p) for n, p in model.named_parameters() if p.requires_grad]
        if params:
            ema_t = [e for e, _ in params]
            live_t = [p.detach().to(e.dtype) for e, p in params]
            # ema = decay * ema + (1 - decay) * live, fused over all tensors.
            torch._foreach_lerp_(ema_t, live_t, 1.0 - self.decay)
        ema_buffers = dict(self.module.named_buffers())
        for n, b in model.named_buffers():
            ema_buffers[n].copy_(b)
        # Frozen parameters (e.g. a linear-probe backbone) are not averaged; keep them equal.
        for n, p in model.named_parameters():
            if not p.requires_grad:
                ema_params[n].copy_(p)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state, strict=True)

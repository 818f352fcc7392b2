"""The resume checkpoint of a training run, written (rank 0, atomically) with everything needed
to continue exactly: model, EMA, optimizer, step, every process's RNG, the data position, the
config and provenance (docs/contracts.md, "Checkpoint")."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from s4l.errors import UserError
from s4l.imaging import PreprocessSpec
from s4l.training import checkpoint as ckpt_io
from s4l.training import config as C
from s4l.training import distributed as D
from s4l.training.ema import EMA
from s4l.training.model import ModelSpec
from s4l.training.objectives import unwrap_model

if TYPE_CHECKING:
    from s4l.training.trainer import Plan

log = logging.getLogger("s4l.training.trainer")


class CheckpointSaver:
    """Writes the resume checkpoint (rank 0) with everything needed to continue exactly."""

    def __init__(self, workdir: Path, cfg: C.TrainConfig, spec: ModelSpec,
                 class_names: list[str], preprocess: PreprocessSpec, env: D.DistEnv,
                 init_info: dict | None) -> None:
        self.path = workdir / ckpt_io.RESUME_NAME
        self.cfg, self.spec, self.class_names = cfg, spec, class_names
        self.preprocess, self.env, self.init_info = preprocess, env, init_info
        self.last_saved: int | None = None  # the step of the checkpoint on disk, if any

    def saved_at(self, step: int) -> bool:
        return self.last_saved == step

    def save(self, step: int, plan: Plan, model: nn.Module, ema: EMA | None,
             optimizer: torch.optim.Optimizer, stream) -> None:
        env = self.env
        # Every process's RNG state: VAT noise and dropout-free augmentation draw from them.
        rng = ckpt_io.rng_state()
        rngs = [rng]
        if env.enabled:
            import torch.distributed as dist

            rngs = [None] * env.world_size
            dist.all_gather_object(rngs, rng)
        if env.is_main:
            prov = ckpt_io.provenance()
            prov["world_size"] = env.world_size
            if self.init_info:
                prov["init"] = self.init_info
            payload = {
                "model_spec": self.spec.to_dict(),
                "model": plain_state(model),
                "ema": plain_state(ema.module) if ema is not None else None,
                "config": C.to_dict(self.cfg),
                "config_hash": C.config_hash(self.cfg),
                "class_names": self.class_names,
                "preprocess": self.preprocess.to_dict(),
                "step": step,
                "epoch": step / plan.steps_per_epoch,
                "optimizer": optimizer.state_dict(),
                "rng": rngs,
                "data_state": stream.state_dict(),
                "provenance": prov,
            }
            try:
                ckpt_io.save_checkpoint(self.path, payload)
            except OSError as e:
                prev = (f"the previous checkpoint {self.path} (step {self.last_saved}) is intact"
                        if self.last_saved is not None else "no earlier checkpoint exists")
                raise UserError(f"could not write the checkpoint at step {step} ({e}); {prev}. "
                                "Free disk space and rerun the same command to resume.") from e
            log.debug("checkpoint at step %d -> %s", step, self.path)
        D.barrier(env)
        self.last_saved = step


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict of the underlying S4LModel on CPU, with the plain (un-wrapped) key names."""
    m = unwrap_model(model)
    m = getattr(m, "_orig_mod", m)
    return {k: v.detach().to("cpu", copy=True) for k, v in m.state_dict().items()}

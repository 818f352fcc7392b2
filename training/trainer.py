"""The trainer: `train(config, workdir) -> final metrics`, one readable function, top to bottom.

What it implements (S4L_REFERENCE.md section 3, the original release's training loop):
- SGD momentum 0.9 (not Nesterov), coupled L2 weight decay on conv and head KERNELS only;
  learning rate warmed up linearly from 0, then x0.1 at each boundary (`schedule.py`);
  epochs count passes over the LABELLED subset (steps_per_epoch = n_labelled // batch_size;
  over all images for the purely self-supervised objectives, which have no labelled subset).
- One step = a labelled batch + an unlabelled batch through the objective (ONE forward, joint
  BN statistics). The per-device BN batch (`bn.ghost_batch`) splits the global batch into
  shards, each with its own BN statistics and loss, whose gradients are averaged: the release's
  per-TPU-core losses with a cross-shard gradient mean. The shard layout is a function of the
  GLOBAL batch, so 1 or N processes compute the same update (S4L_REFERENCE.md section 5).
- Polyak averaging (EMA with a half-life in epochs), used for evaluation and export.
- bf16 autocast, channels_last, optional torch.compile; DDP via torchrun, SyncBN.
- Evaluation: top-1/top-5 on the eval split and the tiny held-out validation split;
  rotation models also report rotation-averaged accuracy. metrics.jsonl + TensorBoard.
- Checkpoints every `checkpoint.every_epochs` (atomic; model, EMA, optimizer, step, RNG states,
  data position, config + hash, provenance); resume from the workdir is automatic and exact,
  refused for a different config, never silently fresh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from s4l.errors import UserError
from s4l.imaging import PreprocessSpec
from s4l.io import atomic_write_json
from s4l.training import checkpoint as ckpt_io
from s4l.training import ckpt_request
from s4l.training import config as C
from s4l.training import distributed as D
from s4l.training.ema import EMA, ema_decay
from s4l.training.metrics import METRICS_FILE, MetricsWriter, read_metrics, truncate_metrics
from s4l.training.model import ModelSpec, S4LModel, build_model
from s4l.training.objectives import Objective, build_objective, predict_logits, unwrap_model
from s4l.training.run_data import RunData, ShardStream
from s4l.training.saver import CheckpointSaver
from s4l.training.schedule import StepSchedule, set_lr

log = logging.getLogger(__name__)

# Public names of the modules the trainer was split into, importable from here too.
__all__ = ["METRICS_FILE", "CheckpointSaver", "MetricsWriter", "Plan", "RunData", "ShardStream",
           "TrainingDiverged", "build_optimizer", "evaluate", "make_plan", "read_metrics",
           "precision_autocast", "train", "train_step", "truncate_metrics"]

CONFIG_FILE = "config.json"
_ASKED = "_checkpoint_requested"  # the request's slot in the logging all-reduce
FINAL_FILE = "final_metrics.json"


class TrainingDiverged(UserError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """Step arithmetic derived from the config and the data (pure, testable)."""

    steps_per_epoch: int
    total_steps: int
    shards_per_process: int
    labelled_per_shard: int
    unlabelled_per_shard: int
    checkpoint_every: int
    eval_every: int


def make_plan(cfg: C.TrainConfig, objective: Objective, n_labelled: int, n_unlabelled: int,
              world_size: int) -> Plan:
    """Steps per epoch, total steps and the per-process shard layout, with clear errors."""
    o = cfg.optim
    b_l = o.batch_size if objective.uses_labelled else 0
    b_u = o.batch_size * o.unsup_batch_mult if objective.uses_unlabelled else 0
    if objective.uses_unlabelled and b_u == 0:
        raise UserError(f"objective {objective.name!r} needs unlabelled images: "
                        "optim.unsup_batch_mult must be >= 1")
    if objective.uses_labelled and b_l > n_labelled:
        raise UserError(
            f"the labelled batch ({b_l}, optim.batch_size) is larger than the labelled set "
            f"({n_labelled} images): lower optim.batch_size or label more images")
    if objective.uses_unlabelled and b_u > n_unlabelled:
        raise UserError(
            f"the unlabelled batch ({b_u} = optim.batch_size x optim.unsup_batch_mult) is larger "
            f"than the training set ({n_unlabelled} images): lower optim.batch_size")
    if objective.uses_labelled:
        steps_per_epoch = n_labelled // o.batch_size
    else:
        steps_per_epoch = n_unlabelled // b_u
    shards = o.batch_size // cfg.bn.ghost_batch if cfg.bn.ghost_batch else world_size
    if shards % world_size:
        raise UserError(
            f"{shards} BN shards (optim.batch_size {o.batch_size} / bn.ghost_batch "
            f"{cfg.bn.ghost_batch}) cannot be split evenly over {world_size} processes")
    if o.batch_size % shards or (b_u and b_u % shards):
        raise UserError(
            f"the batch ({o.batch_size} labelled, {b_u} unlabelled) does not split into "
            f"{shards} equal shards (one per process, or per bn.ghost_batch)")
    total = int(round(o.total_epochs * steps_per_epoch))
    if o.total_steps is not None:
        total = min(total, o.total_steps) if total > 0 else o.total_steps
    total = max(1, total)
    every = cfg.checkpoint.every_steps or max(1, round(cfg.checkpoint.every_epochs * steps_per_epoch))
    return Plan(
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        shards_per_process=shards // world_size,
        labelled_per_shard=b_l // shards,
        unlabelled_per_shard=b_u // shards,
        checkpoint_every=every,
        eval_every=max(1, round(cfg.eval.every_epochs * steps_per_epoch)),
    )


# ============================================================================ the entry point


def train(config: C.TrainConfig, workdir: str | os.PathLike, *, device: str | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Train (or resume) the run described by `config` in `workdir`; return final metrics.

    The workdir holds config.json, checkpoint.pt (the resume point and the final model),
    metrics.jsonl, final_metrics.json and tb/ (TensorBoard). Running the same command again
    resumes exactly where the last checkpoint left off; a finished run only re-evaluates.
    """
    # ---------------------------------------------------------------- setup
    env = D.setup(device)
    workdir = Path(workdir)
    finished = False
    try:
        result = _train(config, workdir, env, progress)
        finished = True
        return result
    finally:
        D.teardown(env, finished=finished)


def _train(cfg: C.TrainConfig, workdir: Path, env: D.DistEnv, progress: bool) -> dict[str, Any]:
    if not cfg.data.root:
        raise UserError("no data: give --data ROOT (an image folder, or builtin:digits)")
    if env.is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        _claim_workdir(cfg, workdir)
    D.barrier(env)
    torch.manual_seed(cfg.seed)
    _seed_everything(cfg.seed)
    dev = env.device
    if dev.type == "cpu" and cfg.precision == "bf16":
        log.info("bf16 autocast on CPU")

    # ---------------------------------------------------------------- data (sources)
    data = RunData(cfg, env)
    class_names = data.class_names

    # ---------------------------------------------------------------- model + objective
    objective = build_objective(cfg.objective.name, cfg.objective.objective_config(),
                                len(class_names))
    spec = ModelSpec(width=cfg.model.width, stem=cfg.model.stem, bn_eps=cfg.model.bn_eps,
                     bn_momentum=cfg.model.bn_momentum, heads=objective.heads())
    model = build_model(spec)
    init_info = _init_from_checkpoint(model, cfg.init) if cfg.init.checkpoint else None
    objective.prepare(model)
    if cfg.bn.sync:
        model = D.convert_sync_batchnorm(model, dev)
    model.to(dev)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    D.broadcast_module(model, env)

    plan = make_plan(cfg, objective, data.n_labelled, data.n_unlabelled, env.world_size)
    log.info("%s: %d labelled / %d training images, %d classes; %d steps/epoch, %d steps; "
             "%d BN shard(s) per process of %d labelled + %d unlabelled", cfg.preset,
             data.n_labelled, data.n_unlabelled, len(class_names), plan.steps_per_epoch,
             plan.total_steps, plan.shards_per_process, plan.labelled_per_shard,
             plan.unlabelled_per_shard)

    # ---------------------------------------------------------------- optimiser, schedule, EMA
    optimizer = build_optimizer(model, cfg.optim)
    schedule = StepSchedule.from_epochs(cfg.optim.lr, plan.steps_per_epoch,
                                        cfg.optim.warmup_epochs, cfg.optim.decay_epochs,
                                        cfg.optim.total_epochs)
    ema = None
    if cfg.ema.half_life_epochs is not None:
        ema = EMA(model, ema_decay(cfg.ema.half_life_epochs, plan.steps_per_epoch))

    # ---------------------------------------------------------------- resume
    step = 0
    resume_path = ckpt_io.find_resume(workdir)
    if resume_path is not None:
        state = ckpt_io.load_for_resume(resume_path, C.to_dict(cfg), C.config_hash(cfg), C.diff)
        ckpt_io.load_state_strict(model, state["model"], f"{resume_path} (model)")
        if ema is not None:
            if state.get("ema") is None:
                raise UserError(f"{resume_path} has no EMA state but the config enables EMA")
            ckpt_io.load_state_strict(ema.module, state["ema"], f"{resume_path} (ema)")
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        init_info = state.get("provenance", {}).get("init") or init_info
        log.info("resumed from %s at step %d", resume_path, step)
        if env.is_main:
            truncate_metrics(workdir / METRICS_FILE, step)

    train_model: nn.Module = model
    if env.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)

    writer = MetricsWriter(workdir, env.is_main, purge_step=step if resume_path else None)
    preprocess = PreprocessSpec(resize=cfg.data.eval_resize, crop=cfg.data.image_size,
                                interpolation="area")
    saver = CheckpointSaver(workdir, cfg, spec, class_names, preprocess, env, init_info)
    saver.last_saved = step if resume_path is not None else None

    # ---------------------------------------------------------------- loop
    if env.is_main:
        C.save_json(cfg, workdir / CONFIG_FILE)  # setup succeeded: this workdir is this run's
    stream = data.stream(objective, plan, env)
    if resume_path is not None:
        stream.load_state_dict(state["data_state"])
    if resume_path is not None:
        # Last thing before the loop: setting up loaders/writers may draw from the RNGs.
        rng = state["rng"]
        if not isinstance(rng, list) or len(rng) != env.world_size:
            raise UserError(
                f"{resume_path} was written by {len(rng) if isinstance(rng, list) else 1} "
                f"process(es), this run has {env.world_size}: exact resume needs the same "
                "number of processes (each has its own RNG stream)")
        ckpt_io.set_rng_state(rng[env.rank])
    autocast = precision_autocast(cfg.precision, dev)
    bad_step = torch.full((), -1, dtype=torch.long, device=dev)
    sums: dict[str, torch.Tensor] = {}
    n_sums = 0
    t_last, img_last = time.perf_counter(), 0
    # Every image through forward + backward: data copies (exemplar) AND on-device rotations
    # (the rotation family), as Objective.forwarded_per_step counts them.
    images_per_step = (plan.labelled_per_shard + plan.unlabelled_per_shard) * \
        plan.shards_per_process * env.world_size * objective.copies * objective.device_rotations
    bar = _progress(progress and env.is_main, plan.total_steps, step, cfg.preset)
    on_request = contextlib.ExitStack()  # SIGUSR1: checkpoint at the next logging boundary
    on_request.enter_context(ckpt_request.handling())
    try:
        while step < plan.total_steps:
            lr = schedule.lr_at(step)
            set_lr(optimizer, lr)
            objective.train_mode(model)
            shards = next(stream)
            metrics = train_step(train_model, objective, optimizer, shards, dev, autocast,
                                  cfg.optim.grad_clip, env)
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(metrics["loss"]),
                                   torch.full_like(bad_step, step), bad_step)
            if ema is not None:
                ema.update(model)
            for k, v in metrics.items():
                sums[k] = sums[k] + v if k in sums else v.clone()
            n_sums += 1
            step += 1
            img_last += images_per_step
            if bar is not None:
                bar.update(1)

            boundary_ckpt = step % plan.checkpoint_every == 0 or step == plan.total_steps
            boundary_log = step % cfg.log_every_steps == 0 or step == plan.total_steps
            if boundary_log or boundary_ckpt:
                _check_finite(bad_step, env, saver)
            if boundary_log:
                # A checkpoint request rides the metrics' all-reduce: every rank saves together.
                asked = torch.tensor(float(ckpt_request.requested()), device=dev)
                avg = D.all_reduce_mean({**{k: v / n_sums for k, v in sums.items()},
                                         _ASKED: asked}, env)
                if float(avg.pop(_ASKED)) > 0:
                    ckpt_request.clear()
                    log.info("checkpoint requested (SIGUSR1): saving at step %d", step)
                    boundary_ckpt = True
                now = time.perf_counter()
                rec = {k: float(v) for k, v in avg.items()}
                rec.update(step=step, epoch=step / plan.steps_per_epoch, lr=lr,
                           images_per_step=images_per_step,
                           images_per_s=img_last / max(now - t_last, 1e-9))
                writer.write("train", rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.4g}",
                                    img_s=f"{rec['images_per_s']:.0f}")
                sums, n_sums, t_last, img_last = {}, 0, now, 0
            if step % plan.eval_every == 0 and step < plan.total_steps:
                res = evaluate(_eval_model(model, ema, env), objective, data, cfg, env,
                               splits=None if cfg.eval.intermediate == "all" else ("heldout",))
                writer.write("eval", {"step": step, "epoch": step / plan.steps_per_epoch, **res})
                log.info("step %d eval: %s", step, _fmt(res))
            if boundary_ckpt:
                saver.save(step, plan, model, ema, optimizer, stream)
    finally:
        on_request.close()
        if bar is not None:
            bar.close()

    # ---------------------------------------------------------------- final eval
    if step == 0 or not saver.saved_at(step):
        saver.save(step, plan, model, ema, optimizer, stream)
    final = evaluate(_eval_model(model, ema, env), objective, data, cfg, env)
    final.update(step=step, epoch=step / plan.steps_per_epoch,
                 checkpoint=str(workdir / ckpt_io.RESUME_NAME), config_hash=C.config_hash(cfg),
                 preset=cfg.preset, used_ema=ema is not None)
    writer.write("final", final)
    writer.close()
    if env.is_main:
        _write_json(workdir / FINAL_FILE, final)
    log.info("finished %s at step %d: %s", cfg.preset, step, _fmt(final))
    return final


# ============================================================================ pieces of a step


def train_step(model: nn.Module, objective: Objective, optimizer: torch.optim.Optimizer,
                shards: list[dict[str, torch.Tensor]], dev: torch.device, autocast,
                grad_clip: float | None, env: D.DistEnv) -> dict[str, torch.Tensor]:
    """One optimiser step over this process's BN shards: mean of shard losses, one update."""
    optimizer.zero_grad(set_to_none=True)
    n = len(shards)
    total: dict[str, torch.Tensor] = {}
    for i, shard in enumerate(shards):
        batch = {k: v.to(dev, non_blocking=True) for k, v in shard.items()}
        last = i == n - 1
        sync = contextlib.nullcontext() if (last or not hasattr(model, "no_sync")) \
            else model.no_sync()
        with sync:
            with autocast:
                out = objective(model, batch)
            (out.loss / n).backward()
        for k, v in out.metrics.items():
            v = v.detach().float()
            total[k] = total[k] + v / n if k in total else v / n
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(
            [p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    optimizer.step()
    return total


def build_optimizer(model: nn.Module, o: C.OptimConfig) -> torch.optim.SGD:
    """SGD(momentum, not Nesterov) with coupled L2 on conv and linear KERNELS only.

    The release adds weight_decay * sum(||W||^2)/2 over kernels to the loss (not BN gamma/beta,
    not biases), which is PyTorch's coupled `weight_decay` on that parameter group.
    Frozen parameters (linear evaluation) are left out of the optimiser.
    """
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_kernel = name == "weight" and isinstance(module, nn.Conv2d | nn.Linear)
            (decay if is_kernel else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay, "name": "kernels"},
              {"params": no_decay, "weight_decay": 0.0, "name": "bn_and_biases"}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise UserError("the model has no trainable parameters")
    return torch.optim.SGD(groups, lr=0.0, momentum=o.momentum, nesterov=o.nesterov)


def precision_autocast(precision: str, dev: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _check_finite(bad_step: torch.Tensor, env: D.DistEnv, saver: CheckpointSaver) -> None:
    flag = bad_step.clone().reshape(1)
    if env.enabled:
        import torch.distributed as dist

        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    s = int(flag.item())
    if s >= 0:
        last = saver.last_saved
        where = (f"the last good checkpoint is {saver.path} (step {last})" if last is not None
                 else "no checkpoint was written before it")
        raise TrainingDiverged(
            f"the loss became NaN/inf at step {s}; training stopped, {where}. Lower optim.lr "
            "(or set optim.grad_clip) and start a new workdir, or fix the data.")


# ============================================================================ evaluation


@torch.no_grad()
def evaluate(model: nn.Module, objective: Objective, data, cfg: C.TrainConfig,
             env: D.DistEnv, splits: Sequence[str] | None = None) -> dict[str, float]:
    """Top-1/top-5 on the eval split and the tiny validation split (unrotated and, for
    rotation models, rotation-averaged: S4L_REFERENCE.md section 3 "Preprocessing");
    `splits` limits it to those of the two named ("eval", "heldout")."""
    if "classes" not in unwrap_model(model).heads:
        return {}  # purely self-supervised: no class head to evaluate
    # Eval loaders draw worker seeds from torch's RNG: keep that out of the training stream.
    devices = [env.device] if env.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        return _evaluate(model, objective, data, cfg, env, splits)


def _evaluate(model: nn.Module, objective: Objective, data, cfg: C.TrainConfig,
              env: D.DistEnv, splits: Sequence[str] | None = None) -> dict[str, float]:
    was_training = model.training
    model.eval()
    autocast = precision_autocast(cfg.precision, env.device)
    out: dict[str, float] = {}
    modes = [("", False)]
    if objective.rotation_eval and cfg.eval.rotation_average:
        modes.append(("_rotation_averaged", True))
    for split, loader in data.eval_loaders().items():
        if splits is not None and split not in splits:
            continue
        k = min(5, len(data.class_names))
        counts = torch.zeros(1 + 2 * len(modes), dtype=torch.float64, device=env.device)
        for images, labels in loader:
            images = images.flatten(0, 1).to(env.device, non_blocking=True)  # [b, 1, ...] -> [b, ...]
            labels = labels.to(env.device, non_blocking=True)
            counts[0] += labels.numel()
            for j, (_, rot) in enumerate(modes):
                with autocast:
                    logits = predict_logits(model, images, rotation_average=rot).float()
                topk = logits.topk(k, dim=1).indices
                hit = topk == labels[:, None]
                counts[1 + 2 * j] += hit[:, 0].sum()
                counts[2 + 2 * j] += hit.any(dim=1).sum()
        D.all_reduce_sum(counts, env)
        n = max(float(counts[0]), 1.0)
        out[f"{split}/n"] = float(counts[0])
        for j, (suffix, _) in enumerate(modes):
            out[f"{split}/top1{suffix}"] = 100.0 * float(counts[1 + 2 * j]) / n
            out[f"{split}/top{k}{suffix}" if k != 5 else f"{split}/top5{suffix}"] = \
                100.0 * float(counts[2 + 2 * j]) / n
    model.train(was_training)
    return out


def _eval_model(model: nn.Module, ema: EMA | None, env: D.DistEnv) -> nn.Module:
    """The weights to evaluate: the EMA copy when on (its BN statistics are the live model's,
    copied by EMA.update), with rank 0's BN statistics on every process."""
    D.broadcast_buffers(model, env)
    if ema is None:
        return model
    D.broadcast_buffers(ema.module, env)
    return ema.module


# ============================================================================ init, workdir


def _init_from_checkpoint(model: S4LModel, init: C.InitConfig) -> dict[str, Any]:
    """Load a pretrained backbone (EMA weights when present); keep or re-init the heads."""
    path = Path(init.checkpoint)
    src = ckpt_io.read_checkpoint(path)
    weights = src.get("ema") or src["model"]
    backbone = {k[len("backbone."):]: v for k, v in weights.items() if k.startswith("backbone.")}
    if not backbone:
        raise UserError(f"{path} holds no backbone weights")
    try:
        ckpt_io.load_state_strict(model.backbone, backbone, f"init.checkpoint {path} (backbone)")
    except UserError as e:
        raise UserError(f"{e}. The pretrained model_spec is {src.get('model_spec')}; set "
                        "model.width / model.stem to match it") from None
    kept = []
    if not init.reset_heads:
        for name, head in model.heads.items():
            w, b = weights.get(f"heads.{name}.weight"), weights.get(f"heads.{name}.bias")
            if w is not None and b is not None and w.shape == head.weight.shape:
                head.load_state_dict({"weight": w, "bias": b})
                kept.append(name)
    info = {"checkpoint": str(path.resolve()), "sha256": ckpt_io.file_sha256(path),
            "used_ema": src.get("ema") is not None, "heads_kept": kept,
            "config_hash": src.get("config_hash")}
    log.info("initialised backbone from %s (sha256 %s)%s", path, info["sha256"][:12],
             f", kept heads {kept}" if kept else "")
    return info


def _claim_workdir(cfg: C.TrainConfig, workdir: Path) -> None:
    """Refuse a workdir that holds another config's run (checked before any work).

    A workdir whose run never wrote a checkpoint holds nothing to lose: its config.json (e.g.
    from a command that failed on a wrong --data) is replaced, with a warning.
    """
    path = workdir / CONFIG_FILE
    if not path.exists():
        return
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is unreadable ({e}); use another --workdir") from e
    differing = C.diff(old, cfg)
    if not differing:
        return
    lines = "\n".join(f"  {k}: workdir has {a!r}, this run has {b!r}"
                      for k, (a, b) in differing.items())
    if ckpt_io.find_resume(workdir) is None:
        log.warning("%s holds the config of a run that never checkpointed; replacing it. "
                    "Differing keys:\n%s", workdir, lines)
        (workdir / METRICS_FILE).unlink(missing_ok=True)
        return
    raise UserError(
        f"the workdir {workdir} holds a run with a different configuration; refusing "
        f"to mix them. Differing keys:\n{lines}\nUse another --workdir, or repeat the "
        "original command to continue that run.")


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj, indent=2, sort_keys=True, newline=True)


def _fmt(metrics: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in metrics.items() if k not in ("checkpoint", "config_hash"))


def _progress(enabled: bool, total: int, initial: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                mininterval=1.0)

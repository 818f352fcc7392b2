"""MOAM ("Mix Of All Models", paper Table 2): step 1 -> pseudo-labels -> step 2 -> step 3.

S4L_REFERENCE.md section 2: step 1 trains S4L-Rotation + VAT + EntMin on the 4x-wide net
(synchronised BN, Polyak averaging); step 2 pseudo-labels the whole training set with the step-1
model and trains a NEW 4x-wide net on those labels; step 3 fine-tunes the step-2 net on the
labelled 10%. ImageNet, 10% labels: step 1 88.80 / 69.73, + pseudo label 89.96 / 71.56,
full 91.23 / 73.21 (top-5 / top-1).

The same pipeline as commands (each stage in its own workdir; each is resumable):

    s4l train --preset moam-step1 --data IMAGENET --workdir runs/moam/step1 \\
        --labels s4l-label-maps/label_map_count_128000_index_0
    s4l pseudo-label --checkpoint runs/moam/step1/checkpoint.pt --data IMAGENET \\
        --labels s4l-label-maps/label_map_count_128000_index_0 --out runs/moam/pseudo_labels.json
    s4l train --preset moam-pseudo-label --data IMAGENET --workdir runs/moam/step2 \\
        --set data.pseudo_labels=runs/moam/pseudo_labels.json
    s4l train --preset moam-finetune --data IMAGENET --workdir runs/moam/step3 \\
        --labels s4l-label-maps/label_map_count_128000_index_0 \\
        --set init.checkpoint=runs/moam/step2/checkpoint.pt

or all of it: `s4l moam --data IMAGENET --workdir runs/moam --labels FILE`
(`--scale cifar10|imagenette` for the small-scale presets, `--smoke` for the seconds-long CPU
variants). `run_moam` writes `moam.json` in the workdir: every stage's workdir, the artifact it
came from (path + sha256) and its final metrics; each stage also writes `source.json`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from s4l.errors import UserError
from s4l.io import atomic_write_json

log = logging.getLogger(__name__)

STAGES = ("step1", "pseudo_labels", "step2", "step3")


def _preset_name(row: str, scale: str, smoke: bool) -> str:
    name = row if scale == "imagenet" else f"{scale}-{row}"
    return f"{name}-smoke" if smoke else name


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj, indent=2, sort_keys=True, newline=True)


def run_moam(data: str, workdir: str | os.PathLike, *, labels: str | None = None,
             labels_per_class: int | None = None, label_fraction: float | None = None,
             scale: str = "imagenet", smoke: bool = False,
             overrides: dict[str, list[str]] | None = None, device: str | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the three MOAM steps and the pseudo-labelling between them.

    overrides: extra `--set` strings per stage ("step1", "step2", "step3").
    Returns the summary written to `workdir/moam.json`.
    """
    from s4l.training import config as C
    from s4l.training.checkpoint import file_sha256
    from s4l.training.presets import SCALES, get_preset
    from s4l.training.teacher_labels import load_pseudo_label_file, pseudo_label
    from s4l.training.trainer import train

    if scale not in SCALES:
        raise UserError(f"unknown scale {scale!r}; valid: {', '.join(SCALES)}")
    overrides = overrides or {}
    unknown = sorted(set(overrides) - {"step1", "step2", "step3"})
    if unknown:
        raise UserError(f"overrides for unknown MOAM stages {unknown}; stages: step1, step2, step3")
    root = Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    label_sets: list[tuple[str, Any]] = [("data.root", data)]
    if any(v is not None for v in (labels, labels_per_class, label_fraction)):
        label_sets += [("data.labels", labels), ("data.labels_per_class", labels_per_class),
                       ("data.label_fraction", label_fraction)]
    summary: dict[str, Any] = {"data": data, "scale": scale, "smoke": smoke, "stages": {}}

    def stage_config(row: str, stage: str, extra: list) -> C.TrainConfig:
        cfg = get_preset(_preset_name(row, scale, smoke)).config
        return C.apply_overrides(cfg, [*extra, *overrides.get(stage, [])])

    def record(stage: str, info: dict[str, Any]) -> None:
        summary["stages"][stage] = info
        _write_json(root / "moam.json", summary)

    def train_stage(stage: str, row: str, extra: list,
                    source: Path | None) -> tuple[Path, C.TrainConfig]:
        """Train one stage in root/<stage>; its source.json and the summary name what it was
        made from (`source`: the pseudo-label file or the checkpoint it starts from)."""
        workdir = root / stage
        cfg = stage_config(row, stage, extra)
        log.info("MOAM %s -> %s", stage, workdir)
        metrics = train(cfg, workdir, device=device, progress=progress)
        ck = workdir / "checkpoint.pt"
        made_from: dict[str, Any] = {"from": None if source is None else str(source)}
        if source is not None:
            made_from["from_sha256"] = file_sha256(source)
        _write_json(workdir / "source.json", {"stage": stage, "preset": cfg.preset, **made_from})
        info = {"workdir": str(workdir), "checkpoint": str(ck), "sha256": file_sha256(ck)}
        record(stage, {**info, **({"from": str(source)} if source else {}), "metrics": metrics})
        return ck, cfg

    # ---- step 1: S4L-Rotation + VAT + EntMin, 4x wide, synced BN, EMA
    ck1, cfg1 = train_stage("step1", "moam-step1", label_sets, None)
    sha1 = summary["stages"]["step1"]["sha256"]

    # ---- pseudo-labels from the step-1 model (its EMA weights)
    pl = root / "pseudo_labels.json"
    fresh = pl.exists() and load_pseudo_label_file(pl)["provenance"].get("teacher_sha256") == sha1
    if not fresh:
        log.info("MOAM pseudo-labels <- %s", ck1)
        pseudo_label(ck1, data, pl, labels=labels, device=device, progress=progress,
                     workers=cfg1.data.workers)
    doc = load_pseudo_label_file(pl)
    record("pseudo_labels", {"file": str(pl), "sha256": file_sha256(pl), "from": str(ck1),
                             "from_sha256": sha1,
                             "teacher_accuracy": doc["provenance"].get("teacher_accuracy")})

    # ---- step 2: a new 4x-wide net trained from scratch on all images with those labels
    ck2, _ = train_stage("step2", "moam-pseudo-label",
                         [("data.root", data), ("data.pseudo_labels", str(pl.resolve()))], pl)

    # ---- step 3: fine-tune the step-2 net on the labelled subset
    ck3, _ = train_stage("step3", "moam-finetune",
                         [*label_sets, ("init.checkpoint", str(ck2.resolve()))], ck2)
    summary["final_checkpoint"] = str(ck3)
    _write_json(root / "moam.json", summary)
    return summary

"""The study's analyses of finished runs: BN statistics recomputed on training images, and the
transfer probes of frozen features on another domain."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from s4l.io import atomic_write_bytes
from s4l.study.ledger import now
from s4l.study.plan import Planner, Run, resolve_data
from s4l.study.spec import Study

log = logging.getLogger("s4l.study")

def bn_recompute(run: Run, batches: int = 40, batch_size: int = 250) -> dict[str, float]:
    """Re-estimate every BN layer's statistics on unrotated training images (eval crop, a fixed
    random sample of labelled + unlabelled images) and re-evaluate the test and held-out splits."""
    import numpy as np
    import torch

    from s4l.training import distributed as D
    from s4l.training.checkpoint import load_for_inference
    from s4l.training.data import make_eval_loader
    from s4l.training.objectives import build_objective
    from s4l.training.run_data import RunData
    from s4l.training.trainer import evaluate

    cfg = run.config
    inf = load_for_inference(run.workdir / "checkpoint.pt")
    model = inf.model
    env = D.DistEnv()
    data = RunData(cfg, env)
    obj = build_objective(cfg.objective.name, cfg.objective.objective_config(),
                          len(data.class_names))
    before = evaluate(model, obj, data, cfg, env)
    pool = np.array(sorted(set(data.labelled) | set(data.unlabelled)))
    idx = np.sort(np.random.default_rng(0).permutation(pool)[: batches * batch_size])
    from s4l.imaging import PreprocessSpec

    spec = PreprocessSpec(resize=cfg.data.eval_resize, crop=cfg.data.image_size,
                          interpolation="area")
    loader = make_eval_loader(data.source, idx, spec=spec, batch_size=batch_size,
                              workers=min(cfg.data.workers, 2))
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over every batch
    model.train()
    with torch.no_grad():
        for images, _ in loader:
            model(images.flatten(0, 1), heads=("classes",))
    model.eval()
    after = evaluate(model, obj, data, cfg, env)
    keep = ("eval/top1", "eval/top5", "heldout/top1", "heldout/top5")
    return {"run": run.id, "bn_images": int(len(idx)),
            **{f"before/{k}": round(before[k], 4) for k in keep if k in before},
            **{f"after/{k}": round(after[k], 4) for k in keep if k in after}}


def transfer_step(study: Study, planner: Planner, analyses: dict[str, Any], workdir: Path,
                  report: Path, smoke: bool, runs: dict[str, Run], key: str) -> None:
    """Linear probes of the backbone's final seed-0 run and of the self-supervised baseline on
    another domain (the paper's Places205 study); both runs are finished, here."""

    from s4l.evaluation.transfer import transfer_probe

    t = study.transfer
    ckpts = {name: planner.owner(r).workdir / "checkpoint.pt" for name, r in runs.items()}
    root = resolve_data(t.get("data", "imagenette"))
    out = workdir / "transfer" / key
    log.info("transfer: features of %s and linear probes for %s", root, list(ckpts))
    rep = transfer_probe(ckpts, root, out,
                         schedules="short=2,long=4" if smoke else t.get("schedules",
                                                                         "short=30,long=300"),
                         per_class=8 if smoke else t.get("per_class"))
    png = report.with_name(report.name + "_transfer.png")
    if (out / "probe" / "learning_curves.png").exists():
        atomic_write_bytes(png, (out / "probe" / "learning_curves.png").read_bytes())
    results = {}
    for name, r in zip(ckpts, rep["results"]):
        results[name] = {"run": runs[name].id, "dim": r["train"].get("dim"),
                         "train_rows": r["train"]["rows"], "val_rows": r["val"]["rows"],
                         "sklearn_top1": r.get("sklearn", {}).get("top1"),
                         **{f"sgd_{s}_{k}": v["top1" if k == "top1" else "top5"]
                            for s, v in r.get("sgd", {}).items() for k in ("top1", "top5")},
                         **{f"sgd_{s}_epochs": v["schedule"]["epochs"]
                            for s, v in r.get("sgd", {}).items()}}
    analyses["transfer"] = {"hash": key, "data": t.get("data", "imagenette"),
                            "results": results, "plot": png.name, "finished_at": now()}


"""Transfer of frozen backbones to another domain: features of an image folder, linear probes.

The paper's Places205 study (S4L_REFERENCE.md section 2, "Transfer") at small scale: for each
backbone, `pre_logits` features of the train and val splits are extracted to HDF5
(`s4l.evaluation.extract`), then multinomial logistic regression is fitted on the frozen features
with the reference solver and the short / long SGD schedules (`s4l.evaluation.report.probe_files`,
which also draws the learning curves). Every step is skipped when its output exists.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from s4l.io import atomic_write_text


def subset_list(root: Path, split: str, per_class: int, out: Path) -> str:
    """A Places205-format list of the first `per_class` images of each class (smoke runs)."""
    lines = []
    for c, d in enumerate(sorted(p for p in (root / split).iterdir() if p.is_dir())):
        for f in sorted(d.iterdir())[:per_class]:
            lines.append(f"{f.relative_to(root).as_posix()} {c}")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "\n".join(lines) + "\n")
    return f"places205:{out}@{root}"


def transfer_probe(ckpts: Mapping[str, str | Path], root: str | Path, workdir: str | Path, *,
                   schedules: str = "short=30,long=300", per_class: int | None = None,
                   ) -> dict[str, Any]:
    """Features of `root`'s train / val splits for every checkpoint, then the probes; returns
    probe_files' report (one result per checkpoint, in order) with `backbones` added."""
    from s4l.evaluation.extract import ExtractConfig, extract
    from s4l.evaluation.report import probe_files, probe_settings

    root, workdir = Path(root), Path(workdir)
    data = {split: (subset_list(root, split, per_class, workdir / "lists" / f"{split}.txt")
                    if per_class else str(root)) for split in ("train", "val")}
    feats = {}
    for name, ck in ckpts.items():
        for split in ("train", "val"):
            out = workdir / "features" / f"{name}_{split}.h5"
            out.parent.mkdir(parents=True, exist_ok=True)
            if not out.exists():
                extract(ExtractConfig(model=str(ck), data=data[split], out=str(out), split=split))
            feats[name, split] = out
    probe_dir = workdir / "probe"
    report_path = probe_dir / "report.json"
    if report_path.exists():
        report = json.loads(report_path.read_text())
    else:
        report = probe_files([feats[n, "train"] for n in ckpts], [feats[n, "val"] for n in ckpts],
                             probe_dir, probe_settings(schedules=schedules))
    report["backbones"] = list(ckpts)
    return report

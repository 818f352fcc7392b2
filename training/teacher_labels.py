"""Pseudo-labels: a teacher checkpoint labels every training image; the file a student trains on.

S4L_REFERENCE.md section 3 ("Pseudo-labels") and Table 2 (MOAM step 2): the released tool labels
every training image with the teacher's prediction on the CENTRE CROP, UNROTATED, and also stores
the prediction averaged over 5 crops x 4 rotations. The student is trained from scratch on ALL
images with hard labels: ground truth where the image is in the labelled list, the teacher's
label otherwise, no confidence threshold.

File format (JSON, `format: "s4l-pseudo-labels"`, version 1):

    {"format", "version", "class_names", "split", "provenance": {teacher_checkpoint,
     teacher_sha256, teacher_config_hash, data_root, label_file, label_file_sha256,
     labelled_from, n_images, n_labelled, git_sha, versions, created_at},
     "samples": [{"name": "<class>/<file>", "label": int, "source": "ground_truth"|"teacher",
                  "teacher_label": int, "confidence": float,
                  "averaged_label": int, "averaged_confidence": float}, ...]}

`name` is the sample's path relative to the split (`source.relpath`), so the file stays valid
when the data root moves. `read_pseudo_labels(path, source)` maps it back onto a source's
samples, strictly: every image must have a label and the class lists must agree.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from s4l.errors import UserError
from s4l.imaging import PreprocessSpec, eval_crop
from s4l.io import atomic_write_json

log = logging.getLogger(__name__)

FORMAT = "s4l-pseudo-labels"
# 1.28M ImageNet samples with two labels and two confidences each are a few hundred MiB.
PSEUDO_LABEL_MAX_BYTES = 1 << 30
VERSION = 1


# ============================================================================ reading


def read_pseudo_labels(path: str | os.PathLike, source) -> list[int]:
    """Hard labels for every sample of `source` (a training split), from a pseudo-label file."""
    doc = load_pseudo_label_file(path)
    if list(doc["class_names"]) != list(source.classes):
        raise UserError(
            f"{path} was made for classes {doc['class_names'][:5]}... but the data has "
            f"{source.classes[:5]}...; pseudo-label the same data set")
    by_name = {s["name"]: int(s["label"]) for s in doc["samples"]}
    labels, missing = [], []
    for i in range(len(source)):
        name = source.relpath(i)
        if name in by_name:
            labels.append(by_name[name])
        else:
            missing.append(name)
    if missing:
        raise UserError(
            f"{path} has no label for {len(missing)} of the {len(source)} training images "
            f"(e.g. {missing[:3]}); it was made for another data root ({doc['provenance'].get('data_root')})")
    return labels


def load_pseudo_label_file(path: str | os.PathLike) -> dict[str, Any]:
    from s4l.safeload import check_relative_name, load_json_file

    p = Path(path)
    if not p.is_file():
        raise UserError(f"pseudo-label file {str(p)!r} does not exist (make it with s4l pseudo-label)")
    doc = load_json_file(p, "pseudo-label file", PSEUDO_LABEL_MAX_BYTES)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise UserError(f"{str(p)!r} is not an s4l pseudo-label file (no format={FORMAT!r})")
    if doc.get("version") != VERSION:
        raise UserError(f"{str(p)!r} has pseudo-label format version {doc.get('version')}, "
                        f"this s4l reads {VERSION}")
    # Entries are checked here, once, so every reader below may trust their types.
    names = doc.get("class_names")
    if not isinstance(names, list) or not names or not all(isinstance(c, str) for c in names):
        raise UserError(f"{str(p)!r}: class_names must be a non-empty list of strings")
    samples = doc.get("samples")
    if not isinstance(samples, list):
        raise UserError(f"{str(p)!r}: samples must be a list")
    if not isinstance(doc.get("provenance", {}), dict):
        raise UserError(f"{str(p)!r}: provenance must be an object")
    seen: set[str] = set()
    for i, s in enumerate(samples):
        where = f"{str(p)!r} sample {i}"
        if not isinstance(s, dict) or "name" not in s or "label" not in s:
            raise UserError(f"{where}: expected an object with 'name' and 'label'")
        check_relative_name(s["name"], where)
        lab = s["label"]
        if isinstance(lab, bool) or not isinstance(lab, int) or not 0 <= lab < len(names):
            raise UserError(f"{where}: label {lab!r} is not a class index in [0, {len(names)})")
        if s["name"] in seen:
            raise UserError(f"{where}: {s['name']!r} is listed twice")
        seen.add(s["name"])
    return doc


# ============================================================================ labelling


def five_crops(img, spec: PreprocessSpec) -> np.ndarray:
    """uint8 [5, crop, crop, 3]: the 4 corners and the centre of the short-side-resized image.

    The centre crop is exactly `s4l.imaging.eval_crop` (same resize); the corners come from the
    same resized image.
    """
    from PIL import Image

    w, h = img.size
    scale = spec.resize / min(w, h)
    nw, nh = max(spec.crop, round(w * scale)), max(spec.crop, round(h * scale))
    big = eval_crop(img, PreprocessSpec(resize=spec.resize, crop=min(nw, nh),
                                        interpolation=spec.interpolation))
    if nw != nh:  # eval_crop squared it; rebuild the full resized image for the corners
        resample = Image.Resampling.BOX if spec.interpolation == "area" else Image.Resampling.BILINEAR
        if nw > w or nh > h:
            resample = Image.Resampling.BILINEAR
        big = np.asarray(img.convert("RGB").resize((nw, nh), resample=resample), dtype=np.uint8)
    c = spec.crop
    H, W = big.shape[:2]
    boxes = [(0, 0), (0, W - c), (H - c, 0), (H - c, W - c)]
    crops = [big[t:t + c, left:left + c] for t, left in boxes]
    crops.append(eval_crop(img, spec))
    return np.stack(crops)


class _LabelDataset(torch.utils.data.Dataset):
    def __init__(self, source, spec: PreprocessSpec) -> None:
        self.source, self.spec = source, spec

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        from s4l.training.transforms import to_model_input

        img = self.source.load(i)
        return i, to_model_input(five_crops(img, self.spec))  # [5, 3, c, c], centre last


@torch.no_grad()
def label_images(model: torch.nn.Module, source, spec: PreprocessSpec, *, batch_size: int = 64,
                 workers: int = 2, device: str | torch.device = "cpu",
                 progress: bool = True) -> dict[str, np.ndarray]:
    """Teacher predictions for every image of `source`.

    Returns arrays (length N): `teacher_label`, `confidence` (softmax max, centre crop,
    unrotated: the release's hard label) and `averaged_label`, `averaged_confidence` (softmax
    of the logits averaged over 5 crops x 4 rotations).
    """
    from s4l.training.objectives import predict_logits

    model.eval().to(device)
    n = len(source)
    out = {"teacher_label": np.zeros(n, np.int64), "confidence": np.zeros(n, np.float32),
           "averaged_label": np.zeros(n, np.int64),
           "averaged_confidence": np.zeros(n, np.float32)}
    loader = torch.utils.data.DataLoader(_LabelDataset(source, spec), batch_size=batch_size,
                                         num_workers=workers, shuffle=False)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="pseudo-label", unit="img", dynamic_ncols=True, mininterval=1.0)
    for idx, crops in loader:
        crops = crops.to(device)
        b = crops.shape[0]
        centre = predict_logits(model, crops[:, 4]).float()
        flat = crops.reshape(b * 5, *crops.shape[2:])
        avg = predict_logits(model, flat, rotation_average=True).float()
        avg = avg.reshape(b, 5, -1).mean(dim=1)
        pc, pa = centre.softmax(-1), avg.softmax(-1)
        i = idx.numpy()
        out["confidence"][i], lab = (t.cpu().numpy() for t in pc.max(-1))
        out["teacher_label"][i] = lab
        out["averaged_confidence"][i], lab = (t.cpu().numpy() for t in pa.max(-1))
        out["averaged_label"][i] = lab
        if bar is not None:
            bar.update(b)
    if bar is not None:
        bar.close()
    return out


def pseudo_label(checkpoint: str | os.PathLike, data_root: str, out: str | os.PathLike, *,
                 labels: str | os.PathLike | None = None, split: str = "train",
                 batch_size: int = 64, workers: int = 2, device: str | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Label every `split` image of `data_root` with the teacher and write the file to `out`.

    Ground truth is kept for the labelled images: those of `labels` (a label map) when given,
    otherwise the teacher's own labelled subset, recomputed from its stored config (same data
    root, label spec and seed). Returns the summary (counts, agreement with ground truth).
    """
    from s4l.datasets import open_source, read_label_map, select_labelled, training_subsets
    from s4l.training.checkpoint import file_sha256, load_for_inference, provenance

    out = Path(out)
    if out.exists() and out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name")
    teacher = load_for_inference(checkpoint)
    if "classes" not in teacher.model.heads:
        raise UserError(f"{checkpoint} has no class head (a self-supervised model cannot label)")
    source = open_source(data_root, split)
    # A model imported from the release (s4l import-tfhub) names its classes "tench", ...; an
    # ImageNet folder names them by wnid, which the import records beside the names.
    wnids = (teacher.config.get("tfhub") or {}).get("class_wnids")
    if teacher.class_names is not None and list(teacher.class_names) != list(source.classes) \
            and list(wnids or []) != list(source.classes):
        raise UserError(
            f"the teacher was trained on classes {teacher.class_names[:5]}... but {data_root} "
            f"has {source.classes[:5]}...")
    n_out = teacher.model.heads["classes"].out_features
    if n_out != len(source.classes):
        raise UserError(f"the teacher predicts {n_out} classes, the data has {len(source.classes)}")

    # Which images keep their ground truth.
    if labels is not None:
        labelled = select_labelled(source, read_label_map(labels))
        labelled_from = "label_file"
    else:
        d = teacher.config.get("data", {})
        if not d or d.get("root") is None:
            raise UserError(f"{checkpoint} records no data config; give --labels FILE")
        if os.path.abspath(str(d.get("root"))) != os.path.abspath(str(data_root)) and \
                str(d.get("root")) != str(data_root):
            log.warning("the teacher was trained on %s, labelling %s: using its label spec",
                        d.get("root"), data_root)
        subsets = training_subsets(
            source, label_map=d.get("labels"), labels_per_class=d.get("labels_per_class"),
            label_fraction=d.get("label_fraction"), label_seed=d.get("label_seed", 0),
            val_per_class=d.get("val_per_class", 0))
        labelled = subsets.labelled
        labelled_from = "teacher_config"
    labelled_set = set(labelled)

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pred = label_images(teacher.model, source, teacher.preprocess, batch_size=batch_size,
                        workers=workers, device=dev, progress=progress)
    samples = []
    for i in range(len(source)):
        gt = i in labelled_set
        samples.append({
            "name": source.relpath(i),
            "label": int(source.label(i)) if gt else int(pred["teacher_label"][i]),
            "source": "ground_truth" if gt else "teacher",
            "teacher_label": int(pred["teacher_label"][i]),
            "confidence": round(float(pred["confidence"][i]), 6),
            "averaged_label": int(pred["averaged_label"][i]),
            "averaged_confidence": round(float(pred["averaged_confidence"][i]), 6),
        })
    true = np.array([source.label(i) for i in range(len(source))])
    summary = {
        "n_images": len(source),
        "n_labelled": len(labelled_set),
        "teacher_accuracy": float((pred["teacher_label"] == true).mean()),
        "averaged_accuracy": float((pred["averaged_label"] == true).mean()),
    }
    prov = provenance()
    prov.update(
        teacher_checkpoint=str(Path(checkpoint).resolve()), teacher_sha256=teacher.sha256,
        teacher_config_hash=_config_hash(teacher.config),
        teacher_used_ema=teacher.used_ema, data_root=str(data_root), split=split,
        label_file=str(Path(labels).resolve()) if labels else None,
        label_file_sha256=file_sha256(labels) if labels else None,
        labelled_from=labelled_from, preprocess=teacher.preprocess.to_dict(),
        **summary,
    )
    doc = {"format": FORMAT, "version": VERSION, "class_names": list(source.classes),
           "split": split, "provenance": prov, "samples": samples}
    _write_atomic(out, doc)
    log.info("wrote %s: %d images (%d ground truth), teacher agrees with the true labels on "
             "%.1f%% (5-crop x 4-rotation average: %.1f%%)", out, len(source), len(labelled_set),
             100 * summary["teacher_accuracy"], 100 * summary["averaged_accuracy"])
    return {**summary, "out": str(out)}


def _config_hash(config: dict) -> str | None:
    from s4l.training import config as C

    try:
        return C.config_hash(config) if config else None
    except Exception:  # noqa: BLE001 - a foreign/older config: provenance only
        return None


def _write_atomic(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, doc)


def agreement(labels: Sequence[int], other: Sequence[int]) -> float:
    a, b = np.asarray(labels), np.asarray(other)
    return float((a == b).mean()) if len(a) else 0.0

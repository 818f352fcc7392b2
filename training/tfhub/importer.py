"""`s4l import-tfhub`: a TF-Hub module of the S4L release -> a normal s4l checkpoint.

The module's graph is checked as data first (`saved_model.pb` must parse as a SavedModel that
uses no code-running op; s4l.training.tfhub.graph), never run. Its weights are read as data (our
own tensor-bundle reader, checksums verified), mapped one-to-one onto s4l's ResNet50v2
(`mapping.plan` refuses anything unknown, missing or misshapen before a byte of weights is
read) and written with `save_checkpoint` (atomic: a refusal at any
step leaves nothing behind). The checkpoint holds `ema: None` (a module carries the raw weights,
never the Polyak shadows), the release's eval preprocessing, the 1,000 ImageNet class names in
the release's order when the module has a 1000-way `classes` head, and where it came from.

Memory: tensors are read one at a time, turned to PyTorch layout and kept; the model is checked
on the meta device (no second copy of the weights), so the peak is about one copy of the module
plus its largest tensor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from s4l.errors import UserError
from s4l.imaging import PreprocessSpec
from s4l.training.checkpoint import config_hash, provenance, save_checkpoint
from s4l.training.model import ModelSpec, build_model
from s4l.training.tfhub import crc32c, mapping
from s4l.training.tfhub.bundle import TensorBundle
from s4l.training.tfhub.source import open_module

log = logging.getLogger(__name__)

# google-research/s4l at the commit whose models/resnet.py, semi_supervised/utils.py and
# tpu_ops.py the mapping follows (the release's second and last commit, "Add MOAM step 1").
RELEASE_COMMIT = "8f1cf0555dad64d987309e3bee682cf8390bf48a"
RELEASE_REPO = "https://github.com/google-research/s4l"
# The release's eval crop (preprocess.py: resize_small(256) + central crop 224) on [-1, 1] input.
EVAL_PREPROCESS = PreprocessSpec(resize=256, crop=224, interpolation="area")


@dataclasses.dataclass
class ImportReport:
    out: str
    source: str
    family: str
    width: float
    bn_scope: str
    heads: dict[str, int]
    num_variables: int
    parameters: int
    variables_bytes: int
    seconds: float
    crc32c_backend: str

    def summary(self) -> str:
        heads = ", ".join(f"{k} {v}" for k, v in self.heads.items()) or "none"
        return (f"wrote {self.out}: {self.family}; width {self.width:g}, BN scope "
                f"{self.bn_scope!r}, heads {heads}; {self.num_variables} variables, "
                f"{self.parameters:,} parameters ({self.variables_bytes / 2**20:.1f} MiB) in "
                f"{self.seconds:.1f} s")


def imagenet_classes() -> list[tuple[str, str]]:
    """(wnid, readable name) of the 1,000 ImageNet classes, in the release's order (sorted wnids)."""
    text = resources.files("s4l.training.tfhub").joinpath("imagenet_classes.tsv").read_text("utf-8")
    rows = [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]
    out = [(w, n) for i, (idx, w, n) in enumerate(rows) if int(idx) == i]
    if len(out) != 1000:
        raise RuntimeError("imagenet_classes.tsv is damaged: expected 1000 ordered rows")
    return out


def _sha256(paths: list[Path]) -> dict[str, str]:
    out = {}
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        out[p.name] = h.hexdigest()
    return out


def _check_against_model(spec: ModelSpec, state: dict[str, torch.Tensor], what: str) -> None:
    """The mapped state dict fits s4l's model exactly (built on the meta device: no memory)."""
    with torch.device("meta"):
        own = build_model(spec).state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:  # a mapping bug, not a user error, but say it plainly
        raise UserError(f"{what}: mapped weights do not fit s4l's ResNet50v2 (missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]}, shapes {wrong[:3]})")


def import_tfhub(src: str | os.PathLike, out: str | os.PathLike, *, cache: Path | None = None,
                 progress: bool = True) -> ImportReport:
    """Convert the release module at `src` into the s4l checkpoint `out` (see module docstring)."""
    t0 = time.time()
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give the checkpoint file to write")
    # -- source: a local folder holding variables/ (unpacked or downloaded as needed) -----------
    with open_module(src, cache=cache, progress=progress) as module:
        what = f"TF-Hub module {src}"
        bundle = TensorBundle(module.variables)
        # -- check the whole variable list before reading weights ---------------------------------
        plan = mapping.plan({n: e.shape for n, e in bundle.entries.items()}, what=what)
        not_float = sorted(n for n, e in bundle.entries.items() if e.dtype != np.float32)
        if not_float:
            raise UserError(f"{what}: {len(not_float)} variable(s) are not float32 (e.g. "
                            f"{not_float[0]}: {bundle.entries[not_float[0]].dtype})")
        log.info("%s: %s", src, mapping.describe(plan))
        hashes = _sha256(module.variable_files())
        # -- weights, one tensor at a time, checksums verified -----------------------------------
        state: dict[str, torch.Tensor] = {}
        names = sorted(plan.targets, key=lambda n: bundle.entries[n].offset)
        with _progress(bundle.nbytes(), progress) as bar:
            for name in names:
                target = plan.targets[name]
                value = mapping.to_torch_layout(bundle.read(name), target)
                if not np.isfinite(value).all():
                    raise UserError(f"{what}: variable {name} holds NaN or infinite values")
                state[target.key] = torch.from_numpy(value)
                bar.update(bundle.entries[name].size)
        for key in [k for k in state if k.endswith(".running_mean")]:
            state[key.replace(".running_mean", ".num_batches_tracked")] = torch.tensor(0)
        nbytes = bundle.nbytes()
        module_kind, module_url = module.kind, module.url
        graph = {"saved_model_sha256": module.graph_sha256,
                 **(module.graph.to_dict() if module.graph else {}),
                 "check": "parsed as data (never run); no code-running op"}
    spec = ModelSpec(width=plan.width, stem="imagenet", bn_eps=1e-3, bn_momentum=0.01,
                     heads=plan.heads)
    _check_against_model(spec, state, what)

    # -- names, provenance, and the checkpoint (atomic) --------------------------------------
    classes = plan.heads.get("classes")
    names_rows = imagenet_classes() if classes == 1000 else None
    if classes is not None and names_rows is None:
        log.warning("%s: a %d-way classes head is not ImageNet's; no class names", src, classes)
    record: dict[str, Any] = {
        "source": str(src),
        "url": module_url,
        "source_kind": module_kind,
        "variables_sha256": hashes,
        "graph": graph,
        "family": plan.family,
        "bn_scope": plan.bn_scope,
        "filters_factor": plan.filters_factor,
        "num_variables": len(plan.targets),
        "release": RELEASE_REPO,
        "release_commit": RELEASE_COMMIT,
        "mapping": "s4l.training.tfhub.mapping",
        "weights": "raw (a TF-Hub module holds no Polyak/EMA shadows)",
        "input": "float [-1, 1] = uint8 / 127.5 - 1, as the release's input pipeline scales",
        "eval_preprocessing": EVAL_PREPROCESS.to_dict(),
        "class_order": "ImageNet labels in sorted-wnid order (the release subtracts 1 from "
                       "the 1-based TFRecord label)" if names_rows else None,
        "class_wnids": [w for w, _ in names_rows] if names_rows else None,
    }
    # class_wnids also in the config: an ImageNet folder's classes are wnids, and `s4l
    # pseudo-label` matches the teacher's classes against them (load_for_inference gives config).
    config = {"imported": "tfhub", "tfhub": {k: record[k] for k in
                                             ("source", "variables_sha256", "family",
                                              "release_commit", "bn_scope", "filters_factor",
                                              "class_wnids")}}
    payload = {
        "model_spec": spec.to_dict(),
        "model": state,
        "ema": None,
        "config": config,
        "config_hash": config_hash(config),
        "class_names": [n for _, n in names_rows] if names_rows else None,
        "preprocess": EVAL_PREPROCESS.to_dict(),
        "step": 0,
        "epoch": 0,
        "provenance": {**provenance(), "tfhub": record},
    }
    save_checkpoint(out, payload)
    params = sum(v.numel() for k, v in state.items()
                 if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    return ImportReport(out=str(out), source=str(src), family=plan.family, width=plan.width,
                        bn_scope=plan.bn_scope, heads=dict(plan.heads),
                        num_variables=len(plan.targets), parameters=params,
                        variables_bytes=nbytes, seconds=time.time() - t0,
                        crc32c_backend=crc32c.backend_name())


class _progress:
    """A tqdm bar over bytes converted, or nothing (no tqdm, not a terminal, or disabled)."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                desc="convert", disable=None, leave=False)
            except ImportError:
                pass

    def __enter__(self):
        return self

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()

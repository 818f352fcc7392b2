"""Pseudo-labels (teacher -> file -> student) and the MOAM pipeline at smoke size."""

from __future__ import annotations

import json

import numpy as np
import pytest

from s4l.datasets import open_source, write_label_map
from s4l.errors import UserError
from s4l.imaging import PreprocessSpec, eval_crop
from s4l.training import config as C
from s4l.training.checkpoint import file_sha256, read_checkpoint
from s4l.training.presets import get_preset
from s4l.training.teacher_labels import (
    five_crops,
    load_pseudo_label_file,
    pseudo_label,
    read_pseudo_labels,
)
from s4l.training.trainer import train


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    wd = tmp_path_factory.mktemp("teacher")
    cfg = C.apply_overrides(get_preset("supervised-10pct-smoke").config, ["optim.total_steps=4"])
    train(cfg, wd, progress=False)
    return wd / "checkpoint.pt"


@pytest.fixture(scope="module")
def teacher_labels(teacher, tmp_path_factory):
    """The teacher's pseudo-label file, labelled subset from its own config."""
    out = tmp_path_factory.mktemp("pl") / "pl.json"
    summary = pseudo_label(teacher, "builtin:digits", out, workers=0, progress=False)
    return out, summary


def test_five_crops_include_the_eval_crop_and_the_corners():
    from PIL import Image

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    spec = PreprocessSpec(resize=36, crop=32)
    crops = five_crops(img, spec)
    assert crops.shape == (5, 32, 32, 3) and crops.dtype == np.uint8
    assert np.array_equal(crops[4], eval_crop(img, spec))
    big = np.asarray(img.resize((54, 36), Image.Resampling.BOX))
    assert np.array_equal(crops[0], big[:32, :32]) and np.array_equal(crops[3], big[-32:, -32:])


def test_pseudo_label_file_keeps_ground_truth_and_records_provenance(teacher, tmp_path):
    from s4l.cli import main

    src = open_source("builtin:digits", "train")
    labelled_names = [src.relpath(i) for i in range(0, len(src), 50)]
    label_file = tmp_path / "labels.txt"
    write_label_map(label_file, labelled_names)
    out = tmp_path / "pl.json"
    rc = main(["pseudo-label", "--checkpoint", str(teacher), "--data", "builtin:digits",
               "--labels", str(label_file), "--out", str(out), "--workers", "0",
               "--batch-size", "64", "--no-progress"])
    assert rc == 0
    doc = load_pseudo_label_file(out)
    prov = doc["provenance"]
    assert prov["teacher_sha256"] == file_sha256(teacher)
    assert prov["label_file_sha256"] == file_sha256(label_file)
    assert prov["data_root"] == "builtin:digits" and prov["labelled_from"] == "label_file"
    assert prov["git_sha"] is None or len(prov["git_sha"]) >= 40
    assert len(doc["samples"]) == len(src) and doc["class_names"] == src.classes
    by_name = {s["name"]: s for s in doc["samples"]}
    for i in range(len(src)):
        s = by_name[src.relpath(i)]
        if src.relpath(i) in set(labelled_names):
            assert s["source"] == "ground_truth" and s["label"] == src.label(i)
        else:
            assert s["source"] == "teacher" and s["label"] == s["teacher_label"]
        assert 0.0 < s["confidence"] <= 1.0 and 0.0 < s["averaged_confidence"] <= 1.0
    assert sum(s["source"] == "ground_truth" for s in doc["samples"]) == len(labelled_names)
    # The teacher's centre-crop labels are its real predictions (same as load_for_inference).
    import torch

    from s4l.training.checkpoint import load_for_inference
    from s4l.training.transforms import to_model_input

    inf = load_for_inference(teacher)
    x = torch.stack([to_model_input(eval_crop(src.load(i), inf.preprocess)) for i in range(8)])
    with torch.no_grad():
        pred = inf.model(x)["classes"].argmax(1).tolist()
    assert pred == [by_name[src.relpath(i)]["teacher_label"] for i in range(8)]


def test_teacher_config_gives_the_labelled_subset_by_default(teacher, teacher_labels):
    out, summary = teacher_labels
    cfg = read_checkpoint(teacher)["config"]
    assert summary["n_labelled"] == 10 * cfg["data"]["labels_per_class"]
    assert load_pseudo_label_file(out)["provenance"]["labelled_from"] == "teacher_config"


def test_student_trains_on_all_images_with_the_file_labels(teacher_labels, tmp_path):
    from s4l.training.distributed import DistEnv
    from s4l.training.run_data import RunData

    out, _ = teacher_labels
    cfg = C.apply_overrides(get_preset("pseudo-label-10pct-smoke").config,
                            [("data.pseudo_labels", str(out))])
    data = RunData(cfg, DistEnv())
    assert data.labelled == data.unlabelled and data.n_labelled == len(data.source) - 10
    assert data.label_override == read_pseudo_labels(out, data.source)
    final = train(cfg, tmp_path / "student", progress=False)
    assert final["step"] == 2
    # The file's labels differ from the truth somewhere (a 4-step teacher): the student really
    # trains on them rather than on the ground truth.
    truth = [data.source.label(i) for i in range(len(data.source))]
    assert data.label_override != truth


def test_bad_pseudo_label_files_are_refused(teacher_labels, tmp_path):
    out, _ = teacher_labels
    doc = json.loads(out.read_text())
    doc["samples"] = doc["samples"][:-5]
    short = tmp_path / "short.json"
    short.write_text(json.dumps(doc))
    with pytest.raises(UserError, match="no label for 5 of the"):
        read_pseudo_labels(short, open_source("builtin:digits", "train"))
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(UserError, match="not an s4l pseudo-label file"):
        load_pseudo_label_file(tmp_path / "junk.json")
    cfg = C.apply_overrides(get_preset("pseudo-label-10pct-smoke").config,
                            [("data.pseudo_labels", str(out)), ("data.labels_per_class", 5)])
    with pytest.raises(UserError, match="do not also give a labelled subset"):
        train(cfg, tmp_path / "w", progress=False)


def test_self_supervised_teacher_cannot_label(tmp_path):
    train(get_preset("rotation-pretrain-smoke").config, tmp_path / "rot", progress=False)
    with pytest.raises(UserError, match="no class head"):
        pseudo_label(tmp_path / "rot" / "checkpoint.pt", "builtin:digits", tmp_path / "x.json",
                     workers=0, progress=False)


def test_moam_pipeline_at_smoke_size(tmp_path):
    from s4l.training.moam_pipeline import run_moam

    s = run_moam("builtin:digits", tmp_path, smoke=True, progress=False)
    stages = s["stages"]
    assert list(stages) == ["step1", "pseudo_labels", "step2", "step3"]
    ck1, ck2, ck3 = (tmp_path / f"step{i}" / "checkpoint.pt" for i in (1, 2, 3))
    assert stages["pseudo_labels"]["from_sha256"] == file_sha256(ck1)
    pl = load_pseudo_label_file(tmp_path / "pseudo_labels.json")
    assert pl["provenance"]["teacher_sha256"] == file_sha256(ck1)
    assert pl["provenance"]["teacher_used_ema"]  # step 1 trains with Polyak averaging
    c2 = read_checkpoint(ck2)
    assert c2["config"]["data"]["pseudo_labels"] == str((tmp_path / "pseudo_labels.json").resolve())
    c3 = read_checkpoint(ck3)
    assert c3["provenance"]["init"]["sha256"] == file_sha256(ck2)
    assert json.loads((tmp_path / "step3" / "source.json").read_text())["from_sha256"] == \
        file_sha256(ck2)
    assert json.loads((tmp_path / "moam.json").read_text())["final_checkpoint"] == str(ck3)
    # Every stage names what it was made from, in its source.json and in the summary.
    src = {i: json.loads((tmp_path / f"step{i}" / "source.json").read_text()) for i in (1, 2, 3)}
    assert src[1]["from"] is None and "from_sha256" not in src[1] and "from" not in stages["step1"]
    assert src[2]["from_sha256"] == file_sha256(tmp_path / "pseudo_labels.json")
    assert stages["step2"]["from"] == str(tmp_path / "pseudo_labels.json")
    assert stages["step3"]["from"] == str(ck2) and stages["step3"]["sha256"] == file_sha256(ck3)
    assert read_checkpoint(ck1)["config"]["bn"]["sync"] is True
    # Rerunning resumes every stage (nothing retrained: checkpoints unchanged).
    before = [file_sha256(c) for c in (ck1, ck2, ck3)]
    run_moam("builtin:digits", tmp_path, smoke=True, progress=False)
    assert [file_sha256(c) for c in (ck1, ck2, ck3)] == before

"""Small-validation-set study: statistics on known correctness matrices, and the command end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from s4l.errors import UserError
from s4l.evaluation.val_study import balanced_draw, model_names, study


def sweep(accs, n_per_class=50, classes=10, seed=0):
    """A correctness matrix for models whose true accuracy is `accs` (independent errors)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    correct = rng.random((len(accs), len(labels))) < np.asarray(accs)[:, None]
    return correct, labels


def test_balanced_draw_takes_k_per_class():
    labels = np.array([0] * 5 + [1] * 3 + [2] * 1)
    idx = balanced_draw(labels, 2, np.random.default_rng(0))
    assert np.bincount(labels[idx]).tolist() == [2, 2, 1]  # a class with fewer gives all it has
    assert len(set(idx.tolist())) == len(idx)


def test_whole_pool_subset_agrees_perfectly():
    correct, labels = sweep([0.2, 0.4, 0.6, 0.8], n_per_class=20)
    r = study(correct, labels, per_class=[20], draws=3)
    s = r["sizes"]["20_per_class"]
    assert s["images"] == 200
    for c in ("pearson", "spearman", "kendall"):
        assert s["correlation"][c]["mean"] == pytest.approx(1.0)
    assert s["picks_best_fraction"] == 1.0
    assert s["pick_regret_points"]["max"] == 0.0
    assert r["full_best"] == 3


def test_small_sets_are_noisier_than_larger_ones():
    accs = np.linspace(0.30, 0.60, 12)
    correct, labels = sweep(accs, n_per_class=100)
    r = study(correct, labels, per_class=[1, 5, 50], draws=30, seed=1)
    sp = {k: r["sizes"][f"{k}_per_class"]["correlation"]["spearman"]["mean"] for k in (1, 5, 50)}
    assert sp[1] < sp[5] < sp[50], sp
    assert sp[50] > 0.8
    one = r["sizes"]["1_per_class"]
    assert one["images"] == 10 and len(one["accuracy_by_draw"]) == 30
    # Regret is how much full-pool accuracy the small set's pick gives up: never negative.
    assert one["pick_regret_points"]["min"] >= 0
    assert 1 <= one["pick_full_rank"]["mean"] <= 12
    # 10 images and 12 models: ties for the best small-set score happen; they are counted.
    assert one["draws_with_tied_best"] > 0


def test_models_that_do_not_differ_give_no_correlation():
    correct, labels = sweep([0.5] * 6, n_per_class=30, seed=3)
    correct[:] = correct[0]  # identical predictions: every subset scores them equally
    r = study(correct, labels, per_class=[1], draws=5)
    s = r["sizes"]["1_per_class"]
    assert s["correlation"]["pearson"]["undefined_draws"] == 5
    # Tie-breaking is random, not "first listed".
    assert len(set(s["picks"])) > 1


def test_bad_input():
    correct, labels = sweep([0.5], n_per_class=3)
    with pytest.raises(UserError, match="at least 2"):
        study(correct, labels)
    correct, labels = sweep([0.5, 0.6], n_per_class=3)
    with pytest.raises(UserError, match=">= 1"):
        study(correct, labels, per_class=[0])
    assert model_names(["/a/x/m.pt", "/a/y/m.pt", "/a/y/n.pt"]) == ["x/m", "y/m", "y/n"]


def test_command_end_to_end_on_real_checkpoints(tmp_path):
    import h5py
    import torch
    from support.images import make_image_folder
    from test_extract import make_checkpoint

    from s4l.cli import main as cli_main
    from s4l.training.model import ModelSpec, build_model

    pool = make_image_folder(tmp_path / "pool", splits=("val",), classes=("a", "b", "c"),
                             per_class=8, size=36)
    models = [str(make_checkpoint(tmp_path / f"sweep/lr{i}.pt", seed=i)) for i in range(4)]
    out = tmp_path / "study"
    argv = ["val-study", "--models", *models, "--data", str(pool), "--split", "val",
            "--out", str(out), "--per-class", "1", "5", "--draws", "4", "--workers", "0",
            "--no-progress"]
    assert cli_main(argv) == 0
    r = json.loads((out / "val_study.json").read_text())
    assert (out / "val_study.png").stat().st_size > 10_000
    assert r["models"] == ["lr0", "lr1", "lr2", "lr3"] and r["pool_images"] == 24
    assert r["sizes"]["5_per_class"]["images"] == 15
    # The full-pool accuracies are those of the models' own logits on the pool.
    for acc, inp in zip(r["full_accuracy"], r["inputs"]):
        with h5py.File(inp["logits_file"], "r") as f:
            want = 100 * (f["logits"][...].argmax(1) == f["labels"][...]).mean()
        assert acc == pytest.approx(want)
    # Rerun: the extracted logits are reused, the report needs --overwrite.
    stamp = {p: p.stat().st_mtime_ns for p in (out / "logits").glob("*.h5")}
    assert cli_main(argv) == 2
    assert cli_main([*argv, "--overwrite"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "logits").glob("*.h5")} == stamp
    # A model without a class head cannot be scored.
    spec = ModelSpec(width=0.0625, stem="small", heads={"rotation": 4})
    from s4l.training.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "rot.pt", {
        "model_spec": spec.to_dict(), "model": build_model(spec).state_dict(), "ema": None,
        "config": {}, "config_hash": "x", "class_names": None,
        "preprocess": {"resize": 36, "crop": 32, "interpolation": "area"}, "step": 0, "epoch": 0,
        "optimizer": None, "rng": None, "data_state": None, "provenance": {},
    })
    torch.manual_seed(0)
    with pytest.raises(UserError, match="no class head"):
        from s4l.evaluation.val_study import run_val_study

        run_val_study([models[0], str(tmp_path / "rot.pt")], str(pool), "val", tmp_path / "s2",
                      workers=0, progress=False)
    with pytest.raises(UserError, match="at least 2"):
        run_val_study([models[0]], str(pool), "val", tmp_path / "s3")

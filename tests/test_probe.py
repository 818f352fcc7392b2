"""Linear probe: SGD vs the scikit-learn reference, HDF5 streaming, report outputs, bad input."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from s4l.cli import main as cli_main
from s4l.errors import UserError
from s4l.evaluation import features as F
from s4l.evaluation.probe import (
    ArrayRows,
    FileRows,
    ProbeSettings,
    Schedule,
    SGDSettings,
    fit_probe,
    parse_schedules,
    topk_accuracy,
)
from s4l.provenance import file_sha256


def blobs(n, dim=24, classes=6, seed=0, noise=2.2, means_seed=123):
    """Gaussian classes with overlapping clouds: learnable, but well below 100% accuracy."""
    means = np.random.default_rng(means_seed).normal(0, 1, (classes, dim)) * 1.5
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    # An offset and per-dimension scale like pooled ReLU features (the probe standardises).
    x = (means[y] + rng.normal(0, noise, (n, dim))) * np.linspace(0.2, 5, dim) + 3.0
    return x.astype(np.float32), y.astype(np.int64)


def write_features(path, x, y, *, model="m1", layer="pre_logits", schema=1, classes=None):
    attrs = {"schema_version": schema, "model_hash": model, "layer": layer,
             "preprocess": {"resize": 256, "crop": 224, "interpolation": "area"},
             "data_root": "synthetic", "created_at": "now", "s4l_version": "test",
             "class_names": classes}
    F.write_rows(path, F.Rows(x, y, [f"img{i}.jpg" for i in range(len(y))]), attrs)
    return path


SHORT = {"short": Schedule(12, (2 / 3, 5 / 6))}


def test_sgd_lands_within_one_point_of_sklearn():
    tx, ty = blobs(2400, seed=1)
    vx, vy = blobs(1200, seed=2)
    r = fit_probe(ArrayRows(tx, ty), ArrayRows(vx, vy), num_classes=6,
                  settings=ProbeSettings(schedules=SHORT, sgd=SGDSettings(batch_size=64)))
    sk, sgd = r["sklearn"], r["sgd"]["short"]
    # A hard enough problem that "within 1 point" means something.
    assert 50 < sk["top1"] < 95, sk["top1"]
    assert abs(sgd["top1"] - sk["top1"]) <= 1.0, (sgd["top1"], sk["top1"])
    assert sk["top5"] >= sk["top1"]
    assert len(sgd["curve"]) == 12
    assert [p["lr"] for p in sgd["curve"]][::4] == pytest.approx([0.025, 0.025, 0.0025])
    # Accuracy through training is recorded and rises from the first epoch's level or stays.
    assert sgd["curve"][-1]["top1"] >= sgd["curve"][0]["top1"] - 2


def test_streaming_from_hdf5_matches_in_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(F, "CHUNK_BYTES", 512)  # 16-row chunks: many blocks to stream
    tx, ty = blobs(600, seed=3)
    vx, vy = blobs(300, seed=4)
    write_features(tmp_path / "t.h5", tx, ty)
    write_features(tmp_path / "v.h5", vx, vy)
    settings = ProbeSettings(solvers=("sklearn",), cs=(0.1,))
    with F.FeatureFile(tmp_path / "t.h5") as tf, F.FeatureFile(tmp_path / "v.h5") as vf:
        assert tf.block_rows == 16
        rows = FileRows(tf, shuffle_blocks=3)
        # A shuffled epoch visits every row exactly once.
        seen = np.concatenate([y for _, y in rows.blocks(np.random.default_rng(0))])
        assert sorted(seen.tolist()) == sorted(ty.tolist())
        x_all, y_all = rows.to_arrays(max_rows=100, seed=0)
        assert x_all.shape == (100, 24)
        idx = [int(np.flatnonzero((tx == row).all(1))[0]) for row in x_all[:5]]
        assert (ty[idx] == y_all[:5]).all()
        from_file = fit_probe(FileRows(tf), FileRows(vf), num_classes=6, settings=settings)
    in_mem = fit_probe(ArrayRows(tx, ty), ArrayRows(vx, vy), num_classes=6, settings=settings)
    assert from_file["sklearn"]["top1"] == pytest.approx(in_mem["sklearn"]["top1"])
    assert from_file["sklearn"]["top5"] == pytest.approx(in_mem["sklearn"]["top5"])


def test_cli_writes_report_and_curves_for_paired_files(tmp_path):
    paths = {}
    for name, (noise, seed) in {"a": (1.5, 10), "b": (3.0, 20)}.items():
        tx, ty = blobs(900, seed=seed, noise=noise)
        vx, vy = blobs(300, seed=seed + 1, noise=noise)
        paths[name] = (write_features(tmp_path / f"{name}.h5", tx, ty, model=name),
                       write_features(tmp_path / f"{name}_val.h5", vx, vy, model=name))
    out = tmp_path / "probe"
    argv = ["probe", "--train", str(paths["a"][0]), str(paths["b"][0]),
            "--val", str(paths["a"][1]), str(paths["b"][1]), "--out", str(out),
            "--schedules", "short=3,long=5", "--C", "0.1", "1", "--no-progress"]
    assert cli_main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert (out / "learning_curves.png").stat().st_size > 10_000
    assert len(report["results"]) == 2
    ra, rb = report["results"]
    assert ra["train"]["sha256"] == file_sha256(paths["a"][0])
    assert ra["val"]["sha256"] == file_sha256(paths["a"][1])
    assert set(ra["sgd"]) == {"short", "long"}
    assert len(ra["sgd"]["long"]["curve"]) == 5
    assert report["settings"]["schedules"]["short"]["epochs"] == 3
    # Cleaner features give a better probe: the numbers come from the data.
    assert ra["sklearn"]["top1"] > rb["sklearn"]["top1"]
    assert ra["sklearn"]["C"] in (0.1, 1.0)
    # The report is never clobbered without --overwrite.
    assert cli_main(argv) == 2
    assert cli_main([*argv, "--overwrite"]) == 0


def test_mismatched_pairs_are_clear_errors(tmp_path):
    x, y = blobs(100, seed=5)
    t = write_features(tmp_path / "t.h5", x, y, model="m1")
    v_dim = write_features(tmp_path / "v_dim.h5", x[:, :10], y, model="m1")
    v_model = write_features(tmp_path / "v_model.h5", x, y, model="m2")
    v_layer = write_features(tmp_path / "v_layer.h5", x, y, model="m1", layer="stage3")
    v_schema = write_features(tmp_path / "v_schema.h5", x, y, schema=2)
    out = tmp_path / "o"
    for bad, words in [(v_dim, "dimension 24 vs 10"), (v_model, "model"), (v_layer, "layer"),
                       (v_schema, "schema version 2")]:
        with pytest.raises(UserError, match=words):
            from s4l.evaluation.report import probe_files

            probe_files([t], [bad], out, ProbeSettings(solvers=("sklearn",)))
    assert not (out / "report.json").exists()
    with pytest.raises(UserError, match="pairs"):
        probe_files([t, t], [t], out)
    not_h5 = tmp_path / "x.h5"
    not_h5.write_text("hello")
    with pytest.raises(UserError, match="not a readable HDF5"):
        F.FeatureFile(not_h5)
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["features"] = x
    with pytest.raises(UserError, match="schema_version"):
        F.FeatureFile(tmp_path / "plain.h5")


def test_classes_in_val_but_not_train_are_reported(tmp_path):
    x, y = blobs(600, seed=6)
    keep = y != 5
    vx, vy = blobs(300, seed=7)
    names = [f"c{i}" for i in range(6)]
    t = write_features(tmp_path / "t.h5", x[keep], y[keep], classes=names)
    v = write_features(tmp_path / "v.h5", vx, vy, classes=names)
    from s4l.evaluation.report import probe_files

    rep = probe_files([t], [v], tmp_path / "o", ProbeSettings(schedules={"short": Schedule(2, ())}),
                      progress=False)
    cov = rep["results"][0]["coverage"]
    assert cov["train_classes"] == 5 and cov["val_classes"] == 6
    assert cov["missing_in_train"] == [{"class": 5, "name": "c5", "val_images": int((vy == 5).sum())}]
    # Those images can never be right: top-1 is bounded by the share of seen classes.
    bound = 100 * (vy != 5).mean()
    assert rep["results"][0]["sklearn"]["top1"] <= bound + 1e-9
    assert rep["results"][0]["sgd"]["short"]["top1"] <= bound + 1e-9


def test_helpers():
    s = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    assert topk_accuracy(s, np.array([1, 2])) == {"top1": 50.0, "top5": 100.0}
    assert parse_schedules("short=4")["short"].epochs == 4
    assert set(parse_schedules("long=9")) == {"long"}
    assert Schedule(30, (2 / 3, 5 / 6)).boundaries() == [20, 25]
    with pytest.raises(UserError):
        parse_schedules("medium=3")
    with pytest.raises(UserError, match="no labelled rows"):
        fit_probe(ArrayRows(np.zeros((0, 3), np.float32), np.zeros(0)),
                  ArrayRows(np.zeros((2, 3), np.float32), np.zeros(2)), num_classes=2)


def test_command_modules_import_no_torch():
    """docs/contracts.md: command modules keep heavy imports inside main()."""
    import subprocess
    import sys

    code = ("import sys; import s4l.evaluation.cmd_extract, s4l.evaluation.cmd_probe, "
            "s4l.evaluation.cmd_val_study; print(sorted(m for m in ('torch', 'h5py', 'sklearn') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_probe_settings_are_the_cli_defaults_without_an_argv():
    """Libraries build probe settings with `probe_settings(...)` (no fake argv); with no
    arguments it gives what `s4l probe` gives with none."""
    import argparse

    from s4l.evaluation.cmd_probe import build_settings, configure
    from s4l.evaluation.report import probe_settings

    p = argparse.ArgumentParser()
    configure(p)
    args = p.parse_args(["--train", "a.h5", "--val", "b.h5", "--out", "o", "--schedules", "short=3"])
    assert build_settings(args) == probe_settings(schedules="short=3")
    with pytest.raises(UserError, match="--holdout"):
        probe_settings(holdout=1.0)

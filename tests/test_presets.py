"""Presets: every paper row at every scale, the release's hyper-parameters, and every smoke run."""

from __future__ import annotations

import dataclasses
import json

import pytest

from s4l.errors import UserError
from s4l.training import config as C
from s4l.training.presets import PRESETS, ROWS, SCALES, format_table, get_preset

# S4L_REFERENCE.md section 3 table: (batch, unsup mult, width, lr, wd, warmup, decays, total).
RELEASE = {
    "supervised-10pct": (256, 1, 1.0, 0.1, 1e-3, 5, (140, 160, 180), 200),
    "supervised-1pct": (256, 1, 1.0, 0.01, 1e-2, 5, (700, 800, 900), 1000),
    "s4l-rotation-10pct": (256, 1, 1.0, 0.03, 1e-3, 5, (140, 160, 180), 200),
    "s4l-exemplar-10pct": (512, 1, 1.0, 0.1, 1e-3, 10, (140, 160, 180), 200),
    "vat-10pct": (256, 1, 1.0, 0.03, 1e-3, 5, (140, 160, 180), 200),
    "vat-entmin-10pct": (256, 1, 1.0, 0.03, 1e-3, 5, (140, 160, 180), 200),
    "pseudo-label-10pct": (256, 1, 1.0, 0.1, 1e-4, 5, (30, 60, 90), 100),
    "moam-step1": (128, 1, 4.0, 0.1, 2e-4, 10, (100, 150, 190), 200),
    "moam-pseudo-label": (256, 1, 4.0, 0.1, 1e-4, 5, (30, 60, 90), 100),
}


@pytest.mark.parametrize("name", sorted(RELEASE))
def test_imagenet_presets_use_the_release_hyper_parameters(name):
    cfg = get_preset(name).config
    b, mult, width, lr, wd, warm, decays, total = RELEASE[name]
    o = cfg.optim
    assert (o.batch_size, o.unsup_batch_mult, cfg.model.width) == (b, mult, width)
    assert (o.lr, o.weight_decay, o.momentum, o.nesterov) == (lr, wd, 0.9, False)
    assert (o.warmup_epochs, o.decay_epochs, o.total_epochs) == (warm, tuple(map(float, decays)), total)
    assert (cfg.model.stem, cfg.data.image_size, cfg.data.eval_resize) == ("imagenet", 224, 256)
    assert (cfg.model.bn_eps, cfg.model.bn_momentum) == (1e-3, 0.01)


def test_moam_and_label_specs():
    moam = get_preset("moam-step1").config
    assert moam.objective.name == "moam" and moam.bn.sync and moam.ema.half_life_epochs == 1.0
    assert moam.objective.moam_vat_eps == 32.0
    assert get_preset("supervised-10pct").config.data.labels_per_class == 128
    assert get_preset("supervised-1pct").config.data.labels_per_class == 13
    assert get_preset("supervised-1pct").config.data.hsv_noise
    assert get_preset("s4l-exemplar-10pct").config.data.hsv_noise
    assert get_preset("rotation-linear-10pct").config.objective.name == "linear"
    assert get_preset("exemplar-finetune-1pct").config.objective.name == "fine-tune"
    assert get_preset("supervised-4x").config.model.width == 4.0
    assert get_preset("cifar10-s4l-rotation-10pct").config.model.stem == "small"
    assert get_preset("cifar10-s4l-rotation-10pct").config.data.image_size == 32


def test_every_row_at_every_scale_with_a_documented_command_and_number():
    assert len(PRESETS) == len(ROWS) * len(SCALES) * 2
    for row in ROWS:
        assert "Command:" in row.doc and "s4l train --preset" in row.doc, row.name
        if row.number != "-":
            assert row.number.split()[1] in row.doc, row.name  # the paper's number
        for scale in SCALES:
            name = row.name if scale == "imagenet" else f"{scale}-{row.name}"
            p = get_preset(name)
            assert p.config.preset == name and not p.smoke
            s = get_preset(name + "-smoke")
            assert s.smoke and s.config.objective == p.config.objective
            assert s.config.bn.sync == p.config.bn.sync
            assert (s.config.ema.half_life_epochs is None) == (p.config.ema.half_life_epochs is None)


def test_small_scales_keep_the_schedule_shape():
    for row in ("s4l-rotation-10pct", "supervised-1pct"):
        big = get_preset(row).config.optim
        small = get_preset(f"cifar10-{row}").config.optim
        ratio = small.total_epochs / big.total_epochs
        for a, b in zip(big.decay_epochs, small.decay_epochs):
            assert b == pytest.approx(a * ratio, rel=1e-2)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(UserError, match="valid presets: supervised-10pct"):
        get_preset("s4l-rotaton")


def test_list_presets_command(capsys):
    from s4l.cli import main

    assert main(["train", "--list-presets"]) == 0
    out = capsys.readouterr().out
    assert "s4l-rotation-10pct" in out and "83.82" in out and "Table 2" in out
    assert "-smoke " not in out
    assert format_table(include_smoke=True).count("-smoke") == len(PRESETS) // 2


def test_set_overrides_are_type_checked_and_unknown_keys_listed():
    cfg = get_preset("s4l-rotation-10pct").config
    new = C.apply_overrides(cfg, ["optim.lr=0.5", "optim.decay_epochs=[1,2]", "ema.half_life_epochs=2",
                                  "objective.vat_eps=8", "data.labels=x.json",
                                  "data.labels_per_class=null"])
    assert new.optim.lr == 0.5 and new.optim.decay_epochs == (1.0, 2.0)
    assert new.ema.half_life_epochs == 2.0 and new.objective.vat_eps == 8.0
    # Naming one labelled-subset field replaces the preset's (they are alternatives).
    alt = C.apply_overrides(cfg, ["data.label_fraction=0.5"])
    assert (alt.data.label_fraction, alt.data.labels_per_class) == (0.5, None)
    with pytest.raises(UserError, match="at most one of"):
        C.apply_overrides(cfg, ["data.label_fraction=0.5", "data.labels_per_class=3"])
    with pytest.raises(UserError, match="unknown config key 'optim.lrr'; valid keys: .*optim.lr"):
        C.apply_overrides(cfg, ["optim.lrr=1"])
    with pytest.raises(UserError, match="optim.batch_size: expected an integer"):
        C.apply_overrides(cfg, ["optim.batch_size=1.5"])
    with pytest.raises(UserError, match="bn.ghost_batch"):
        C.apply_overrides(cfg, ["bn.ghost_batch=7"])
    assert C.from_dict(json.loads(json.dumps(C.to_dict(new)))) == new
    d = C.diff(cfg, new)
    assert set(d) == {"optim.lr", "optim.decay_epochs", "ema.half_life_epochs", "objective.vat_eps",
                      "data.labels", "data.labels_per_class"}
    assert C.config_hash(cfg) != C.config_hash(new)
    # Execution-only fields do not change the hash (a resume may use more workers).
    assert C.config_hash(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, workers=1))) \
        == C.config_hash(cfg)


def test_cli_requires_the_artifact_a_row_needs(tmp_path):
    from s4l.cli import main

    rc = main(["train", "--preset", "rotation-linear-10pct-smoke", "--data", "builtin:digits",
               "--workdir", str(tmp_path / "w")])
    assert rc == 2 and not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------- smoke runs

# Every preset's smoke variant, run end to end (in process). Rows needing a pretrained
# checkpoint or a pseudo-label file get them from earlier smoke runs.
SMOKE = sorted(n for n, p in PRESETS.items() if p.smoke)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    from s4l.training.teacher_labels import pseudo_label
    from s4l.training.trainer import train

    root = tmp_path_factory.mktemp("smoke-artifacts")
    train(get_preset("supervised-10pct-smoke").config, root / "teacher", progress=False)
    ckpt = root / "teacher" / "checkpoint.pt"
    pl = root / "pl.json"
    pseudo_label(ckpt, "builtin:digits", pl, workers=0, progress=False)
    return {"init.checkpoint": str(ckpt), "data.pseudo_labels": str(pl)}


@pytest.mark.parametrize("name", SMOKE)
def test_smoke_variant_runs_end_to_end(name, artifacts, tmp_path):
    from s4l.training.trainer import read_metrics, train

    p = get_preset(name)
    cfg = C.apply_overrides(p.config, [(k, artifacts[k]) for k in p.requires])
    final = train(cfg, tmp_path / "w", progress=False)
    assert final["step"] == cfg.optim.total_steps
    assert (tmp_path / "w" / "checkpoint.pt").exists()
    train_recs = [r for r in read_metrics(tmp_path / "w") if r["kind"] == "train"]
    assert len(train_recs) == cfg.optim.total_steps and all(r["loss"] == r["loss"] for r in train_recs)
    if p.config.objective.name in ("rotation", "exemplar"):
        assert not any(k.endswith("top1") for k in final)  # no class head to evaluate
    else:
        assert 0.0 <= final["eval/top1"] <= 100.0 and final["eval/top5"] >= final["eval/top1"]


def test_the_paper_numbers_live_in_one_table():
    """training/paper.py is the one table of the paper's numbers: every preset row's number is
    built from it, and the rows' docstrings and docs/reproducing.md quote the same figures."""
    from pathlib import Path

    from s4l.training import paper

    reproducing = (Path(__file__).resolve().parents[1] / "docs" / "reproducing.md").read_text()
    for row in ROWS:
        if row.number == "-":
            continue
        figures = row.number.replace("top-5 ", "").replace("top-1 ", "").split(" / ")
        for fig in figures:
            assert fig in row.doc, (row.name, fig)
    for key, cols in paper.TABLE1.items():
        for col in ("10", "1"):
            assert f"{cols[f'top5_{col}']:.2f}" in reproducing, (key, col)
    assert {r.number for r in ROWS if r.table == "Table 2"} == {
        paper.number(paper.TABLE2, k) for k in paper.TABLE2}

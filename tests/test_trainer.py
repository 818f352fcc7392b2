"""The trainer's pieces (schedule, EMA, weight-decay scope, step plan) and its behaviour on real runs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from s4l.errors import UserError
from s4l.training import config as C
from s4l.training.checkpoint import read_checkpoint
from s4l.training.ema import EMA, ema_decay
from s4l.training.model import ModelSpec, build_model
from s4l.training.objectives import OBJECTIVES, build_objective
from s4l.training.presets import get_preset
from s4l.training.schedule import StepSchedule
from s4l.training.trainer import (
    TrainingDiverged,
    build_optimizer,
    make_plan,
    read_metrics,
    train,
)


def _cfg(preset: str = "supervised-10pct-smoke", **sets) -> C.TrainConfig:
    return C.apply_overrides(get_preset(preset).config, list(sets.items()))


# ----------------------------------------------------------------------------- pure pieces


def test_schedule_warms_up_linearly_from_zero_then_steps_down_by_ten():
    s = StepSchedule.from_epochs(0.1, steps_per_epoch=10, warmup_epochs=5,
                                 decay_epochs=(140, 160, 180), total_epochs=200)
    assert s.lr_at(0) == 0.0
    assert s.lr_at(25) == pytest.approx(0.05)
    assert s.lr_at(49) == pytest.approx(0.1 * 49 / 50)
    assert s.lr_at(50) == pytest.approx(0.1)
    assert s.lr_at(1399) == pytest.approx(0.1)
    assert s.lr_at(1400) == pytest.approx(0.01)
    assert s.lr_at(1600) == pytest.approx(0.001)
    assert s.lr_at(1800) == pytest.approx(0.0001)
    assert s.total_steps == 2000


def test_ema_decay_has_the_requested_half_life_and_averages():
    d = ema_decay(half_life_epochs=1.0, steps_per_epoch=100)
    assert d == pytest.approx(0.5 ** (1 / 100))
    assert d ** 100 == pytest.approx(0.5)
    lin = nn.Linear(2, 1, bias=False)
    nn.init.zeros_(lin.weight)
    ema = EMA(lin, d)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    for _ in range(100):
        ema.update(lin)
    # After one half-life the average has moved half way from 0 to 1.
    assert ema.module.weight.mean().item() == pytest.approx(0.5, abs=1e-5)


def test_weight_decay_only_on_conv_and_head_kernels():
    model = build_model(ModelSpec(width=0.0625, stem="small", heads={"classes": 3}))
    opt = build_optimizer(model, _cfg().optim)
    groups = {g["name"]: g for g in opt.param_groups}
    decayed = {id(p) for p in groups["kernels"]["params"]}
    assert groups["kernels"]["weight_decay"] == _cfg().optim.weight_decay
    assert groups["bn_and_biases"]["weight_decay"] == 0.0
    for name, p in model.named_parameters():
        is_kernel = name.endswith("weight") and p.dim() in (2, 4)
        assert (id(p) in decayed) == is_kernel, name
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["nesterov"] is False


def test_plan_counts_epochs_over_the_labelled_subset_and_checks_batches():
    cfg = _cfg("s4l-rotation-10pct-smoke")  # batch 8, ghost 4
    obj = build_objective("s4l-rotation", cfg.objective.objective_config(), 10)
    p = make_plan(cfg, obj, n_labelled=120, n_unlabelled=1428, world_size=1)
    assert p.steps_per_epoch == 15 and p.shards_per_process == 2
    assert (p.labelled_per_shard, p.unlabelled_per_shard) == (4, 4)
    p2 = make_plan(cfg, obj, n_labelled=120, n_unlabelled=1428, world_size=2)
    assert p2.shards_per_process == 1
    with pytest.raises(UserError, match="larger than the labelled set"):
        make_plan(cfg, obj, n_labelled=5, n_unlabelled=1428, world_size=1)
    with pytest.raises(UserError, match="cannot be split evenly over 4 processes"):
        make_plan(cfg, obj, n_labelled=120, n_unlabelled=1428, world_size=4)
    rot = build_objective("rotation", cfg.objective.objective_config(), 10)
    assert make_plan(cfg, rot, n_labelled=0, n_unlabelled=1428, world_size=1).steps_per_epoch == 178


# ----------------------------------------------------------------------------- real runs


def test_run_writes_config_metrics_tensorboard_and_reports_both_rotation_evals(tmp_path):
    cfg = _cfg("s4l-rotation-10pct-smoke", **{"optim.total_steps": 3, "eval.every_epochs": 0.1,
                                               "ema.half_life_epochs": 1.0})
    final = train(cfg, tmp_path, progress=False)
    assert C.load_json(tmp_path / "config.json") == cfg
    for split in ("eval", "heldout"):
        for k in ("top1", "top5", "top1_rotation_averaged", "top5_rotation_averaged"):
            assert 0.0 <= final[f"{split}/{k}"] <= 100.0
    assert final["eval/n"] == 64 and final["heldout/n"] == 10  # eval_limit, 1 per class
    assert final["used_ema"] is True
    recs = read_metrics(tmp_path)
    kinds = [r["kind"] for r in recs]
    assert kinds.count("train") == 3 and kinds.count("eval") == 1 and kinds[-1] == "final"
    tr = [r for r in recs if r["kind"] == "train"]
    assert tr[0]["lr"] == 0.0 and tr[1]["lr"] > 0.0  # warmup from 0
    assert {"loss", "loss_class", "loss_rotation", "acc_rotation", "images_per_s"} <= set(tr[0])
    # The logged rate counts every forwarded image, the 4 on-device rotations included (it
    # used to leave them out and read 4x low for the rotation family).
    per_step = OBJECTIVES[cfg.objective.name].forwarded_per_step(
        cfg.optim.batch_size, cfg.optim.unsup_batch_mult)[0]
    assert tr[0]["images_per_step"] == per_step
    assert json.loads((tmp_path / "final_metrics.json").read_text())["step"] == 3
    assert list((tmp_path / "tb").iterdir())


def test_bf16_autocast_and_channels_last_train(tmp_path):
    cfg = _cfg(**{"precision": "bf16", "channels_last": True, "optim.total_steps": 2})
    final = train(cfg, tmp_path, progress=False)
    assert final["step"] == 2
    state = read_checkpoint(tmp_path / "checkpoint.pt")["model"]
    assert all(v.dtype in (torch.float32, torch.int64) for v in state.values())


def test_nan_loss_stops_with_the_step_and_the_last_good_checkpoint(tmp_path):
    cfg = _cfg(**{"optim.lr": 1e30, "optim.warmup_epochs": 0.0, "optim.total_steps": 8,
                  "checkpoint.every_steps": 1})
    with pytest.raises(TrainingDiverged) as err:
        train(cfg, tmp_path, progress=False)
    msg = str(err.value)
    good = read_checkpoint(tmp_path / "checkpoint.pt")
    assert f"NaN/inf at step {good['step']}" in msg
    assert str(tmp_path / "checkpoint.pt") in msg and f"(step {good['step']})" in msg
    assert all(torch.isfinite(v.float()).all() for v in good["model"].values())


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="fewer than the 500 per class"):
        train(_cfg(**{"data.labels_per_class": 500}), tmp_path / "a", progress=False)
    with pytest.raises(UserError, match="larger than the labelled set"):
        train(_cfg(**{"optim.batch_size": 256, "bn.ghost_batch": None}), tmp_path / "b",
              progress=False)
    with pytest.raises(UserError, match="does not exist"):
        train(_cfg(**{"data.root": str(tmp_path / "nope")}), tmp_path / "c", progress=False)
    # Nothing was claimed: the corrected command runs in the same workdir.
    assert not (tmp_path / "c" / "config.json").exists()
    assert train(_cfg(**{"optim.total_steps": 1}), tmp_path / "c", progress=False)["step"] == 1


def test_image_folder_data_and_label_file(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_image_folder

    from s4l.datasets import write_label_map

    root = make_image_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=6)
    labels = tmp_path / "labels.json"
    write_label_map(labels, ["a/a_0000.jpg", "a/a_0001.jpg", "b/b_0000.jpg", "b/b_0001.jpg",
                             "c/c_0000.jpg", "c/c_0001.jpg"])
    cfg = _cfg("s4l-rotation-10pct-smoke", **{
        "data.root": str(root), "data.labels": str(labels), "data.labels_per_class": None,
        "data.val_per_class": 0, "optim.batch_size": 4, "bn.ghost_batch": 2,
        "optim.total_steps": 2, "data.eval_limit": None})
    final = train(cfg, tmp_path / "w", progress=False)
    assert final["eval/n"] == 18 and "heldout/n" not in final  # test split: 3 x 6
    ck = read_checkpoint(tmp_path / "w" / "checkpoint.pt")
    assert ck["class_names"] == ["a", "b", "c"]


def test_linear_on_a_pretrained_backbone_keeps_it_frozen_and_records_the_source(tmp_path):
    from s4l.training.checkpoint import file_sha256

    train(_cfg("rotation-pretrain-smoke"), tmp_path / "pre", progress=False)
    src = tmp_path / "pre" / "checkpoint.pt"
    pre = read_checkpoint(src)["model"]
    cfg = _cfg("rotation-linear-10pct-smoke", **{"init.checkpoint": str(src),
                                                 "optim.total_steps": 3})
    train(cfg, tmp_path / "lin", progress=False)
    ck = read_checkpoint(tmp_path / "lin" / "checkpoint.pt")
    for k, v in ck["model"].items():
        if k.startswith("backbone."):
            assert torch.equal(v, pre[k]), f"{k} changed under the linear objective"
    assert ck["provenance"]["init"]["sha256"] == file_sha256(src)
    assert "heads.classes.weight" in ck["model"] and "heads.rotation.weight" not in ck["model"]
    # Fine-tuning from the same checkpoint moves the backbone.
    cfg = _cfg("rotation-finetune-10pct-smoke", **{"init.checkpoint": str(src),
                                                   "optim.total_steps": 2,
                                                   "optim.warmup_epochs": 0.0})
    train(cfg, tmp_path / "ft", progress=False)
    ft = read_checkpoint(tmp_path / "ft" / "checkpoint.pt")["model"]
    assert not torch.equal(ft["backbone.stem.weight"], pre["backbone.stem.weight"])
    # A backbone of another width is refused with the spec named.
    bad = _cfg("rotation-linear-10pct-smoke", **{"init.checkpoint": str(src), "model.width": 0.125})
    with pytest.raises(UserError, match="model.width"):
        train(bad, tmp_path / "bad", progress=False)


def test_cli_train_writes_the_workdir(tmp_path):
    from s4l.cli import main

    rc = main(["train", "--preset", "vat-10pct-smoke", "--data", "builtin:digits",
               "--workdir", str(tmp_path), "--labels-per-class", "10", "--no-progress",
               "--set", "optim.total_steps=2"])
    assert rc == 0
    cfg = C.load_json(tmp_path / "config.json")
    assert cfg.data.labels_per_class == 10 and cfg.optim.total_steps == 2
    assert math.isfinite(json.loads((tmp_path / "final_metrics.json").read_text())["eval/top1"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_channels_last_compile_and_sync_bn(tmp_path):
    cfg = _cfg("moam-step1-smoke", **{"precision": "bf16", "channels_last": True,
                                      "compile": True, "optim.total_steps": 3})
    final = train(cfg, tmp_path, device="cuda", progress=False)
    assert final["step"] == 3 and math.isfinite(final["eval/top1"])
    ck = read_checkpoint(tmp_path / "checkpoint.pt")
    assert all(v.device.type == "cpu" for v in ck["model"].values())

"""s4l.training.data: resumable DDP-aware streams, corrupt-image policy, eval loader."""

from __future__ import annotations

import io
import itertools
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from support.images import make_image_folder

from s4l.datasets import open_source, training_subsets
from s4l.errors import UserError
from s4l.imaging import PreprocessSpec, eval_crop
from s4l.training import data as D
from s4l.training.transforms import TrainTransform, to_model_input


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """3 classes x 8 train images (32 px JPEGs) and 3 x 2 test images."""
    root = make_image_folder(tmp_path / "d", splits=("train",), per_class=8)
    return make_image_folder(root, splits=("test",), per_class=2, seed=1)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _equal_batches(a, b) -> bool:
    for (la, ua), (lb, ub) in zip(a, b, strict=True):
        if not (torch.equal(la[0], lb[0]) and torch.equal(la[1], lb[1])):
            return False
        if (ua is None) != (ub is None):
            return False
        if ua is not None and not (torch.equal(ua[0], ub[0]) and torch.equal(ua[1], ub[1])):
            return False
    return True


def _loaders(folder, **kw):
    src = open_source(folder, "train")
    sub = training_subsets(src, labels_per_class=4, label_seed=0)  # 12 labelled of 24
    args = dict(batch_size=4, unsup_batch_size=6, image_size=16, seed=5, workers=0)
    args.update(kw)
    return D.make_train_loaders(src, sub.labelled, **args), src, sub


# --------------------------------------------------------------------------------------------
# Sampler


def test_sampler_epochs_are_permutations_and_deterministic():
    s = D.GlobalBatchSampler(10, 3, seed=1)
    assert s.steps_per_epoch == 3
    batches = list(itertools.islice(iter(s), 7))
    assert all(len(b) == 3 for b in batches)
    for e in (0, 1):
        keys = [k for b in batches[3 * e:3 * e + 3] for k in b]
        assert {ep for ep, _ in keys} == {e}
        assert len({p for _, p in keys}) == 9  # no repeat inside an epoch (1 left over, dropped)
    assert batches[:3] != batches[3:6]  # a new permutation each epoch
    assert batches == list(itertools.islice(iter(D.GlobalBatchSampler(10, 3, seed=1)), 7))
    assert batches != list(itertools.islice(iter(D.GlobalBatchSampler(10, 3, seed=2)), 7))
    s.start = (1, 2)
    assert next(iter(s)) == batches[5]


def test_rank_slices_concatenate_to_the_global_batch():
    one = list(itertools.islice(iter(D.GlobalBatchSampler(50, 8, seed=3)), 14))  # crosses epochs
    for world in (2, 4):
        ranks = [list(itertools.islice(iter(D.GlobalBatchSampler(50, 8, seed=3, rank=r, world_size=world)), 14))
                 for r in range(world)]
        for step in range(14):
            assert sum((ranks[r][step] for r in range(world)), []) == one[step]


def test_rank_batches_equal_the_single_process_batch(folder):
    single, _, _ = _loaders(folder)
    ref = _take(iter(single), 4)
    parts = []
    for rank in (0, 1):
        d, _, _ = _loaders(folder, rank=rank, world_size=2)
        parts.append(_take(iter(d), 4))
    for step in range(4):
        (xl, yl), (xu, yu) = ref[step]
        assert parts[0][step][0][0].shape[0] == 2 and parts[0][step][1][0].shape[0] == 3
        assert torch.equal(torch.cat([parts[r][step][0][0] for r in (0, 1)]), xl)
        assert torch.equal(torch.cat([parts[r][step][0][1] for r in (0, 1)]), yl)
        assert torch.equal(torch.cat([parts[r][step][1][0] for r in (0, 1)]), xu)


# --------------------------------------------------------------------------------------------
# Streams


def test_stream_shapes_labels_and_unlabelled_is_whole_split(folder):
    data, src, sub = _loaders(folder)
    assert data.steps_per_epoch == 3 and data.classes == ["a", "b", "c"]
    assert len(data.unlabelled.dataset) == len(src) == 24  # the WHOLE split, labelled included
    (xl, yl), (xu, yu) = next(iter(data))
    assert xl.shape == (4, 1, 3, 16, 16) and xl.dtype == torch.float32
    assert xu.shape == (6, 1, 3, 16, 16)
    assert float(xl.min()) >= -1 and float(xl.max()) <= 1
    assert yu.tolist() == [-1] * 6
    labelled_labels = {src.label(i) for i in sub.labelled}
    assert set(yl.tolist()) <= labelled_labels
    # Each labelled epoch visits each labelled image once.
    seen = []
    lab_ds = data.labelled.dataset
    for keys in itertools.islice(iter(data.labelled.sampler), 3):
        seen += [int(lab_ds.indices[p]) for _, p in keys]
    assert sorted(seen) == sub.labelled


def test_exemplar_copies_and_label_override(folder):
    src = open_source(folder, "train")
    override = np.full(len(src), 2)
    data = D.make_train_loaders(src, list(range(len(src))), batch_size=3, image_size=16, copies=8,
                                hsv_noise=True, workers=0, labels=override)
    (x, y), unl = next(iter(data))
    assert unl is None and x.shape == (3, 8, 3, 16, 16) and y.tolist() == [2, 2, 2]
    assert not torch.equal(x[0, 0], x[0, 1])
    with pytest.raises(UserError, match="label override has shape"):
        D.make_train_loaders(src, [0], batch_size=1, labels=[1, 2])


def test_hsv_on_device_batches(folder):
    from s4l.training.transforms import apply_deferred_hsv

    src = open_source(folder, "train")
    kw = dict(batch_size=3, unsup_batch_size=3, image_size=16, copies=2, hsv_noise=True, workers=0)
    (xl, yl), (xu, _) = next(iter(D.make_train_loaders(src, list(range(12)), **kw)))
    (dl, dyl, pl), (du, _, pu) = next(iter(D.make_train_loaders(src, list(range(12)),
                                                                hsv_on_device=True, **kw)))
    assert pl.shape == (3, 2, 7) and torch.equal(dyl, yl)
    torch.testing.assert_close(apply_deferred_hsv(dl, pl), xl, atol=1e-4, rtol=0)
    torch.testing.assert_close(apply_deferred_hsv(du, pu), xu, atol=1e-4, rtol=0)


def test_resume_gives_the_same_batches(folder):
    data, _, _ = _loaders(folder)
    it = iter(data)
    _take(it, 5)
    state = data.state_dict()
    assert state["labelled"]["epoch"] == 1 and state["labelled"]["batch"] == 2
    expected = _take(it, 4)  # crosses the labelled epoch boundary
    # The state survives torch.save (it goes into the checkpoint).
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    resumed, _, _ = _loaders(folder)
    resumed.load_state_dict(torch.load(buf))
    assert _equal_batches(_take(iter(resumed), 4), expected)
    # A fresh run starts elsewhere: the check above can fail.
    fresh, _, _ = _loaders(folder)
    assert not _equal_batches(_take(iter(fresh), 4), expected)


def test_worker_count_does_not_change_batches(folder):
    ref = _take(iter(_loaders(folder)[0]), 3)
    data, _, _ = _loaders(folder, workers=2)
    it = iter(data)
    assert _equal_batches(_take(it, 3), ref)
    # The saved position is what the caller consumed, not what workers prefetched.
    assert data.state_dict()["labelled"]["batch"] == 0 and data.state_dict()["labelled"]["epoch"] == 1
    assert data.state_dict()["unlabelled"]["batch"] == 3


def test_resume_refuses_a_different_stream(folder):
    data, _, _ = _loaders(folder)
    _take(iter(data), 2)
    state = data.state_dict()
    other, _, _ = _loaders(folder, seed=6)
    with pytest.raises(UserError, match=r"cannot resume the labelled stream exactly.*seed \(5 vs 6\)"):
        other.load_state_dict(state)
    bigger, _, _ = _loaders(folder, batch_size=6)
    with pytest.raises(UserError, match=r"global_batch \(4 vs 6\)"):
        bigger.load_state_dict(state)
    nounl, _, _ = _loaders(folder, unsup_batch_size=0)
    with pytest.raises(UserError, match="unlabelled stream"):
        nounl.load_state_dict(state)
    with pytest.raises(UserError, match="malformed"):
        data.load_state_dict({})
    # Same sizes, different images: another labelled subset of the same size.
    src = open_source(folder, "train")
    sub = training_subsets(src, labels_per_class=4, label_seed=1)
    moved = D.make_train_loaders(src, sub.labelled, batch_size=4, unsup_batch_size=6,
                                 image_size=16, seed=5, workers=0)
    with pytest.raises(UserError, match="a different list of the same size"):
        moved.load_state_dict(state)


def test_bad_batch_and_subset_errors(folder):
    src = open_source(folder, "train")
    with pytest.raises(UserError, match=r"batch size 13 is larger than the labelled stream \(12 images\)"):
        D.make_train_loaders(src, list(range(12)), batch_size=13, workers=0)
    with pytest.raises(UserError, match="labelled subset is empty"):
        D.make_train_loaders(src, [], batch_size=1, workers=0)
    with pytest.raises(UserError, match="not divisible by the world size 2"):
        D.make_train_loaders(src, list(range(12)), batch_size=3, world_size=2, workers=0)
    with pytest.raises(UserError, match=r"batch size 25 is larger than the unlabelled stream \(24"):
        D.make_train_loaders(src, list(range(12)), batch_size=2, unsup_batch_size=25, workers=0)


# --------------------------------------------------------------------------------------------
# Corrupt images


def _corrupt(src, i: int) -> None:
    p = Path(src.path(i))
    p.write_bytes(p.read_bytes()[:120])


def test_corrupt_training_image_is_skipped_deterministically(folder, caplog):
    src = open_source(folder, "train")
    _corrupt(src, 5)
    tf = TrainTransform(size=16)
    ds = D.TrainDataset(src, list(range(len(src))), tf, seed=0, stream=D.LABELLED)
    with caplog.at_level(logging.WARNING, logger="s4l.training.data"):
        x, y = ds[(2, 5)]
    assert ds.skipped == 1
    assert any(src.path(5) in r.getMessage() for r in caplog.records)
    # Replaced by the next image of the stream, augmented with the original key's generator.
    assert y == src.label(6)
    assert torch.equal(x, tf(src.load(6), D.augment_rng(0, D.LABELLED, 2, 5)))
    # Through the loader: every batch stays full.
    data = D.make_train_loaders(src, list(range(len(src))), batch_size=8, image_size=16, workers=0)
    for (xb, yb), _ in itertools.islice(iter(data), 3):
        assert xb.shape[0] == 8 and (yb >= 0).all()
    assert data.skipped() == 1


def test_all_corrupt_is_an_error(folder):
    src = open_source(folder, "train")
    for i in range(len(src)):
        _corrupt(src, i)
    ds = D.TrainDataset(src, list(range(len(src))), TrainTransform(size=16), seed=0, stream=0,
                        max_skips=4)
    with pytest.raises(UserError, match="5 consecutive training images"):
        ds[(0, 0)]


# --------------------------------------------------------------------------------------------
# Eval loader


def test_eval_loader(folder, caplog):
    src = open_source(folder, "test")
    spec = PreprocessSpec(resize=20, crop=16)
    ev = D.make_eval_loader(src, spec=spec, batch_size=4)
    xs, ys = zip(*ev)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (6, 1, 3, 16, 16) and y.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(x[3, 0], to_model_input(eval_crop(src.load(3), spec)))
    # Sharded over 2 ranks: every image exactly once.
    shards = [torch.cat([b[1] for b in D.make_eval_loader(src, spec=spec, batch_size=2, rank=r,
                                                         world_size=2)]) for r in (0, 1)]
    assert sorted(torch.cat(shards).tolist()) == [0, 0, 1, 1, 2, 2]
    assert len(D.make_eval_loader(src, [4, 5, 0], spec=spec, limit=2).dataset) == 2
    _corrupt(src, 2)
    ev = D.make_eval_loader(src, spec=spec, batch_size=6)
    with caplog.at_level(logging.WARNING, logger="s4l.training.data"):
        x, y = next(iter(ev))
    assert y.tolist() == [0, 0, -1, 1, 2, 2] and (x[2] == 0).all()
    assert [p for p, _ in ev.dataset.errors] == [src.path(2)]
    with pytest.raises(UserError, match="nothing to evaluate"):
        D.make_eval_loader(src, [], spec=spec)


def test_digits_pipeline_end_to_end():
    src = open_source("builtin:digits", "train")
    sub = training_subsets(src, labels_per_class=5, val_per_class=2)
    data = D.make_train_loaders(src, sub.labelled, sub.unlabelled, batch_size=10,
                                unsup_batch_size=20, image_size=32, workers=0)
    (xl, yl), (xu, _) = next(iter(data))
    assert xl.shape == (10, 1, 3, 32, 32) and xu.shape == (20, 1, 3, 32, 32)
    assert data.steps_per_epoch == 5
    ev = D.make_eval_loader(src, sub.val, spec=PreprocessSpec(32, 32), batch_size=32)
    x, y = next(iter(ev))
    assert x.shape == (20, 1, 3, 32, 32) and sorted(y.tolist()) == sorted(list(range(10)) * 2)

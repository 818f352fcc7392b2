"""Small-validation-set study: statistics on known correctness matrices, and the command end to end."""

from __future__ import annotations

import numpy as np
import pytest
from s4l.evaluation.val_study import balanced_draw, model_names, study

from s4l.errors import UserError


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

"""The pure loss functions of the objectives against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from s4l.training.objectives.losses import (
    accuracy,
    batch_hard_triplet,
    cross_entropy,
    entropy,
    exemplar_identities,
    flatten_copies,
    kl_divergence,
    rotate_copies,
    vat_kl,
)


def test_rotate_copies_counter_clockwise_image_major():
    img = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    other = img + 10
    batch = torch.stack([img, other])[:, None]  # [2, 1, 2, 2]
    rotated, labels = rotate_copies(batch)
    assert rotated.shape == (8, 1, 2, 2)
    assert labels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    # k * 90 degrees counter-clockwise: the top-right pixel (2) moves to the top-left first.
    expected = [
        [[1, 2], [3, 4]],
        [[2, 4], [1, 3]],
        [[4, 3], [2, 1]],
        [[3, 1], [4, 2]],
    ]
    for k in range(4):
        assert rotated[k, 0].tolist() == expected[k]
        assert (rotated[4 + k, 0] - 10).tolist() == expected[k]


def test_rotate_copies_rejects_non_square_and_wrong_rank():
    with pytest.raises(ValueError, match="square"):
        rotate_copies(torch.zeros(2, 3, 4, 5))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        rotate_copies(torch.zeros(3, 4, 4))


def test_flatten_copies_keeps_copies_of_an_image_consecutive():
    x = torch.arange(2 * 3).float().reshape(2, 3, 1, 1, 1).expand(2, 3, 3, 2, 2)
    flat = flatten_copies(x)
    assert flat.shape == (6, 3, 2, 2)
    assert flat[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError):
        flatten_copies(torch.zeros(2, 3, 4, 4))


def test_entropy_known_values():
    uniform = torch.zeros(1, 4)
    assert entropy(uniform).item() == pytest.approx(math.log(4), abs=1e-6)
    p = torch.tensor([[0.5, 0.25, 0.25]])
    # -(0.5 ln 0.5 + 2 * 0.25 ln 0.25) = 1.5 ln 2
    assert entropy(p.log()).item() == pytest.approx(1.5 * math.log(2), abs=1e-6)
    # mean over images
    both = torch.cat([uniform[:, :3], p.log()])
    assert entropy(both).item() == pytest.approx(0.5 * (math.log(3) + 1.5 * math.log(2)), abs=1e-6)
    # bf16 logits are evaluated in float32
    assert entropy(uniform.bfloat16()).dtype == torch.float32


def test_kl_direction_switch_gives_the_two_known_values():
    p = torch.tensor([[0.5, 0.5]])  # perturbed prediction
    q = torch.tensor([[0.9, 0.1]])  # clean prediction
    kl_pq = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # 0.5108
    kl_qp = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)  # 0.3681
    assert vat_kl(p.log(), q.log(), "perturbed_clean").item() == pytest.approx(kl_pq, abs=1e-6)
    assert vat_kl(p.log(), q.log(), "clean_perturbed").item() == pytest.approx(kl_qp, abs=1e-6)
    assert kl_divergence(p.log(), q.log()).shape == (1,)
    with pytest.raises(ValueError, match="direction"):
        vat_kl(p.log(), q.log(), "sideways")


def test_vat_kl_treats_the_clean_prediction_as_constant():
    perturbed = torch.tensor([[0.3, -0.2, 0.1]], requires_grad=True)
    clean = torch.tensor([[1.0, 0.0, -1.0]], requires_grad=True)
    for direction in ("perturbed_clean", "clean_perturbed"):
        perturbed.grad = None
        vat_kl(perturbed, clean, direction).backward()
        assert clean.grad is None
        assert perturbed.grad is not None and perturbed.grad.abs().sum() > 0


def test_cross_entropy_and_accuracy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    ce = [math.log(1 + math.exp(-2.0))] * 2 + [math.log(1 + math.exp(2.0))]
    assert cross_entropy(logits, labels).item() == pytest.approx(sum(ce) / 3, abs=1e-6)
    assert accuracy(logits, labels).item() == pytest.approx(2 / 3)


def _unit(angle_deg: float, scale: float = 1.0) -> list[float]:
    a = math.radians(angle_deg)
    return [scale * math.cos(a), scale * math.sin(a), 0.0]


def test_batch_hard_triplet_on_a_constructed_example():
    # Identity 0 at 0, 30, 60 degrees; identity 1 at 180, 200 degrees on the unit circle, given
    # with different norms (the loss normalises). Euclidean distance between unit vectors an
    # angle D apart is 2 sin(D / 2). By hand, per anchor (hardest positive = farthest same id,
    # hardest negative = closest other id):
    #   0deg:   pos 60deg  (D=60)  neg 200deg (D=160)
    #   30deg:  pos 0/60   (D=30)  neg 180deg (D=150)
    #   60deg:  pos 0deg   (D=60)  neg 180deg (D=120)
    #   180deg: pos 200deg (D=20)  neg 60deg  (D=120)
    #   200deg: pos 180deg (D=20)  neg 60deg  (D=140)
    emb = torch.tensor(
        [_unit(0, 3.0), _unit(30, 0.5), _unit(60), _unit(180, 2.0), _unit(200, 7.0)]
    )
    ids = torch.tensor([0, 0, 0, 1, 1])

    def chord(d):
        return 2 * math.sin(math.radians(d) / 2)

    pairs = [(60, 160), (30, 150), (60, 120), (20, 120), (20, 140)]
    expected = sum(math.log1p(math.exp(chord(p) - chord(n))) for p, n in pairs) / 5
    assert batch_hard_triplet(emb, ids).item() == pytest.approx(expected, abs=1e-5)
    # Relabelling so that 60deg belongs to identity 1 changes the hard pairs: not a constant.
    other = batch_hard_triplet(emb, torch.tensor([0, 0, 1, 1, 1])).item()
    assert abs(other - expected) > 1e-2


def test_batch_hard_triplet_is_finite_for_identical_copies_and_checks_identities():
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], requires_grad=True)
    loss = batch_hard_triplet(emb, torch.tensor([0, 0, 1, 1]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(emb.grad).all()
    # d_pos = 0, d_neg = sqrt(2)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-math.sqrt(2))), abs=1e-5)
    with pytest.raises(ValueError, match="at least 2 identities"):
        batch_hard_triplet(emb.detach(), torch.tensor([0, 0, 0, 0]))
    with pytest.raises(ValueError, match="at least 2 embeddings"):
        batch_hard_triplet(emb.detach(), torch.tensor([0, 0, 1, 2]))
    with pytest.raises(ValueError):
        batch_hard_triplet(emb.detach(), torch.tensor([0, 1]))


def test_exemplar_identities_and_the_release_grouping_bug():
    # 3 images x 2 copies, image-major: one image = one identity.
    assert exemplar_identities(3, 2).tolist() == [0, 0, 1, 1, 2, 2]
    # The release's swapped arguments: `copies` identities of `num_images` consecutive rows.
    assert exemplar_identities(3, 2, grouping_bug=True).tolist() == [0, 0, 0, 1, 1, 1]
    assert exemplar_identities(4, 8, grouping_bug=True).tolist() == [i // 4 for i in range(32)]
    # Only right when num_images == copies (8 images per device at 8 copies).
    assert torch.equal(exemplar_identities(8, 8), exemplar_identities(8, 8, grouping_bug=True))
    with pytest.raises(ValueError):
        exemplar_identities(0, 8)

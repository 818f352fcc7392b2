"""Pure loss and metric functions shared by the objectives (no model, no state).

Each function is a function of tensors only, computed in float32 whatever the input dtype (so
bf16 autocast outputs do not lose the loss's precision), and reduces by a mean over the local
batch: with equal per-process batch sizes, DDP's gradient averaging then gives the gradient of
the global-batch mean (S4L_REFERENCE.md section 5, "a 1/world_size slip"). The batch-hard
triplet loss is the exception: its hard positives/negatives are mined within the batch it is
given, i.e. per device, exactly as the release computes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NUM_ROTATIONS = 4
KL_DIRECTIONS = ("perturbed_clean", "clean_perturbed")
HESSIAN_PRODUCTS = ("finite_difference", "forward_mode")  # VAT power method, see vat.py


def flatten_copies(images: torch.Tensor) -> torch.Tensor:
    """[B, K, C, H, W] -> [B*K, C, H, W]; the K copies of one image stay consecutive."""
    if images.dim() != 5:
        raise ValueError(f"expected images [B, K, C, H, W], got shape {tuple(images.shape)}")
    return images.reshape(images.shape[0] * images.shape[1], *images.shape[2:])


def rotate_copies(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All 4 exact rot90 rotations of every image: [N, C, H, W] -> ([4N, C, H, W], labels [4N]).

    S4L_REFERENCE.md section 1/3 (the release's `rotate` preprocessing): rotation label k means
    the image turned by k*90 degrees counter-clockwise (`torch.rot90(x, k, dims=(-2, -1))`, the
    same sense as `tf.image.rot90`). Layout is image-major like the release's [B, R] batches
    folded into the batch dimension: rows 4i..4i+3 are image i at 0, 90, 180, 270 degrees, so
    the labels are [0, 1, 2, 3, 0, 1, 2, 3, ...]. Runs on the images' device.
    """
    if images.dim() != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(images.shape)}")
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(
            f"rotation needs square images so the 4 rotations stack, got {tuple(images.shape[-2:])}"
        )
    n = images.shape[0]
    rotated = torch.stack(
        [torch.rot90(images, k, dims=(-2, -1)) for k in range(NUM_ROTATIONS)], dim=1
    )
    labels = torch.arange(NUM_ROTATIONS, device=images.device).repeat(n)
    return rotated.reshape(n * NUM_ROTATIONS, *images.shape[1:]), labels


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float32, or float64 when given float64 (never narrower than float32)."""
    return t if t.dtype == torch.float64 else t.float()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy over the batch, in float32."""
    return F.cross_entropy(_wide(logits), labels)


@torch.no_grad()
def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy as a 0-d float tensor (no host synchronisation)."""
    return (logits.argmax(dim=-1) == labels).float().mean()


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy minimisation term: mean over images of -sum_c p_c log p_c (float32).

    S4L_REFERENCE.md section 3 ("Entropy minimisation"), on clean predictions; gradients flow
    through the logits.
    """
    logp = F.log_softmax(_wide(logits), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1).mean()


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Per-row KL[softmax(p_logits) || softmax(q_logits)] (float32 or wider), shape [N]."""
    logp = F.log_softmax(_wide(p_logits), dim=-1)
    logq = F.log_softmax(_wide(q_logits), dim=-1)
    return (logp.exp() * (logp - logq)).sum(dim=-1)


def vat_kl(
    perturbed_logits: torch.Tensor, clean_logits: torch.Tensor, direction: str = "perturbed_clean"
) -> torch.Tensor:
    """VAT divergence, mean over images; the clean prediction is treated as a constant.

    direction "perturbed_clean" (the release's `kl_divergence_from_logits(net(x + r), logits)`):
    KL[p(x + r) || p(x)]. "clean_perturbed": KL[p(x) || p(x + r)], the direction of Miyato et
    al.'s code and most PyTorch libraries. Both have the same second-order behaviour at r = 0, so
    the power iteration finds the same direction; the loss values differ.
    """
    clean = clean_logits.detach()
    if direction == "perturbed_clean":
        return kl_divergence(perturbed_logits, clean).mean()
    if direction == "clean_perturbed":
        return kl_divergence(clean, perturbed_logits).mean()
    raise ValueError(f"unknown KL direction {direction!r}; valid: {', '.join(KL_DIRECTIONS)}")


def exemplar_identities(
    num_images: int, copies: int, grouping_bug: bool = False, device: torch.device | None = None
) -> torch.Tensor:
    """Identity label of each embedding in a [num_images * copies] stream of exemplar copies.

    The stream is image-major (rows i*copies .. i*copies+copies-1 are the copies of image i), so
    the intended identity is `j // copies`: one source image = one identity.

    grouping_bug=True reproduces the release (`exemplar.py`): it calls
    `do_triplet(embeddings, ninstances, nexamples)` against the signature
    `do_triplet(embeddings, nexamples, ninstances)`, so its labels are
    `repeat(range(copies), num_images)`, i.e. identity `j // num_images`: `copies` identities,
    each a block of `num_images` consecutive embeddings (copies of num_images/copies different
    images when num_images > copies). The two agree only when num_images == copies (8 images
    per device at 8 copies).
    """
    if num_images < 1 or copies < 1:
        raise ValueError(f"need num_images >= 1 and copies >= 1, got {num_images}, {copies}")
    index = torch.arange(num_images * copies, device=device)
    return index // (num_images if grouping_bug else copies)


def batch_hard_triplet(embeddings: torch.Tensor, identities: torch.Tensor) -> torch.Tensor:
    """Batch-hard soft-margin triplet loss (Hermans et al. 2017) as S4L-Exemplar uses it.

    S4L_REFERENCE.md section 3: embeddings are L2-normalised (here, inside), distance is
    Euclidean; for each anchor the hardest positive is the farthest OTHER embedding of the same
    identity and the hardest negative the closest embedding of another identity; loss =
    softplus(d_pos - d_neg) (soft margin, margin 0), mean over anchors. Distances come from the
    Gram matrix (||a - b||^2 = 2 - 2 a.b for unit vectors) with the square root cut at 1e-12,
    as the release's `_stable_norm`, so gradients stay finite at distance 0.
    """
    if embeddings.dim() != 2 or identities.shape != embeddings.shape[:1]:
        raise ValueError(
            f"need embeddings [N, D] and identities [N], got {tuple(embeddings.shape)} "
            f"and {tuple(identities.shape)}"
        )
    # The masks are built and checked on the host (identities are tiny and usually made there)
    # so a GPU step does not wait on a device-to-host copy.
    ids = identities.cpu()
    same = ids[:, None] == ids[None, :]
    positive = same & ~torch.eye(len(ids), dtype=torch.bool)
    negative = ~same
    if not bool(positive.any(dim=1).all()):
        raise ValueError("every identity needs at least 2 embeddings for a hardest positive")
    if not bool(negative.any(dim=1).all()):
        raise ValueError("the batch needs at least 2 identities for a hardest negative")
    positive = positive.to(embeddings.device, non_blocking=True)
    negative = negative.to(embeddings.device, non_blocking=True)
    emb = F.normalize(embeddings.float(), dim=-1)
    sq = (2.0 - 2.0 * emb @ emb.t()).clamp_min(0.0)
    dist = sq.clamp_min(1e-12).sqrt()
    d_pos = dist.masked_fill(~positive, float("-inf")).amax(dim=1)
    d_neg = dist.masked_fill(~negative, float("inf")).amin(dim=1)
    return F.softplus(d_pos - d_neg).mean()

"""The one-to-one map from a release TF-Hub module's variable names to s4l's ResNet50v2 state dict.

Names follow the release's `models/resnet.py` (`resnet50` v2, bottleneck units) and
`semi_supervised/utils.py` (`apply_model_semi`: one 1x1-conv head per output on `pre_logits`),
as they appear inside an exported module (no `module/` prefix):

    root_block/conv2d/kernel                          [7,7,3,R]      -> backbone.stem.weight
    block{s}/unit{u}/{BN}/*                           (pre-activation) -> ...norm1
    block{s}/unit{u}/proj/conv2d/kernel               (first unit)    -> ...downsample.weight
    block{s}/unit{u}/a/conv2d/kernel                                  -> ...conv1.weight
    block{s}/unit{u}/b/{BN}/*, b/conv2d/kernel                        -> ...norm2, conv2
    block{s}/unit{u}/c/{BN}/*, c/conv2d/kernel                        -> ...norm3, conv3
    {BN}/*                                            (after block4)  -> backbone.norm
    classes|rotations|embeddings/{kernel [1,1,C,N], bias}             -> heads.classes|rotation|embedding

{BN} is `batch_normalization` (tf.layers) or `batch_norm` (the release's tpu_ops
`cross_replica_batch_norm`, used by MOAM / rotation_vat); its variables gamma, beta, moving_mean,
moving_variance become weight, bias, running_mean, running_var. Kernels are HWIO, turned OIHW; a
head's [1,1,C,N] kernel is a Linear [N,C] weight. R = 16 * filters_factor = 64 * width.

`plan(shapes)` checks a module's whole variable list before a byte of weights is read: every
variable must be expected, every expected one present, every shape right; anything else is
refused by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from s4l.errors import UserError

STAGE_UNITS = (3, 4, 6, 3)
BN_SCOPES = ("batch_normalization", "batch_norm")
BN_VARS = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
           "moving_variance": "running_var"}
HEADS = {"classes": "classes", "rotations": "rotation", "embeddings": "embedding"}
ROOT_KERNEL = "root_block/conv2d/kernel"
# family names, by the heads a module has (the release's tasks and what their modules export)
FAMILIES = {
    frozenset({"classes"}): "supervised / pseudo-labels / VAT (classes head only)",
    frozenset({"classes", "rotations"}): "S4L-Rotation or MOAM step 1 (classes + rotations)",
    frozenset({"classes", "embeddings"}): "S4L-Exemplar (classes + embeddings)",
}


@dataclasses.dataclass(frozen=True)
class Target:
    key: str  # s4l state-dict key
    shape: tuple[int, ...]  # the TF shape expected
    kind: str  # "conv", "head_kernel", "vector"


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a module is and how each of its variables lands in the s4l model."""

    width: float
    filters_factor: int
    bn_scope: str
    heads: dict[str, int]  # s4l head name -> outputs
    targets: dict[str, Target]  # TF name -> target

    @property
    def family(self) -> str:
        tf_heads = frozenset(k for k, v in HEADS.items() if v in self.heads)
        return FAMILIES.get(tf_heads, "unknown")


def _bn(targets: dict[str, Target], tf_scope: str, key: str, channels: int, bn: str) -> None:
    for tf_var, torch_var in BN_VARS.items():
        name = f"{tf_scope}/{bn}/{tf_var}" if tf_scope else f"{bn}/{tf_var}"
        targets[name] = Target(f"{key}.{torch_var}", (channels,), "vector")


def expected(root: int, bn: str, heads: Mapping[str, int]) -> dict[str, Target]:
    """Every variable a release module of this width/BN scope/heads holds."""
    t: dict[str, Target] = {ROOT_KERNEL: Target("backbone.stem.weight", (7, 7, 3, root), "conv")}
    cin = root
    for s, units in enumerate(STAGE_UNITS):
        cout = root * 4 * 2**s
        mid = cout // 4
        for u in range(units):
            scope, key = f"block{s + 1}/unit{u + 1}", f"backbone.stages.{s}.{u}"
            _bn(t, scope, f"{key}.norm1", cin, bn)
            if u == 0:
                t[f"{scope}/proj/conv2d/kernel"] = Target(f"{key}.downsample.weight",
                                                          (1, 1, cin, cout), "conv")
            t[f"{scope}/a/conv2d/kernel"] = Target(f"{key}.conv1.weight", (1, 1, cin, mid), "conv")
            _bn(t, f"{scope}/b", f"{key}.norm2", mid, bn)
            t[f"{scope}/b/conv2d/kernel"] = Target(f"{key}.conv2.weight", (3, 3, mid, mid), "conv")
            _bn(t, f"{scope}/c", f"{key}.norm3", mid, bn)
            t[f"{scope}/c/conv2d/kernel"] = Target(f"{key}.conv3.weight", (1, 1, mid, cout), "conv")
            cin = cout
    _bn(t, "", "backbone.norm", cin, bn)
    for tf_head, n in heads.items():
        name = HEADS[tf_head]
        t[f"{tf_head}/kernel"] = Target(f"heads.{name}.weight", (1, 1, cin, n), "head_kernel")
        t[f"{tf_head}/bias"] = Target(f"heads.{name}.bias", (n,), "vector")
    return t


def _examples(names, k: int = 4) -> str:
    names = sorted(names)
    more = f" and {len(names) - k} more" if len(names) > k else ""
    return ", ".join(names[:k]) + more


def plan(shapes: Mapping[str, tuple[int, ...]], what: str = "module") -> Plan:
    """Check a module's variable names and shapes; say how to map them, or refuse by name."""
    if ROOT_KERNEL not in shapes:
        raise UserError(f"{what}: no {ROOT_KERNEL!r}; not a ResNet50v2 module of the S4L release "
                        f"(it holds {_examples(shapes)})")
    rk = tuple(shapes[ROOT_KERNEL])
    if len(rk) != 4 or rk[:3] != (7, 7, 3) or rk[3] < 16 or rk[3] % 16:
        raise UserError(f"{what}: {ROOT_KERNEL} has shape {list(rk)}; expected [7, 7, 3, 16*k] "
                        "(the release's root conv with filters_factor k)")
    root = rk[3]
    scopes = {bn for bn in BN_SCOPES for n in shapes
              if n == f"{bn}/gamma" or n.endswith(f"/{bn}/gamma")}
    if len(scopes) != 1:
        raise UserError(f"{what}: expected one batch-norm scope (batch_normalization or "
                        f"batch_norm), found {sorted(scopes) or 'none'}")
    bn = scopes.pop()
    heads: dict[str, int] = {}
    for tf_head in HEADS:
        k = shapes.get(f"{tf_head}/kernel")
        if k is not None:
            if len(k) != 4 or k[:2] != (1, 1) or k[3] < 1:
                raise UserError(f"{what}: head {tf_head}/kernel has shape {list(k)}; expected "
                                "[1, 1, features, outputs]")
            heads[tf_head] = int(k[3])
    targets = expected(root, bn, heads)
    extra = set(shapes) - set(targets)
    missing = set(targets) - set(shapes)
    if extra:
        raise UserError(f"{what}: {len(extra)} variable(s) the S4L ResNet50v2 mapping does not "
                        f"know: {_examples(extra)}; refusing a partial import")
    if missing:
        raise UserError(f"{what}: {len(missing)} variable(s) missing: {_examples(missing)}")
    bad = sorted(n for n, t in targets.items() if tuple(shapes[n]) != t.shape)
    if bad:
        n = bad[0]
        raise UserError(f"{what}: {len(bad)} variable(s) of the wrong shape, e.g. {n} is "
                        f"{list(shapes[n])}, expected {list(targets[n].shape)} for a root width "
                        f"of {root}")
    return Plan(width=root / 64, filters_factor=root // 16, bn_scope=bn,
                heads={HEADS[h]: n for h, n in heads.items()}, targets=targets)


def to_torch_layout(value: np.ndarray, target: Target) -> np.ndarray:
    """TF layout -> PyTorch layout (a new contiguous array for kernels)."""
    if target.kind == "conv":
        return np.ascontiguousarray(value.transpose(3, 2, 0, 1))  # HWIO -> OIHW
    if target.kind == "head_kernel":
        return np.ascontiguousarray(value[0, 0].T)  # [1,1,C,N] -> [N,C]
    return value


def describe(p: Plan) -> str:
    heads = ", ".join(f"{k} ({v})" for k, v in p.heads.items()) or "none"
    return (f"ResNet50v2 width {p.width:g} (filters_factor {p.filters_factor}), BN scope "
            f"{p.bn_scope!r}, heads {heads}: {p.family}")

"""The release's pre-activation ResNet50v2 backbone and the linear heads S4L puts on it.

Follows S4L_REFERENCE.md section 3 ("ResNet50v2"), i.e. the original release's
`resnet50v2` with `filters_factor` 4 (standard) or 16 (4x wider):

- bias-free convolutions, glorot/xavier-uniform initialised;
- root: 7x7 stride-2 conv, NO BN/ReLU after it (v2), then a 3x3 stride-2 max-pool over a
  ZERO-padded input (PyTorch's `MaxPool2d(padding=1)` pads with -inf, which differs where the
  input is negative, so the padding is explicit);
- bottleneck units with pre-activation; the stride sits on the 3x3 conv of the first unit of
  stages 2-4; the projection shortcut is applied to the pre-activated input;
- after the last stage BN + ReLU + global average pool gives `pre_logits`, the representation;
- BatchNorm epsilon 1e-3 and PyTorch momentum 0.01 (TF decay 0.99).

Heads are separate linear layers (the release's 1x1 convs with bias on the pooled
representation), requested by name: `classes`, `rotation` (4) and `embedding` (1000, exemplar).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

STAGE_UNITS = (3, 4, 6, 3)
STEMS = ("imagenet", "small", "small-s2")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model (stored in every checkpoint).

    width: multiplier of the standard widths (root 64*width channels; 1.0 = the paper's
      standard ResNet50v2, 4.0 = its "4x wider" net, 0.25 = a quarter width with root 16).
    stem: "imagenet" (7x7/2 conv + 3x3/2 zero-padded max-pool), "small" (3x3/1 conv, no
      pool) for 32-64 px images, or "small-s2" (3x3/2 conv, no pool): about 3.5x cheaper than
      "small" at 32 px, for CPU-sized experiments.
    heads: head name -> output size.
    """

    width: float = 1.0
    stem: str = "imagenet"
    bn_eps: float = 1e-3
    bn_momentum: float = 0.01
    heads: Mapping[str, int] = dataclasses.field(default_factory=lambda: {"classes": 1000})

    def __post_init__(self) -> None:
        if self.stem not in STEMS:
            raise ValueError(f"unknown stem {self.stem!r}; valid: {', '.join(STEMS)}")
        root = 64 * self.width
        if self.width <= 0 or abs(root - round(root)) > 1e-6 or round(root) < 1:
            raise ValueError(f"width {self.width} must make 64*width a positive whole number")
        object.__setattr__(self, "heads", dict(self.heads))

    @property
    def root_channels(self) -> int:
        return int(round(64 * self.width))

    @property
    def num_features(self) -> int:
        return self.root_channels * 32

    def to_dict(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "stem": self.stem,
            "bn_eps": self.bn_eps,
            "bn_momentum": self.bn_momentum,
            "heads": dict(self.heads),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model spec keys {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**dict(d))


def _bn(channels: int, spec: ModelSpec) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=spec.bn_eps, momentum=spec.bn_momentum)


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    # "SAME"-style symmetric padding; stride-2 3x3 and 7x7 convs in the release use TF's
    # fixed padding (pad k//2 on both sides before a VALID conv), which this equals.
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)


class Bottleneck(nn.Module):
    """Pre-activation bottleneck unit: out = conv(relu(bn(...))) chain + shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, spec: ModelSpec) -> None:
        super().__init__()
        mid = cout // 4
        self.norm1 = _bn(cin, spec)
        self.downsample = _conv(cin, cout, 1, stride) if (stride != 1 or cin != cout) else None
        self.conv1 = _conv(cin, mid, 1)
        self.norm2 = _bn(mid, spec)
        self.conv2 = _conv(mid, mid, 3, stride)
        self.norm3 = _bn(mid, spec)
        self.conv3 = _conv(mid, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(x))
        shortcut = x if self.downsample is None else self.downsample(h)
        h = self.conv1(h)
        h = self.conv2(F.relu(self.norm2(h)))
        h = self.conv3(F.relu(self.norm3(h)))
        return h + shortcut


class ResNet50v2(nn.Module):
    """Backbone: `forward_features` returns the named representations, `forward` pre_logits."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        root = spec.root_channels
        if spec.stem == "imagenet":
            self.stem = _conv(3, root, 7, 2)
            self.pool = True
        else:
            self.stem = _conv(3, root, 3, 2 if spec.stem == "small-s2" else 1)
            self.pool = False
        stages = []
        cin = root
        for i, units in enumerate(STAGE_UNITS):
            cout = root * 4 * (2**i)
            blocks = []
            for u in range(units):
                stride = 2 if (u == 0 and i > 0) else 1
                blocks.append(Bottleneck(cin, cout, stride, spec))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.norm = _bn(cin, spec)
        self.num_features = cin
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
                m.reset_running_stats()

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats: dict[str, torch.Tensor] = {}
        h = self.stem(x)
        if self.pool:
            # Zero padding, as the release's tf.pad + VALID max-pool (not -inf padding).
            h = F.max_pool2d(F.pad(h, (1, 1, 1, 1)), kernel_size=3, stride=2)
        feats["stem"] = h
        for i, stage in enumerate(self.stages):
            h = stage(h)
            feats[f"stage{i + 1}"] = h
        h = F.relu(self.norm(h))
        feats["pre_logits"] = h.mean(dim=(2, 3))
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)["pre_logits"]


FEATURE_LAYERS = ("stem", "stage1", "stage2", "stage3", "stage4", "pre_logits")


class S4LModel(nn.Module):
    """A backbone plus named linear heads on its pooled representation."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = ResNet50v2(spec)
        d = self.backbone.num_features
        self.heads = nn.ModuleDict({name: nn.Linear(d, n) for name, n in spec.heads.items()})
        for head in self.heads.values():
            nn.init.xavier_uniform_(head.weight)
            nn.init.zeros_(head.bias)

    @property
    def num_features(self) -> int:
        return self.backbone.num_features

    def forward(
        self, x: torch.Tensor, heads: Iterable[str] = ("classes",)
    ) -> dict[str, torch.Tensor]:
        heads = tuple(heads)
        missing = [h for h in heads if h not in self.heads]
        if missing:
            raise KeyError(f"model has no head(s) {missing}; it has {sorted(self.heads)}")
        rep = self.backbone(x)
        out = {"pre_logits": rep}
        for name in heads:
            out[name] = self.heads[name](rep)
        return out


def build_model(spec: ModelSpec | Mapping[str, Any]) -> S4LModel:
    """Build an S4LModel from a ModelSpec (or its dict form, as stored in checkpoints)."""
    if not isinstance(spec, ModelSpec):
        spec = ModelSpec.from_dict(spec)
    return S4LModel(spec)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

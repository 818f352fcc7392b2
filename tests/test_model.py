"""ResNet50v2: parameter counts, named features, heads, and equivalence with timm's resnetv2_50."""

from __future__ import annotations

import re

import pytest
import torch

from s4l.training.model import FEATURE_LAYERS, ModelSpec, build_model, count_parameters


def test_standard_width_parameter_counts():
    # S4L_REFERENCE.md section 3: 23,500,352 (backbone) and 25,549,352 (1000-way head).
    assert count_parameters(build_model(ModelSpec(heads={}))) == 23_500_352
    assert count_parameters(build_model(ModelSpec(heads={"classes": 1000}))) == 25_549_352


def test_four_times_wider_count(capsys):
    spec = ModelSpec(width=4.0, heads={})
    n = count_parameters(build_model(spec))
    with capsys.disabled():
        print(f"\n4x-wide ResNet50v2 backbone: {n:,} parameters, pre_logits {spec.num_features}-d")
    assert spec.num_features == 8192
    assert 370e6 < n < 380e6  # the paper's "~375M"


def test_named_features_and_heads():
    spec = ModelSpec(width=0.0625, stem="small", heads={"classes": 5, "rotation": 4})
    model = build_model(spec).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.backbone.forward_features(x)
    assert set(feats) == set(FEATURE_LAYERS)
    assert feats["pre_logits"].shape == (2, spec.num_features)
    assert feats["stage4"].shape == (2, spec.num_features, 4, 4)  # 32 px, strides 1,1,2,2,2
    out = model(x, heads=("classes", "rotation"))
    assert out["classes"].shape == (2, 5) and out["rotation"].shape == (2, 4)
    assert torch.allclose(out["pre_logits"], feats["pre_logits"])
    with pytest.raises(KeyError, match="embedding"):
        model(x, heads=("embedding",))


def test_release_details():
    model = build_model(ModelSpec(width=0.25, heads={"classes": 3}))
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            assert m.bias is None
        if isinstance(m, torch.nn.BatchNorm2d):
            assert m.eps == 1e-3 and m.momentum == 0.01
    assert torch.count_nonzero(model.heads["classes"].bias) == 0
    # The stride sits on the 3x3 conv of the first unit of stages 2-4.
    first = model.backbone.stages[1][0]
    assert first.conv2.stride == (2, 2) and first.conv1.stride == (1, 1)
    assert first.downsample.stride == (2, 2)


def test_zero_padded_max_pool():
    """The root max-pool pads with zeros: an all-negative stem output must pool to 0 at borders."""
    spec = ModelSpec(width=0.0625, heads={})
    model = build_model(spec).eval()
    with torch.no_grad():
        model.backbone.stem.weight.fill_(0.0)
        model.backbone.stem.weight[:, 0, 3, 3] = -1.0  # stem output = -x[:, 0] (centre tap)
        x = torch.ones(1, 3, 64, 64)
        pooled = model.backbone.forward_features(x)["stem"]
    assert pooled[0, 0, 0, 0].item() == 0.0  # a -inf pad would give -1
    assert pooled[0, 0, 5, 5].item() == -1.0


def test_stride_two_small_stem():
    """"small-s2" halves the stem's resolution (the CPU-sized experiments' stem) and nothing else:
    same parameters as "small", stage4 at 2x2 for 32 px, and a config accepts it."""
    from s4l.training.config import TrainConfig, apply_overrides

    s1, s2 = ModelSpec(width=0.0625, stem="small"), ModelSpec(width=0.0625, stem="small-s2")
    m1, m2 = build_model(s1).eval(), build_model(s2).eval()
    assert sum(p.numel() for p in m1.parameters()) == sum(p.numel() for p in m2.parameters())
    f = m2.backbone.forward_features(torch.randn(2, 3, 32, 32))
    assert f["stem"].shape[-2:] == (16, 16) and f["stage4"].shape[-2:] == (2, 2)
    assert apply_overrides(TrainConfig(), ["model.stem=small-s2"]).model.stem == "small-s2"


@pytest.mark.parametrize("stem", ["imagenet", "small", "small-s2"])
def test_bad_spec(stem):
    with pytest.raises(ValueError, match="width"):
        ModelSpec(width=0.01, stem=stem)
    with pytest.raises(ValueError, match="stem"):
        ModelSpec(stem="huge")
    assert ModelSpec.from_dict(ModelSpec(stem=stem).to_dict()) == ModelSpec(stem=stem)


def _timm_to_ours(name: str) -> str:
    name = name.replace("stem.conv.", "stem.")
    name = re.sub(r"stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", name)
    name = name.replace("downsample.conv.", "downsample.")
    return "backbone." + name


def test_equivalent_to_timm_resnetv2_50_fixed_stem():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model("resnetv2_50", stem_type="fixed", num_classes=0, pretrained=False)
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eps = 1e-3
    ours = build_model(ModelSpec(heads={}))
    # Random BN statistics and affine parameters so that the comparison is not trivial.
    state = {}
    for k, v in ref.state_dict().items():
        if k.endswith("running_var"):
            v = torch.rand_like(v) + 0.5
        elif k.endswith(("running_mean", "bias")) or k.endswith("norm1.weight"):
            v = torch.randn_like(v) * 0.1 if v.is_floating_point() else v
        state[k] = v
    ref.load_state_dict(state)
    mapped = {_timm_to_ours(k): v for k, v in state.items()}
    ours.load_state_dict(mapped, strict=True)
    ref.eval()
    ours.eval()
    x = torch.randn(2, 3, 224, 224) * 2
    with torch.no_grad():
        a = ref(x)
        b = ours(x, heads=())["pre_logits"]
    rel = ((a - b).abs().max() / a.abs().max()).item()
    assert rel < 1e-5, rel

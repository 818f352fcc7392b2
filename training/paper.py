"""The paper's numbers, in one table: Tables 1 and 2 of Zhai et al. (ICCV 2019), ImageNet,
ResNet50v2 (S4L_REFERENCE.md section 2).

`training/presets.py` builds each preset row's "paper number" from here, the study's report
compares its rows with `TABLE1`, and tests/test_presets.py checks that the presets' docstrings
and docs/reproducing.md quote these numbers. Torch-free.
"""

from __future__ import annotations

# Table 1: top-5 at 10% / 1% labels, and the release's top-1 where it reports one.
TABLE1: dict[str, dict[str, float]] = {
    "supervised": {"top5_10": 80.43, "top5_1": 48.43, "top1_10": 56.36, "top1_1": 25.09},
    "pseudo-labels": {"top5_10": 82.41, "top5_1": 51.56, "top1_10": 60.24},
    "vat": {"top5_10": 82.78, "top5_1": 44.05, "top1_10": 59.98},
    "vat-entmin": {"top5_10": 83.39, "top5_1": 46.96, "top1_10": 60.87},
    "rotation-linear": {"top5_10": 39.75, "top5_1": 25.98},
    "rotation-finetune": {"top5_10": 78.53, "top5_1": 45.11},
    "exemplar-linear": {"top5_10": 32.32, "top5_1": 21.33},
    "exemplar-finetune": {"top5_10": 81.01, "top5_1": 44.90},
    "s4l-rotation": {"top5_10": 83.82, "top5_1": 53.37, "top1_10": 61.37},
    "s4l-exemplar": {"top5_10": 83.72, "top5_1": 47.02, "top1_10": 62.17},
}

# Table 2 (10% labels): top-5 / top-1.
TABLE2: dict[str, dict[str, float]] = {
    "moam-step1": {"top5_10": 88.80, "top1_10": 69.73},
    "moam-pseudo-label": {"top5_10": 89.96, "top1_10": 71.56},
    "moam-finetune": {"top5_10": 91.23, "top1_10": 73.21},
    "supervised-4x": {"top5_10": 81.29, "top1_10": 58.15},
}


def number(table: dict[str, dict[str, float]], key: str, labels: str = "10") -> str:
    """A row's number as the presets list it: "top-5 83.82" (Table 1) or
    "top-5 88.80 / top-1 69.73" (Table 2)."""
    row = table[key]
    out = f"top-5 {row[f'top5_{labels}']:.2f}"
    if table is TABLE2:
        out += f" / top-1 {row[f'top1_{labels}']:.2f}"
    return out

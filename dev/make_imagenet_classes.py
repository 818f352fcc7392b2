"""Build training/tfhub/imagenet_classes.tsv: the 1,000 ImageNet classes in the release's order.

Dev only (run once; the result is committed, so s4l needs neither ../shared nor torchvision to
name a class). Run from the repository root with the project venv:

    .venv/bin/python dev/make_imagenet_classes.py

- wnids: the release's class index is the ImageNet label in sorted-wnid order (its input
  pipeline subtracts 1 from the 1-based TFRecord label, and the slim converter numbers the
  synsets sorted). They are derived from the release's own label maps in
  ../shared/data/s4l-label-maps (the wnid is the text before the underscore of each basename):
  1,000 distinct wnids, sorted.
- readable names: torchvision's ImageNet weight metadata (`_IMAGENET_CATEGORIES`), which follows
  the same sorted-wnid order. That is checked, not assumed: against the ten Imagenette
  wnid -> name pairs of ../shared/data/README.md, and the whole wnid list against timm's
  `imagenet_synsets.txt` with each name among the lemmas timm gives that wnid.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LABEL_MAPS = REPO.parent / "shared" / "data" / "s4l-label-maps"
OUT = REPO / "training" / "tfhub" / "imagenet_classes.tsv"
IMAGENETTE = {"n01440764": "tench", "n02102040": "English springer", "n02979186": "cassette player",
              "n03000684": "chain saw", "n03028079": "church", "n03394916": "French horn",
              "n03417042": "garbage truck", "n03425413": "gas pump", "n03445777": "golf ball",
              "n03888257": "parachute"}


def main() -> int:
    wnids: set[str] = set()
    for name in ("label_map_count_128000_index_0", "label_map_count_13000_index_0"):
        values = json.loads((LABEL_MAPS / name).read_text())["values"]
        wnids.update(v.split("_")[0] for v in values)
    order = sorted(wnids)
    assert len(order) == 1000, len(order)

    from torchvision.models._meta import _IMAGENET_CATEGORIES as names

    assert len(names) == 1000
    for wnid, name in IMAGENETTE.items():
        assert names[order.index(wnid)] == name, (wnid, names[order.index(wnid)], name)

    import timm.data

    info = Path(timm.data.__file__).parent / "_info"
    timm_wnids = (info / "imagenet_synsets.txt").read_text().split()
    assert timm_wnids == order, "timm's ImageNet-1k synsets differ from the label maps' wnids"
    lemmas = dict(line.split("\t", 1) for line in
                  (info / "imagenet_synset_to_lemma.txt").read_text().splitlines() if "\t" in line)
    loose = [(w, n) for w, n in zip(order, names)
             if n.lower() not in {s.strip().lower() for s in lemmas[w].split(",")}
             and not any(s.strip().lower() in n.lower() for s in lemmas[w].split(","))]
    # torchvision disambiguates a few names ("crane bird"); every other name is one of timm's lemmas
    print(f"{len(loose)} names not literally among timm's lemmas: {loose[:8]}", file=sys.stderr)
    assert len(loose) < 20

    lines = ["# ImageNet-1k classes in the S4L release's order (sorted wnids); "
             "built by dev/make_imagenet_classes.py", "# index\twnid\tname"]
    lines += [f"{i}\t{w}\t{n}" for i, (w, n) in enumerate(zip(order, names))]
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT} ({len(order)} classes; {len(set(names))} distinct names)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

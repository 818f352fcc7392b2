"""Torch-free data-set readers: image folders, Places205 lists, builtin:digits, label maps, subsets.

Everything here is stdlib + numpy + Pillow so that evaluation tools and the service can list and
read images without torch (docs/contracts.md "Data"). Torch datasets/loaders built on these
sources live in `s4l.training.data`.

Sources
-------
`open_source(spec, split)` resolves a data spec to a *source*: an object with

- `samples: list[(path: str, class_index: int)]` and `classes: list[str]`,
- `__len__()`, `load(i) -> PIL.Image` (RGB, via `s4l.imaging.decode_image`), `path(i) -> str`,
- `relpath(i) -> str`: the sample's name relative to the split, POSIX style
  (`<class>/<file>` for image folders), used to resolve label-map names.

Specs: an image-folder root (`ROOT/<split>/<class>/<image>`), `places205:LIST@IMAGES_ROOT`
(the official Places205 list format; `{split}` in LIST is replaced by the split name) and
`builtin:digits` (scikit-learn's bundled 8x8 digits, upscaled to 32x32 RGB, in memory).

Labelled subsets (S4L_REFERENCE.md "Label maps")
------------------------------------------------
The release's label maps are JSON files `{"values": [basename, ...]}` listing the labelled
training images by file name; SimCLR's subsets are the same basenames as plain text lines. A
basename maps to `train/<wnid>/<basename>` in ImageNet's layout. We generalise: a name is looked
up among the split's files by basename; where a basename occurs in several classes (CIFAR-style
`0001.jpg` in every class folder) the name must be written as the relative path `class/name`
(`label_map_names` writes that form exactly where it is needed), except that an ImageNet-style
`<wnid>_<n>` name picks the class folder called `<wnid>`. Names may also carry the split prefix
(`train/<wnid>/<basename>`).

The unlabelled stream is the WHOLE training split, labelled images included, as in the release;
`holdout_validation` removes the paper's "tiny validation set" (Fig. 3) from both streams.

Corrupt images
--------------
`load(i)` raises `s4l.imaging.ImageError` for an undecodable file; it never returns a
placeholder. The policy for what to do with that is the caller's: the training loader
(`s4l.training.data`) skips it, counts it, logs the path and deterministically substitutes the
next sample of its stream; extraction records the path and reason in the HDF5 `errors` dataset.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections import defaultdict
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from s4l.errors import UserError
from s4l.imaging import DEFAULT_MAX_PIXELS, decode_image
from s4l.io import atomic_write_json

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
BUILTINS = ("digits",)
_FIRST_FEW = 5


def _few(items: Sequence[str], n: int = _FIRST_FEW) -> str:
    shown = ", ".join(repr(x) for x in list(items)[:n])
    return shown + (", ..." if len(items) > n else "")


def _is_image_name(name: str) -> bool:
    # Hidden files include macOS "._x.jpg" AppleDouble files, which are not images.
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


class _SourceBase:
    """What every source shares: the sample list and the name index for label maps."""

    samples: list[tuple[str, int]]
    classes: list[str]
    split: str
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    def __len__(self) -> int:
        return len(self.samples)

    def path(self, i: int) -> str:
        return self.samples[i][0]

    def label(self, i: int) -> int:
        return self.samples[i][1]

    def relpath(self, i: int) -> str:
        raise NotImplementedError

    def load(self, i: int) -> Image.Image:
        """Decode sample `i` to RGB; raises `s4l.imaging.ImageError` when it is unusable."""
        return decode_image(self.samples[i][0], max_pixels=self.max_pixels)

    @functools.cached_property
    def _names(self) -> tuple[dict[str, list[int]], dict[str, int]]:
        by_base: dict[str, list[int]] = defaultdict(list)
        by_rel: dict[str, int] = {}
        for i in range(len(self)):
            rel = self.relpath(i)
            by_rel[rel] = i
            by_base[rel.rsplit("/", 1)[-1]].append(i)
        return dict(by_base), by_rel

    def resolve_name(self, name: str) -> int | None:
        """Index of the sample a label-map name refers to; None if absent; UserError if ambiguous."""
        by_base, by_rel = self._names
        name = name.strip().replace("\\", "/")
        if "/" in name:
            if name in by_rel:
                return by_rel[name]
            prefix = f"{self.split}/"
            if name.startswith(prefix) and name[len(prefix):] in by_rel:
                return by_rel[name[len(prefix):]]
            return None
        cands = by_base.get(name)
        if not cands:
            return None
        if len(cands) == 1:
            return cands[0]
        # ImageNet convention: <wnid>_<n>.JPEG lives in train/<wnid>/.
        wnid = name.split("_", 1)[0]
        in_class = [i for i in cands if self.classes[self.samples[i][1]] == wnid]
        if len(in_class) == 1:
            return in_class[0]
        raise UserError(
            f"label-map name {name!r} is ambiguous: {len(cands)} files of split "
            f"{self.split!r} have that basename (e.g. {_few([self.relpath(i) for i in cands], 3)}); "
            "write it as the relative path 'class/name'"
        )


class ImageFolderSplit(_SourceBase):
    """One split of an image folder: `root/<split>/<class>/**/<image>`, classes sorted by name.

    Both layouts of ../shared/data work (CIFAR-10 `cifar10/train/<class>/NNNN.jpg`, Imagenette
    `imagenette-224/train/<wnid>/<wnid>_N.JPEG`), as does ImageNet's. Extensions are matched
    case-insensitively; hidden files are ignored; files are listed recursively and sorted, so
    the sample order is a pure function of the file names.
    """

    def __init__(self, root: str | os.PathLike, split: str,
                 *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        self.root = Path(root)
        self.split = split
        self.max_pixels = max_pixels
        if not self.root.exists():
            raise UserError(f"data root {str(self.root)!r} does not exist")
        if not self.root.is_dir():
            raise UserError(f"data root {str(self.root)!r} is not a directory")
        self.split_dir = self.root / split
        if not self.split_dir.is_dir():
            existing = sorted(p.name for p in self.root.iterdir()
                              if p.is_dir() and not p.name.startswith("."))
            hint = ""
            if existing and all(_has_images(self.root / d) for d in existing[:3]):
                hint = (" (its subfolders look like class folders: give the folder ABOVE the "
                        "split folders as the root)")
            raise UserError(
                f"split {split!r} not found under {str(self.root)!r}; splits there: "
                f"{existing or 'none'}{hint}"
            )
        try:
            self.classes = sorted(
                e.name for e in os.scandir(self.split_dir)
                if e.is_dir() and not e.name.startswith(".")
            )
        except OSError as e:
            raise UserError(f"cannot list {str(self.split_dir)!r}: {e}") from e
        if not self.classes:
            raise UserError(f"{str(self.split_dir)!r} has no class subfolders")
        self.samples = []
        self._rel: list[str] = []
        for ci, cls in enumerate(self.classes):
            files, ignored = _list_images(self.split_dir / cls)
            if not files:
                extra = f" (ignored {len(ignored)} non-image files, e.g. {_few(ignored, 3)})" if ignored else ""
                raise UserError(
                    f"class folder {str(self.split_dir / cls)!r} holds no images{extra}; "
                    f"image extensions: {sorted(IMAGE_EXTENSIONS)}"
                )
            if ignored:
                log.debug("%s: ignored %d non-image files", self.split_dir / cls, len(ignored))
            for rel in files:
                self.samples.append((str(self.split_dir / cls / rel), ci))
                self._rel.append(f"{cls}/{rel}")
        log.info("%s: %d images in %d classes", self.split_dir, len(self.samples), len(self.classes))

    def relpath(self, i: int) -> str:
        return self._rel[i]

    def __repr__(self) -> str:
        return (f"ImageFolderSplit({str(self.root)!r}, {self.split!r}: {len(self)} images, "
                f"{len(self.classes)} classes)")


def _has_images(d: Path) -> bool:
    try:
        return any(_is_image_name(e.name) for e in os.scandir(d) if e.is_file())
    except OSError:
        return False


def _list_images(d: Path) -> tuple[list[str], list[str]]:
    """Image files under `d` (recursive, POSIX relative paths, sorted) and the ignored names."""
    found: list[str] = []
    ignored: list[str] = []
    stack = [("", d)]
    while stack:
        prefix, cur = stack.pop()
        try:
            entries = list(os.scandir(cur))
        except OSError as e:
            raise UserError(f"cannot list {str(cur)!r}: {e}") from e
        for e in entries:
            if e.is_dir():
                if not e.name.startswith("."):
                    stack.append((f"{prefix}{e.name}/", Path(e.path)))
            elif _is_image_name(e.name):
                found.append(prefix + e.name)
            else:
                ignored.append(prefix + e.name)
    return sorted(found), sorted(ignored)


def check_same_classes(a, b) -> None:
    """UserError unless sources `a` and `b` have the same class list (a train and an eval split)."""
    if list(a.classes) == list(b.classes):
        return
    sa, sb = set(a.classes), set(b.classes)
    only_a, only_b = sorted(sa - sb), sorted(sb - sa)
    name_a = getattr(a, "split", "first")
    name_b = getattr(b, "split", "second")
    if not only_a and not only_b:
        raise UserError(f"splits {name_a!r} and {name_b!r} list the same classes in a different order")
    raise UserError(
        f"splits {name_a!r} and {name_b!r} have different classes: "
        f"only in {name_a!r}: {only_a or 'none'}; only in {name_b!r}: {only_b or 'none'}"
    )


# --------------------------------------------------------------------------------------------
# Places205


class Places205List(_SourceBase):
    """Places205's official list format: one line `relative/path.jpg label` per image.

    Paths are relative to `images_root` (a leading `/` is tolerated, as some copies of the lists
    carry it); labels are 0..N-1. Classes are named "0".."N-1" (N = largest label + 1) unless
    `class_names` is given. Every listed image is checked to exist up front, so a missing file
    is reported before hours of work rather than in the middle of them (S4L_REFERENCE.md s.4).
    """

    def __init__(self, list_file: str | os.PathLike, images_root: str | os.PathLike,
                 class_names: Sequence[str] | None = None, *, split: str = "",
                 check_files: bool = True, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        self.list_file = Path(list_file)
        self.images_root = Path(images_root)
        self.split = split
        self.max_pixels = max_pixels
        if not self.list_file.is_file():
            raise UserError(f"Places205 list file {str(self.list_file)!r} does not exist")
        if not self.images_root.is_dir():
            raise UserError(f"Places205 images root {str(self.images_root)!r} is not a directory")
        rels: list[str] = []
        labels: list[int] = []
        with open(self.list_file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                parts = line.rsplit(None, 1)
                if len(parts) != 2:
                    raise UserError(
                        f"{self.list_file}:{lineno}: expected 'relative/path.jpg label', got {line!r}")
                try:
                    lab = int(parts[1])
                except ValueError:
                    raise UserError(
                        f"{self.list_file}:{lineno}: label {parts[1]!r} is not an integer") from None
                if lab < 0:
                    raise UserError(f"{self.list_file}:{lineno}: negative label {lab}")
                rels.append(parts[0].lstrip("/"))
                labels.append(lab)
        if not rels:
            raise UserError(f"Places205 list file {str(self.list_file)!r} lists no images")
        n_classes = max(labels) + 1
        if class_names is not None:
            if max(labels) >= len(class_names):
                raise UserError(
                    f"{self.list_file}: label {max(labels)} but only {len(class_names)} class names given")
            self.classes = list(class_names)
        else:
            self.classes = [str(c) for c in range(n_classes)]
        self._rel = rels
        self.samples = [(str(self.images_root / r), lab) for r, lab in zip(rels, labels)]
        if check_files:
            if len(rels) > 100_000:
                log.info("checking that the %d images listed in %s exist", len(rels), self.list_file)
            missing = [r for r, (p, _) in zip(rels, self.samples) if not os.path.isfile(p)]
            if missing:
                raise UserError(
                    f"{len(missing):,} of {len(rels):,} images listed in {str(self.list_file)!r} "
                    f"are missing under {str(self.images_root)!r}: {_few(missing)}"
                )

    def relpath(self, i: int) -> str:
        return self._rel[i]

    def __repr__(self) -> str:
        return f"Places205List({str(self.list_file)!r}: {len(self)} images, {len(self.classes)} classes)"


# --------------------------------------------------------------------------------------------
# builtin:digits

DIGITS_TEST_FRACTION = 0.2
DIGITS_SIZE = 32


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the installed extras
        raise UserError("builtin:digits needs scikit-learn (pip install 's4l[eval]')") from e
    d = load_digits()
    grey = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # [n, 8, 8], 0..16 -> 0..255
    # Nearest-neighbour 4x upscaling: every source pixel becomes an exact 4x4 block, so no
    # value is invented and the result is identical on every Pillow/numpy version.
    f = DIGITS_SIZE // grey.shape[1]
    big = grey.repeat(f, axis=1).repeat(f, axis=2)
    rgb = np.ascontiguousarray(np.repeat(big[..., None], 3, axis=3))
    rgb.setflags(write=False)  # shared by every DigitsSource
    y = d.target.astype(np.int64)
    # Our own stratified split (seed 0, 20% of every class held out), independent of
    # scikit-learn's splitter implementation.
    test = np.zeros(len(y), bool)
    for c in range(10):
        idx = np.flatnonzero(y == c)
        perm = np.random.default_rng([0, c]).permutation(idx)
        test[perm[: int(len(idx) * DIGITS_TEST_FRACTION + 0.5)]] = True
    splits = {"train": np.flatnonzero(~test), "test": np.flatnonzero(test)}
    return rgb, y, splits


class DigitsSource(_SourceBase):
    """`builtin:digits`: scikit-learn's 1,797 8x8 grey digits as 32x32 RGB uint8, in memory.

    Values 0..16 are scaled to 0..255 and each pixel becomes a 4x4 block (nearest neighbour).
    Split: stratified, 20% of every class in `test` (1,438 train / 359 test), seed 0; `val` is
    an alias of `test`. Classes "0".."9". Paths are `builtin:digits/<split>/<NNNNN>` with the
    index into scikit-learn's array, so they are stable names for label maps.
    """

    def __init__(self, split: str) -> None:
        aliases = {"train": "train", "test": "test", "val": "test"}
        if split not in aliases:
            raise UserError(f"builtin:digits has splits 'train' and 'test' ('val' = 'test'), not {split!r}")
        self.split = split
        self._images, y, splits = _digits_arrays()
        self._ids = splits[aliases[split]]
        self.classes = [str(c) for c in range(10)]
        self.samples = [(f"builtin:digits/{aliases[split]}/{i:05d}", int(y[i])) for i in self._ids]

    def relpath(self, i: int) -> str:
        return f"{self.samples[i][1]}/{int(self._ids[i]):05d}"

    def array(self, i: int) -> np.ndarray:
        """The uint8 [32, 32, 3] image."""
        return self._images[self._ids[i]]

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.array(i), "RGB")

    def __repr__(self) -> str:
        return f"DigitsSource({self.split!r}: {len(self)} images)"


# --------------------------------------------------------------------------------------------


def open_source(spec: str | os.PathLike, split: str,
                *, max_pixels: int | None = DEFAULT_MAX_PIXELS):
    """Resolve a data spec and split to a source (see the module docstring for the specs)."""
    s = os.fspath(spec)
    if not s:
        raise UserError("no data source given (an image-folder root, builtin:digits or places205:LIST@ROOT)")
    if s.startswith("builtin:"):
        name = s[len("builtin:"):]
        if name == "digits":
            return DigitsSource(split)
        raise UserError(f"unknown builtin data set {name!r}; builtins: {list(BUILTINS)}")
    if s.startswith("places205:"):
        body = s[len("places205:"):]
        if "@" not in body:
            raise UserError(f"expected places205:LIST_FILE@IMAGES_ROOT, got {s!r}")
        list_file, images_root = body.rsplit("@", 1)
        list_file = list_file.replace("{split}", split)
        return Places205List(list_file, images_root, split=split, max_pixels=max_pixels)
    return ImageFolderSplit(s, split, max_pixels=max_pixels)


# --------------------------------------------------------------------------------------------
# Label maps


# A label map for all 1.28M ImageNet training images is about 30 MiB of JSON.
LABEL_MAP_MAX_BYTES = 256 << 20


def read_label_map(path: str | os.PathLike) -> list[str]:
    """Names of the labelled images: the release's JSON `{"values": [...]}` or one name per line."""
    from s4l.safeload import check_relative_name, parse_json, read_text_capped

    p = Path(path)
    if not p.is_file():
        raise UserError(f"label map {str(p)!r} does not exist")
    text = read_text_capped(p, "label map", LABEL_MAP_MAX_BYTES)
    if text.lstrip().startswith("{"):
        obj = parse_json(text, f"label map {str(p)!r}")
        if isinstance(obj, dict) and set(obj) - {"values"}:
            raise UserError(f"label map {str(p)!r} has unknown keys {sorted(set(obj) - {'values'})[:5]}; "
                            "expected only \"values\"")
        values = obj.get("values") if isinstance(obj, dict) else None
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise UserError(f"label map {str(p)!r}: expected {{\"values\": [file names]}}")
        names = [v.strip() for v in values]
    else:
        names = [ln.strip() for ln in text.splitlines()]
        names = [n for n in names if n and not n.startswith("#")]
    if not names or any(not n for n in names):
        raise UserError(f"label map {str(p)!r} lists no image names" if not names
                        else f"label map {str(p)!r} has empty names")
    for n in names:
        check_relative_name(n, f"label map {str(p)!r}")
    seen: set[str] = set()
    dups = [n for n in names if n in seen or seen.add(n)]
    if dups:
        raise UserError(f"label map {str(p)!r} repeats {len(dups)} names: {_few(dups)}")
    return names


def write_label_map(path: str | os.PathLike, names: Iterable[str]) -> Path:
    """Write names in the release's JSON format `{"values": [...]}`, atomically."""
    p = Path(path)
    names = list(names)
    if not names:
        raise UserError("refusing to write an empty label map")
    p.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(p, {"values": names})


def label_map_names(source, indices: Iterable[int]) -> list[str]:
    """Names for a label map: the basename where it is unique in the split, else `class/name`."""
    by_base, _ = source._names
    out = []
    for i in indices:
        rel = source.relpath(i)
        base = rel.rsplit("/", 1)[-1]
        out.append(base if len(by_base[base]) == 1 else rel)
    return out


def select_labelled(source, names: Sequence[str], *, allow_missing: bool = False) -> list[int]:
    """Sorted indices of `source`'s samples named in a label map.

    Names absent from the split are an error (count and first few) unless `allow_missing`,
    which logs a warning instead (e.g. the ImageNet maps applied to Imagenette's subset).
    """
    found: list[int] = []
    missing: list[str] = []
    for n in names:
        i = source.resolve_name(n)
        (missing.append(n) if i is None else found.append(i))
    if missing:
        msg = (f"{len(missing):,} of {len(names):,} label-map names are not in split "
               f"{getattr(source, 'split', '?')!r} of {source!r}: {_few(missing)}")
        if not allow_missing:
            raise UserError(msg)
        log.warning("%s (ignored)", msg)
    uniq = sorted(set(found))
    if len(uniq) != len(found):
        raise UserError(f"{len(found) - len(uniq)} label-map names refer to an image already named "
                        "(e.g. both 'x.jpg' and 'class/x.jpg')")
    if not uniq:
        raise UserError(f"no label-map name matches an image of {source!r}")
    return uniq


# --------------------------------------------------------------------------------------------
# Subsets


def _by_class(samples: Sequence[tuple[str, int]], exclude: Collection[int]) -> dict[int, list[int]]:
    excl = set(exclude)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, (_, c) in enumerate(samples):
        if i not in excl:
            groups[c].append(i)
    return groups


def balanced_subset(samples: Sequence[tuple[str, int]], per_class: int | None = None,
                    fraction: float | None = None, seed: int = 0,
                    exclude: Collection[int] = (), *, class_names: Sequence[str] | None = None,
                    _stream: int = 0) -> list[int]:
    """Sorted indices of a class-balanced random subset, a pure function of its arguments.

    `per_class` images of every class, or `fraction` F of the data as
    round(F * len(samples) / n_classes) per class (ImageNet: 10% -> 128, 1% -> 13, the release's
    counts). Indices in `exclude` are never chosen. Each class is drawn by its own permutation,
    so with one seed a smaller subset is contained in a larger one.
    """
    if (per_class is None) == (fraction is None):
        raise UserError("give exactly one of per_class or fraction")
    all_classes = sorted({c for _, c in samples})
    if not all_classes:
        raise UserError("no samples to draw a subset from")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise UserError(f"fraction must be in (0, 1], got {fraction}")
        per_class = max(1, round(fraction * len(samples) / len(all_classes)))
    assert per_class is not None
    if per_class < 1:
        raise UserError(f"per_class must be >= 1, got {per_class}")
    if seed < 0:
        raise UserError(f"seed must be >= 0, got {seed}")
    groups = _by_class(samples, exclude)
    chosen: list[int] = []
    for c in all_classes:
        pool = groups.get(c, [])
        if per_class > len(pool):
            name = class_names[c] if class_names is not None else str(c)
            raise UserError(
                f"class {name!r} has {len(pool)} images available"
                f"{' (after exclusions)' if exclude else ''}, fewer than the {per_class} per class asked"
            )
        perm = np.random.default_rng([seed, _stream, c]).permutation(len(pool))
        chosen.extend(pool[j] for j in perm[:per_class])
    return sorted(chosen)


def holdout_validation(samples: Sequence[tuple[str, int]], per_class: int, seed: int = 0,
                       exclude: Collection[int] = (), *,
                       class_names: Sequence[str] | None = None) -> tuple[list[int], list[int]]:
    """The paper's "tiny validation set" (Fig. 3): `per_class` training images per class held out.

    Returns (val, rest): `val` never contains an index of `exclude` (pass the labelled subset);
    `rest` is every other index, labelled images included: the training split the streams use.
    Drawn with a different random stream than `balanced_subset`, so the same seed gives
    unrelated draws.
    """
    val = balanced_subset(samples, per_class=per_class, seed=seed, exclude=exclude,
                          class_names=class_names, _stream=1)
    vs = set(val)
    return val, [i for i in range(len(samples)) if i not in vs]


@dataclasses.dataclass(frozen=True)
class TrainingSubsets:
    """Index lists into one training source: which images carry labels, which are streamed
    unlabelled (the whole split minus the held-out validation images) and the held-out ones."""

    labelled: list[int]
    unlabelled: list[int]
    val: list[int]


def training_subsets(source, *, label_map: str | os.PathLike | None = None,
                     labels_per_class: int | None = None, label_fraction: float | None = None,
                     label_seed: int = 0, val_per_class: int = 0,
                     allow_missing: bool = False) -> TrainingSubsets:
    """Resolve the labelled subset and the tiny validation holdout of a training source.

    At most one of label_map / labels_per_class / label_fraction; none = every image labelled.
    A label-map subset is fixed, so the holdout is drawn from the other images; with no subset
    the holdout is drawn first and everything else is labelled.
    """
    given = [k for k, v in (("label_map", label_map), ("labels_per_class", labels_per_class),
                            ("label_fraction", label_fraction)) if v is not None]
    if len(given) > 1:
        raise UserError(f"give at most one of label_map/labels_per_class/label_fraction, got {given}")
    n = len(source)
    if label_map is not None:
        labelled = select_labelled(source, read_label_map(label_map), allow_missing=allow_missing)
    elif labels_per_class is not None or label_fraction is not None:
        labelled = balanced_subset(source.samples, per_class=labels_per_class,
                                   fraction=label_fraction, seed=label_seed,
                                   class_names=source.classes)
    else:
        labelled = None
    if val_per_class > 0:
        val, rest = holdout_validation(source.samples, val_per_class, seed=label_seed,
                                       exclude=labelled or (), class_names=source.classes)
    else:
        val, rest = [], list(range(n))
    if labelled is None:
        labelled = rest
    if not labelled:
        raise UserError(f"the labelled subset of {source!r} is empty")
    return TrainingSubsets(labelled=list(labelled), unlabelled=rest, val=val)

"""s4l.datasets: image folders (CIFAR-10 and Imagenette layouts), label maps, subsets, Places205, digits."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support.images import make_image_folder

from s4l import datasets as ds
from s4l.errors import UserError
from s4l.imaging import ImageError

# --------------------------------------------------------------------------------------------
# The release's label maps


def test_official_label_maps(label_maps_dir: Path):
    m10 = ds.read_label_map(label_maps_dir / "label_map_count_128000_index_0")
    m1 = ds.read_label_map(label_maps_dir / "label_map_count_13000_index_0")
    assert len(m10) == 128_000 and len(m1) == 13_000
    for names, per_class in ((m10, 128), (m1, 13)):
        counts = Counter(n.split("_", 1)[0] for n in names)
        assert len(counts) == 1000
        assert set(counts.values()) == {per_class}
        assert all(n.endswith(".JPEG") for n in names)
    # The 1% list is NOT a subset of the 10% list (S4L_REFERENCE.md "Label maps").
    assert len(set(m10) & set(m1)) == 1286


def test_official_map_on_imagenette(label_maps_dir: Path, imagenette_root: Path):
    train = ds.open_source(imagenette_root, "train")
    names = ds.read_label_map(label_maps_dir / "label_map_count_13000_index_0")
    with pytest.raises(UserError, match=r"12,908 of 13,000 label-map names are not in split 'train'"):
        ds.select_labelled(train, names)
    idx = ds.select_labelled(train, names, allow_missing=True)
    assert len(idx) == 92
    for i in idx:
        base = Path(train.path(i)).name
        assert base in names
        # basename -> train/<wnid>/<basename>
        assert Path(train.path(i)).parent.name == base.split("_")[0] == train.classes[train.label(i)]


# --------------------------------------------------------------------------------------------
# Image folders


def test_cifar10_layout(cifar10_root: Path):
    train = ds.ImageFolderSplit(cifar10_root, "train")
    test = ds.open_source(str(cifar10_root), "test")
    assert len(train) == 50_000 and len(test) == 10_000
    assert train.classes == sorted(train.classes) and len(train.classes) == 10
    assert train.classes[0] == "airplane"
    assert Counter(c for _, c in train.samples) == {c: 5000 for c in range(10)}
    p, c = train.samples[12_345]
    assert Path(p).parent.name == train.classes[c] and Path(p).parent.parent.name == "train"
    assert train.relpath(0) == "airplane/0000.jpg"
    img = train.load(12_345)
    assert img.mode == "RGB" and img.size == (32, 32)
    ds.check_same_classes(train, test)


def test_imagenette_layout(imagenette_root: Path):
    train = ds.open_source(imagenette_root, "train")
    val = ds.open_source(imagenette_root, "val")
    assert (len(train), len(val)) == (9469, 3925)
    assert train.classes[0] == "n01440764" and len(train.classes) == 10
    ds.check_same_classes(train, val)
    with pytest.raises(UserError, match=r"split 'test' not found.*\['train', 'val'\]"):
        ds.open_source(imagenette_root, "test")


def test_extensions_nesting_and_hidden_files(tmp_path: Path):
    root = tmp_path / "d"
    arr = np.zeros((8, 8, 3), np.uint8)
    (root / "train" / "a" / "sub").mkdir(parents=True)
    (root / "train" / "b").mkdir(parents=True)
    Image.fromarray(arr).save(root / "train" / "a" / "x.JpEg", "JPEG")
    Image.fromarray(arr).save(root / "train" / "a" / "sub" / "y.PNG", "PNG")
    Image.fromarray(arr).save(root / "train" / "b" / "z.webp", "WEBP")
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    (root / "train" / "a" / "._x.JpEg").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (root / "train" / ".hidden_class").mkdir()
    src = ds.ImageFolderSplit(root, "train")
    assert src.classes == ["a", "b"]
    assert [src.relpath(i) for i in range(len(src))] == ["a/sub/y.PNG", "a/x.JpEg", "b/z.webp"]
    assert [c for _, c in src.samples] == [0, 0, 1]
    assert all(src.load(i).size == (8, 8) for i in range(len(src)))


def test_image_folder_errors(tmp_path: Path):
    with pytest.raises(UserError, match="does not exist"):
        ds.ImageFolderSplit(tmp_path / "nope", "train")
    root = make_image_folder(tmp_path / "f", splits=("train", "test"), per_class=1)
    with pytest.raises(UserError, match=r"split 'val' not found.*\['test', 'train'\]"):
        ds.ImageFolderSplit(root, "val")
    # The split folder itself given as the root: its subfolders are class folders.
    with pytest.raises(UserError, match="give the folder ABOVE the split folders"):
        ds.ImageFolderSplit(root / "train", "train")
    (root / "train" / "empty").mkdir()
    (root / "train" / "empty" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match=r"empty.*holds no images.*ignored 1 non-image"):
        ds.ImageFolderSplit(root, "train")
    (tmp_path / "g" / "train").mkdir(parents=True)
    with pytest.raises(UserError, match="no class subfolders"):
        ds.ImageFolderSplit(tmp_path / "g", "train")
    with pytest.raises(UserError, match="unknown builtin"):
        ds.open_source("builtin:mnist", "train")
    with pytest.raises(UserError, match="no data source"):
        ds.open_source("", "train")


def test_check_same_classes(tmp_path: Path):
    a = ds.ImageFolderSplit(make_image_folder(tmp_path / "a", splits=("train",), per_class=1), "train")
    b = ds.ImageFolderSplit(make_image_folder(tmp_path / "b", splits=("val",), classes=("a", "b", "d"),
                                              per_class=1), "val")
    with pytest.raises(UserError, match=r"only in 'train': \['c'\]; only in 'val': \['d'\]"):
        ds.check_same_classes(a, b)


def test_corrupt_image_raises_image_error(tmp_path: Path):
    root = make_image_folder(tmp_path / "f", splits=("train",), per_class=2)
    bad = Path(ds.ImageFolderSplit(root, "train").path(1))
    bad.write_bytes(bad.read_bytes()[:100])  # truncated JPEG
    src = ds.ImageFolderSplit(root, "train")
    with pytest.raises(ImageError):
        src.load(1)
    assert src.load(0).size == (32, 32)


# --------------------------------------------------------------------------------------------
# Label maps


def test_label_map_formats_and_round_trip(tmp_path: Path):
    names = ["n01_1.JPEG", "n01_2.JPEG", "n02_7.JPEG"]
    p = ds.write_label_map(tmp_path / "m" / "label_map_count_3_index_0", names)
    assert json.loads(p.read_text()) == {"values": names}  # the release's format
    assert ds.read_label_map(p) == names
    txt = tmp_path / "1percent.txt"  # SimCLR style
    txt.write_text("n01_1.JPEG\n\n# comment\n  n02_7.JPEG  \n")
    assert ds.read_label_map(txt) == ["n01_1.JPEG", "n02_7.JPEG"]


@pytest.mark.parametrize("content,match", [
    ('{"values": [1, 2]}', "expected"),
    ('{"names": ["a"]}', "expected"),
    ('{"values": ["a",', "not valid JSON"),
    ("", "lists no image names"),
    ("a.jpg\nb.jpg\na.jpg\n", "repeats 1 names: 'a.jpg'"),
])
def test_label_map_bad_input(tmp_path: Path, content: str, match: str):
    p = tmp_path / "map"
    p.write_text(content)
    with pytest.raises(UserError, match=match):
        ds.read_label_map(p)


def test_label_map_missing_file(tmp_path: Path):
    with pytest.raises(UserError, match="does not exist"):
        ds.read_label_map(tmp_path / "absent")
    with pytest.raises(UserError, match="empty label map"):
        ds.write_label_map(tmp_path / "x", [])


def _cifar_like(tmp_path: Path) -> ds.ImageFolderSplit:
    """CIFAR's naming: NNNN.jpg restarts in every class folder (ambiguous basenames)."""
    root = tmp_path / "c"
    for ci, cls in enumerate(("cat", "dog", "n03_x")):
        d = root / "train" / cls
        d.mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((8, 8, 3), 30 * ci + i, np.uint8)).save(d / f"{i:04d}.jpg")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train" / "dog" / "unique_dog.jpg")
    return ds.ImageFolderSplit(root, "train")


def test_select_labelled_name_forms(tmp_path: Path):
    src = _cifar_like(tmp_path)
    with pytest.raises(UserError, match=r"'0001.jpg' is ambiguous.*'class/name'"):
        ds.select_labelled(src, ["0001.jpg"])
    i_cat1 = src.resolve_name("cat/0001.jpg")
    assert src.relpath(i_cat1) == "cat/0001.jpg"
    assert src.resolve_name("train/cat/0001.jpg") == i_cat1
    assert src.relpath(src.resolve_name("unique_dog.jpg")) == "dog/unique_dog.jpg"
    got = ds.select_labelled(src, ["dog/0003.jpg", "cat/0001.jpg", "unique_dog.jpg"])
    assert got == sorted(got) and [src.relpath(i) for i in got] == [
        "cat/0001.jpg", "dog/0003.jpg", "dog/unique_dog.jpg"]
    with pytest.raises(UserError, match=r"2 of 3 label-map names are not in split 'train'.*'cat/9.jpg'"):
        ds.select_labelled(src, ["cat/0001.jpg", "cat/9.jpg", "zzz.jpg"])
    with pytest.raises(UserError, match="refer to an image already named"):
        ds.select_labelled(src, ["unique_dog.jpg", "dog/unique_dog.jpg"])


def test_imagenet_wnid_disambiguates(tmp_path: Path):
    root = tmp_path / "i"
    for cls in ("n01", "n02"):
        (root / "train" / cls).mkdir(parents=True)
        # The same basename in two classes: the wnid prefix says which folder it means.
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train" / cls / "n02_5.JPEG")
    src = ds.ImageFolderSplit(root, "train")
    assert src.relpath(src.resolve_name("n02_5.JPEG")) == "n02/n02_5.JPEG"


def test_balanced_subset_written_and_read_back(cifar10_root: Path, tmp_path: Path):
    src = ds.open_source(cifar10_root, "train")
    sub = ds.balanced_subset(src.samples, per_class=40, seed=3)
    assert sub == ds.balanced_subset(src.samples, per_class=40, seed=3)
    assert sub != ds.balanced_subset(src.samples, per_class=40, seed=4)
    assert Counter(src.label(i) for i in sub) == {c: 40 for c in range(10)}
    names = ds.label_map_names(src, sub)
    assert all("/" in n for n in names)  # CIFAR basenames repeat across classes
    path = ds.write_label_map(tmp_path / "cifar_400", names)
    assert ds.select_labelled(src, ds.read_label_map(path)) == sub


def test_balanced_subset_rules():
    samples = [(f"{c}/{i}.jpg", c) for c in range(3) for i in range(10)] + [("2/x.jpg", 2)]
    a = ds.balanced_subset(samples, per_class=4, seed=0)
    assert Counter(samples[i][1] for i in a) == {0: 4, 1: 4, 2: 4}
    # One seed: a smaller subset is inside a larger one (each class has its own permutation).
    assert set(ds.balanced_subset(samples, per_class=2, seed=0)) <= set(a)
    # fraction F -> round(F * N / C) per class: 0.3 * 31 / 3 = 3.1 -> 3
    assert len(ds.balanced_subset(samples, fraction=0.3, seed=0)) == 9
    b = ds.balanced_subset(samples, per_class=3, seed=0, exclude=a)
    assert not set(a) & set(b)
    with pytest.raises(UserError, match=r"class '0' has 6 images available \(after exclusions\), fewer than the 7"):
        ds.balanced_subset(samples, per_class=7, seed=0, exclude=a)
    with pytest.raises(UserError, match=r"class 'cat' has 10 images available, fewer than the 12"):
        ds.balanced_subset(samples, per_class=12, class_names=["cat", "dog", "ox"])
    with pytest.raises(UserError, match="exactly one"):
        ds.balanced_subset(samples, per_class=2, fraction=0.1)
    with pytest.raises(UserError, match="exactly one"):
        ds.balanced_subset(samples)
    with pytest.raises(UserError, match="fraction"):
        ds.balanced_subset(samples, fraction=1.5)


def test_holdout_and_training_subsets(tiny_folder: Path):
    src = ds.open_source(tiny_folder, "train")  # 3 classes x 4
    lab = ds.balanced_subset(src.samples, per_class=2, seed=0)
    val, rest = ds.holdout_validation(src.samples, per_class=1, seed=0, exclude=lab)
    assert len(val) == 3 and not set(val) & set(lab)
    assert sorted(val + rest) == list(range(len(src))) and set(lab) <= set(rest)
    assert Counter(src.label(i) for i in val) == {0: 1, 1: 1, 2: 1}

    s = ds.training_subsets(src, labels_per_class=2, val_per_class=1)
    assert s.labelled == lab and s.val == val and s.unlabelled == rest
    # No subset asked: every non-held-out image is labelled; the unlabelled stream is the
    # whole split minus the holdout.
    s = ds.training_subsets(src, val_per_class=1)
    assert s.labelled == s.unlabelled and len(s.labelled) == 9 and not set(s.val) & set(s.labelled)
    s = ds.training_subsets(src)
    assert s.labelled == s.unlabelled == list(range(12)) and s.val == []
    names = ds.label_map_names(src, [0, 5])
    m = ds.write_label_map(tiny_folder / "map.json", names)
    s = ds.training_subsets(src, label_map=m, val_per_class=3)
    assert s.labelled == [0, 5] and not {0, 5} & set(s.val) and len(s.val) == 9
    assert s.unlabelled == sorted(set(range(12)) - set(s.val))
    with pytest.raises(UserError, match="at most one"):
        ds.training_subsets(src, label_map=m, labels_per_class=1)
    with pytest.raises(UserError, match="fewer than the 4"):
        ds.training_subsets(src, labels_per_class=2, val_per_class=4)


# --------------------------------------------------------------------------------------------
# Places205


def _places_layout(src, tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """A few images of `src` laid out as Places205: images/<letter>/<scene>/<n>.jpg + lists."""
    images = tmp_path / "places" / "images"
    lines = []
    scenes = [("a", "abbey"), ("b", "bakery"), ("c", "church")]
    for label, (letter, scene) in enumerate(scenes):
        d = images / letter / scene
        d.mkdir(parents=True)
        picks = [i for i in range(len(src)) if src.label(i) == label][:2]
        for k, i in enumerate(picks, 1):
            shutil.copy(src.path(i), d / f"{k:08d}.jpg")
            lines.append(f"{letter}/{scene}/{k:08d}.jpg {label}")
    lists = tmp_path / "places" / "trainvalsplit_places205"
    lists.mkdir()
    (lists / "val_places205.csv").write_text("\n".join(lines) + "\n")
    # Some copies of the official lists carry a leading slash.
    (lists / "train_places205.csv").write_text("\n".join("/" + ln for ln in lines[::-1]) + "\n")
    return lists, images, lines


def test_places205_reader(imagenette_root: Path, tmp_path: Path):
    lists, images, lines = _places_layout(ds.open_source(imagenette_root, "val"), tmp_path)
    spec = f"places205:{lists}/{{split}}_places205.csv@{images}"
    val = ds.open_source(spec, "val")
    assert len(val) == 6 and val.classes == ["0", "1", "2"]
    assert [val.relpath(i) for i in range(6)] == [ln.split()[0] for ln in lines]
    assert [c for _, c in val.samples] == [0, 0, 1, 1, 2, 2]
    img = val.load(3)
    assert img.mode == "RGB" and img.size == (224, 224)
    train = ds.open_source(spec, "train")
    assert train.relpath(0) == "c/church/00000002.jpg" and train.label(0) == 2
    ds.check_same_classes(train, val)
    # Basenames repeat across scenes, so label maps use the relative path.
    assert ds.select_labelled(val, ["b/bakery/00000001.jpg"]) == [2]
    named = ds.Places205List(lists / "val_places205.csv", images, ["abbey", "bakery", "church"])
    assert named.classes[named.label(5)] == "church"


def test_places205_errors(tiny_folder: Path, tmp_path: Path):
    # Generated JPEGs: runs without ../shared/data.
    lists, images, lines = _places_layout(ds.open_source(tiny_folder, "train"), tmp_path)
    (images / "b" / "bakery" / "00000001.jpg").unlink()
    (images / "c" / "church" / "00000002.jpg").unlink()
    with pytest.raises(UserError, match=r"2 of 6 images listed.*missing.*'b/bakery/00000001.jpg', 'c/church/00000002.jpg'"):
        ds.Places205List(lists / "val_places205.csv", images)
    bad = tmp_path / "bad.csv"
    bad.write_text("a/abbey/00000001.jpg 0\na/abbey/00000002.jpg zero\n")
    with pytest.raises(UserError, match=r"bad.csv:2: label 'zero' is not an integer"):
        ds.Places205List(bad, images)
    bad.write_text("a/abbey/00000001.jpg\n")
    with pytest.raises(UserError, match=r"bad.csv:1: expected"):
        ds.Places205List(bad, images)
    bad.write_text("a/abbey/00000001.jpg 3\n")
    with pytest.raises(UserError, match="only 2 class names"):
        ds.Places205List(bad, images, ["x", "y"])
    with pytest.raises(UserError, match="expected places205:LIST_FILE@IMAGES_ROOT"):
        ds.open_source(f"places205:{bad}", "val")
    with pytest.raises(UserError, match="does not exist"):
        ds.open_source(f"places205:{tmp_path}/absent.csv@{images}", "val")


# --------------------------------------------------------------------------------------------
# builtin:digits


def test_builtin_digits():
    train = ds.open_source("builtin:digits", "train")
    test = ds.open_source("builtin:digits", "test")
    assert (len(train), len(test)) == (1438, 359)
    assert train.classes == [str(c) for c in range(10)]
    assert ds.open_source("builtin:digits", "val").samples == test.samples
    assert not {p for p, _ in train.samples} & {p for p, _ in test.samples}
    # Stratified: 20% of each class (rounded half up) is in test.
    from sklearn.datasets import load_digits

    y = load_digits().target
    for c in range(10):
        n = int((y == c).sum())
        assert sum(1 for _, lab in test.samples if lab == c) == int(n * 0.2 + 0.5)
    img = train.load(17)
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.shape == (32, 32, 3) and arr.dtype == np.uint8
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all()
    # Nearest-neighbour 4x: each 4x4 block is one source pixel, 0..16 scaled to 0..255.
    idx = int(train.path(17).rsplit("/", 1)[1])
    src = load_digits().images[idx]
    assert train.path(17) == f"builtin:digits/train/{idx:05d}"
    assert np.array_equal(arr[::4, ::4, 0], np.rint(src * 255 / 16).astype(np.uint8))
    assert np.array_equal(arr[3::4, 3::4, 0], arr[::4, ::4, 0])
    assert train.label(17) == int(y[idx])
    assert ds.open_source("builtin:digits", "train").samples == train.samples  # deterministic
    assert ds.select_labelled(train, [f"{idx:05d}"]) == [17]
    with pytest.raises(UserError, match="builtin:digits has splits"):
        ds.open_source("builtin:digits", "extra")

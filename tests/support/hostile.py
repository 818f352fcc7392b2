"""A corpus of hostile files, generated at test time: each would run code or exhaust memory if a
loader trusted it. Payloads touch a marker file; a test asserts that file never appears.

Nothing here is a committed binary: every file is built by a function from its parts.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import h5py
import numpy as np


class Payload:
    """Unpickling this calls os.system: what a malicious checkpoint or npz would carry."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class ExecPayload:
    """The same through builtins.exec, another global a naive allowlist might miss."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


# ------------------------------------------------------------------------------- checkpoints


def checkpoint_torch_zip(path: Path, marker: Path, payload=Payload) -> Path:
    """torch.save's zip format, with the s4l marker and a payload in the metadata."""
    import torch

    torch.save({"format": "s4l-checkpoint", "format_version": 1, "model": {},
                "provenance": payload(marker)}, path)
    return path


def checkpoint_legacy_pickle(path: Path, marker: Path) -> Path:
    """A bare pickle (torch.load's legacy, non-zip path)."""
    path.write_bytes(pickle.dumps({"format": "s4l-checkpoint", "x": Payload(marker)}, protocol=2))
    return path


def checkpoint_real_with_payload(src: Path, path: Path, marker: Path) -> Path:
    """A genuine s4l checkpoint (loads and runs fine) with one payload added to its provenance."""
    import torch

    ck = torch.load(src, weights_only=True)
    ck["provenance"] = {"note": Payload(marker)}
    torch.save(ck, path)
    return path


CHECKPOINT_MAKERS = {
    "torch_zip_os_system": checkpoint_torch_zip,
    "torch_zip_exec": lambda p, m: checkpoint_torch_zip(p, m, ExecPayload),
    "legacy_pickle": checkpoint_legacy_pickle,
}


# ------------------------------------------------------------------------------- npz


def npz_object_array(path: Path, marker: Path) -> Path:
    np.savez(path, weights=np.zeros((2, 2), np.float32),
             classes=np.array([Payload(marker)], dtype=object))
    return path


def npz_zip_bomb(path: Path, inflated: int = 64 << 20) -> Path:
    """A small file whose member inflates to `inflated` bytes of zeros (a valid .npy)."""
    header = np.lib.format
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        with z.open("w.npy", "w", force_zip64=True) as f:
            header.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                              "shape": (inflated // 4,)})
            block = b"\0" * (1 << 20)
            for _ in range(inflated // len(block)):
                f.write(block)
    return path


# ------------------------------------------------------------------------------- HDF5


def _h5_base(f: h5py.File, n: int = 4, d: int = 3) -> None:
    f.attrs["schema_version"] = 1
    f.attrs["model_hash"] = "x"
    f.attrs["layer"] = "pre_logits"
    f.create_dataset("labels", data=np.zeros(n, np.int64))
    f.create_dataset("paths", data=[f"c/{i}.jpg" for i in range(n)], dtype=h5py.string_dtype())


def h5_external_link(path: Path, other: Path) -> Path:
    with h5py.File(other, "w") as g:
        g.create_dataset("secret", data=np.ones((4, 3), np.float32))
    with h5py.File(path, "w") as f:
        _h5_base(f)
        f["features"] = h5py.ExternalLink(str(other), "/secret")
    return path


def h5_virtual(path: Path, other: Path) -> Path:
    with h5py.File(other, "w") as g:
        g.create_dataset("secret", data=np.ones((4, 3), np.float32))
    layout = h5py.VirtualLayout(shape=(4, 3), dtype=np.float32)
    layout[...] = h5py.VirtualSource(str(other), "secret", shape=(4, 3))
    with h5py.File(path, "w") as f:
        _h5_base(f)
        f.create_virtual_dataset("features", layout)
    return path


def h5_external_storage(path: Path, other: Path) -> Path:
    other.write_bytes(np.ones((4, 3), np.float32).tobytes())
    with h5py.File(path, "w") as f:
        _h5_base(f)
        f.create_dataset("features", shape=(4, 3), dtype=np.float32,
                         external=[(str(other), 0, 4 * 3 * 4)])
    return path


def h5_string_features(path: Path, other: Path) -> Path:
    with h5py.File(path, "w") as f:
        _h5_base(f)
        f.create_dataset("features", data=np.array([["a"] * 3] * 4, dtype=object),
                         dtype=h5py.string_dtype())
    return path


def h5_mismatched_lengths(path: Path, other: Path) -> Path:
    with h5py.File(path, "w") as f:
        _h5_base(f, n=3)
        f.create_dataset("features", data=np.zeros((4, 3), np.float32))
    return path


def h5_paths_too_short(path: Path, other: Path) -> Path:
    with h5py.File(path, "w") as f:
        _h5_base(f)
        del f["paths"]
        f.create_dataset("paths", data=["a"], dtype=h5py.string_dtype())
        f.create_dataset("features", data=np.zeros((4, 3), np.float32))
    return path


def h5_huge_declared_shape(path: Path, other: Path) -> Path:
    """A few KiB on disk that declares ~400 GB of features (unallocated chunks read as zeros)."""
    n = 100_000_000
    with h5py.File(path, "w") as f:
        _h5_base(f, n=4)
        del f["labels"], f["paths"]
        f.create_dataset("labels", shape=(n,), dtype=np.int64, chunks=(4096,))
        f.create_dataset("paths", shape=(n,), dtype=h5py.string_dtype(), chunks=(4096,))
        f.create_dataset("features", shape=(n, 1024), dtype=np.float32, chunks=(16, 1024))
    return path


def h5_nan_features(path: Path, other: Path) -> Path:
    x = np.zeros((4, 3), np.float32)
    x[2, 1] = np.nan
    with h5py.File(path, "w") as f:
        _h5_base(f)
        f.create_dataset("features", data=x)
    return path


def h5_no_schema(path: Path, other: Path) -> Path:
    with h5py.File(path, "w") as f:
        _h5_base(f)
        del f.attrs["schema_version"]
        f.create_dataset("features", data=np.zeros((4, 3), np.float32))
    return path


def h5_wrong_schema(path: Path, other: Path) -> Path:
    with h5py.File(path, "w") as f:
        _h5_base(f)
        f.attrs["schema_version"] = "one"
        f.create_dataset("features", data=np.zeros((4, 3), np.float32))
    return path


def h5_huge_error_list(path: Path, other: Path) -> Path:
    """A valid file whose `errors/path` list declares 10^8 strings and stores none of them."""
    with h5py.File(path, "w") as f:
        _h5_base(f)
        f.create_dataset("features", data=np.zeros((4, 3), np.float32))
        g = f.create_group("errors")
        for k in ("path", "reason"):
            g.create_dataset(k, shape=(10**8,), dtype=h5py.string_dtype(), chunks=(4096,))
    return path


H5_MAKERS = {
    "huge_error_list": (h5_huge_error_list, "stores only"),
    "external_link": (h5_external_link, "external link"),
    "virtual_dataset": (h5_virtual, "virtual dataset"),
    "external_storage": (h5_external_storage, "external file"),
    "string_features": (h5_string_features, "float array"),
    "mismatched_lengths": (h5_mismatched_lengths, "disagree"),
    "paths_too_short": (h5_paths_too_short, "paths must be"),
    "huge_declared_shape": (h5_huge_declared_shape, "stores only"),
    "no_schema_version": (h5_no_schema, "no schema_version"),
    "wrong_schema_version": (h5_wrong_schema, "not an integer"),
}


# ------------------------------------------------------------------------------- ONNX


def onnx_model(path: Path, *, external_location: str | None = None, domain: str | None = None,
               metadata: bool = True) -> Path:
    """A tiny model with the server's input/output contract; optionally hostile in one way."""
    from onnx import TensorProto, helper

    inp = helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", 8, 8, 3])
    out = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 4])
    nodes = [helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["f", "axes"], ["m"], keepdims=0),
             helper.make_node("MatMul", ["m", "w"], ["embedding0"])]
    opsets = [helper.make_opsetid("", 18)]
    if domain:
        nodes.append(helper.make_node("Evil", ["embedding0"], ["embedding"], domain=domain))
        opsets.append(helper.make_opsetid(domain, 1))
    else:
        nodes.append(helper.make_node("Identity", ["embedding0"], ["embedding"]))
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2])
    w = helper.make_tensor("w", TensorProto.FLOAT, [3, 4], np.ones(12, np.float32).tolist())
    if external_location is not None:
        w = TensorProto()
        w.name, w.data_type = "w", TensorProto.FLOAT
        w.dims.extend([3, 4])
        w.data_location = TensorProto.EXTERNAL
        for k, v in {"location": external_location, "offset": "0", "length": "48"}.items():
            e = w.external_data.add()
            e.key, e.value = k, v
    graph = helper.make_graph(nodes, "g", [inp], [out], initializer=[axes, w])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    if metadata:
        for k, v in {"s4l.preprocess": json.dumps({"resize": 8, "crop": 8, "interpolation": "area"}),
                     "s4l.embedding_dim": "4"}.items():
            helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, k: v})
    path.write_bytes(model.SerializeToString())
    return path


# ------------------------------------------------------------------------------- JSON files


LABEL_MAP_CASES = {
    "escapes_root": ('{"values": ["a/a_0000.jpg", "../../etc/passwd"]}', "escapes the data root"),
    "absolute": ('{"values": ["/etc/passwd"]}', "not a relative path"),
    "wrong_types": ('{"values": [1, 2]}', "expected"),
    "duplicate_key": ('{"values": ["a"], "values": ["b"]}', "appears twice"),
    "unknown_key": ('{"values": ["a"], "exec": "x"}', "unknown keys"),
    "duplicate_entry": ('{"values": ["a_0000.jpg", "a_0000.jpg"]}', "repeats"),
    "nan": ('{"values": NaN}', "not a number JSON allows"),
}


def label_maps(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, expected error fragment), one hostile label map per case."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (text, err) in LABEL_MAP_CASES.items():
        p = folder / f"{name}.json"
        p.write_text(text)
        out[name] = (p, err)
    return out


def oversized_file(path: Path, size: int) -> Path:
    """A sparse file of `size` bytes (takes no disk space)."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def pseudo_label_docs() -> dict[str, tuple[dict, str]]:
    base = {"format": "s4l-pseudo-labels", "version": 1, "class_names": ["a", "b"],
            "provenance": {}}
    return {
        "escapes_root": ({**base, "samples": [{"name": "../x.jpg", "label": 0}]}, "escapes"),
        "label_out_of_range": ({**base, "samples": [{"name": "a/x.jpg", "label": 7}]}, "not a class index"),
        "label_wrong_type": ({**base, "samples": [{"name": "a/x.jpg", "label": "0"}]}, "not a class index"),
        "duplicate_sample": ({**base, "samples": [{"name": "a/x.jpg", "label": 0}] * 2}, "listed twice"),
        "classes_wrong_type": ({**base, "class_names": {"a": 1}, "samples": []}, "class_names"),
        "samples_wrong_type": ({**base, "samples": "all"}, "samples must be"),
    }

"""An NVIDIA Triton model repository (onnxruntime backend, dynamic batching) from an s4l ONNX file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx

from s4l.io import atomic_path, atomic_write_text

_DTYPES = {onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.FLOAT: "TYPE_FP32",
           onnx.TensorProto.FLOAT16: "TYPE_FP16"}


def write_triton_repo(onnx_path: str | Path, repo: str | Path, *, model_name: str = "s4l",
                      max_batch_size: int = 32, max_queue_delay_us: int = 2000,
                      instances: int = 1, kind: str = "KIND_AUTO") -> Path:
    """Write ``repo/<model_name>/{config.pbtxt, labels.txt, 1/model.onnx}``; returns the model dir.

    Names, dtypes and per-item dims come from the ONNX graph itself (batch axis dropped, as
    Triton's ``max_batch_size > 0`` convention wants); labels from its s4l.class_names.
    """
    onnx_path, repo = Path(onnx_path), Path(repo)
    proto = onnx.load(str(onnx_path), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    names = json.loads(meta["s4l.class_names"]) if "s4l.class_names" in meta else None

    def _io(values, kind_: str) -> list[str]:
        blocks = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim][1:]
            lines = [f'    name: "{v.name}"', f"    data_type: {_DTYPES[t.elem_type]}",
                     f"    dims: [ {', '.join(str(d) for d in dims)} ]"]
            if kind_ == "output" and v.name == "logits" and names:
                lines.append('    label_filename: "labels.txt"')
            blocks.append("  {\n" + "\n".join(lines) + "\n  }")
        return blocks

    init_names = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in init_names]
    preferred = sorted({b for b in (4, 8, 16, max_batch_size) if b <= max_batch_size})
    config = "\n".join([
        f'name: "{model_name}"',
        'backend: "onnxruntime"',
        f"max_batch_size: {max_batch_size}",
        "input [\n" + ",\n".join(_io(inputs, "input")) + "\n]",
        "output [\n" + ",\n".join(_io(proto.graph.output, "output")) + "\n]",
        "dynamic_batching {",
        f"  preferred_batch_size: [ {', '.join(str(b) for b in preferred)} ]",
        f"  max_queue_delay_microseconds: {max_queue_delay_us}",
        "}",
        f"instance_group [ {{ count: {instances}, kind: {kind} }} ]",
        "parameters { key: \"s4l.preprocess\" value: { string_value: "
        + json.dumps(meta.get("s4l.preprocess", "")) + " } }",
        "",
    ])
    model_dir = repo / model_name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    with atomic_path(model_dir / "1" / "model.onnx") as tmp:
        shutil.copyfile(onnx_path, tmp)
    atomic_write_text(model_dir / "config.pbtxt", config)
    if names:
        atomic_write_text(model_dir / "labels.txt", "".join(f"{n}\n" for n in names))
    return model_dir

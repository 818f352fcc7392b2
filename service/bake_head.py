"""Bake one task head (s4l.heads) into an exported ONNX graph as its ``logits`` output.

For servers that only run a graph (Triton's ONNX backend, plain onnxruntime): ``logits =
embedding @ W.T + b`` is appended to the graph; any old ``logits`` output and the nodes only
it used are removed; the class names go into the metadata (``s4l.class_names``) and the head's
provenance into ``s4l.head``. The model hash stays: the backbone is the same.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from s4l.errors import UserError
from s4l.heads import Head, check
from s4l.io import atomic_path

EMBEDDING, LOGITS = "embedding", "logits"


def _prune_dead_nodes(graph) -> None:
    """Drop nodes none of whose outputs reach a graph output (after an output was removed)."""
    while True:
        needed = {o.name for o in graph.output}
        for n in graph.node:
            needed.update(n.input)
        dead = [n for n in graph.node if not any(o in needed for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def bake_head(onnx_in: str | os.PathLike, head: Head, onnx_out: str | os.PathLike, *,
              name: str = "head", parity_images: int = 4, seed: int = 0) -> dict:
    """Write ``onnx_out``: ``onnx_in`` with ``head`` as its ``logits``. Checks the head against
    the model (dim, hash, layer) first and the written graph against ``head.apply`` after.
    Returns {"max_abs_error", "max_rel_error"} of that parity check."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from s4l.service.backend import parse_metadata
    from s4l.service.export import set_metadata

    onnx_in, onnx_out = Path(onnx_in), Path(onnx_out)
    proto = onnx.load(str(onnx_in))
    meta = {p.key: p.value for p in proto.metadata_props}
    spec, _, dim = parse_metadata(meta, source=str(onnx_in))
    mh = meta.get("s4l.checkpoint_sha256")
    if not mh:
        from s4l.provenance import file_sha256

        mh = file_sha256(onnx_in)
    check(head, model_dim=dim, model_hash=mh, layer="pre_logits", name=name)
    g = proto.graph
    if EMBEDDING not in [o.name for o in g.output]:
        raise UserError(f"{onnx_in} has no {EMBEDDING!r} output")
    for o in [o for o in g.output if o.name == LOGITS]:
        g.output.remove(o)
    _prune_dead_nodes(g)
    taken = {t for n in g.node for t in (*n.input, *n.output)} | {i.name for i in g.initializer}
    if LOGITS in taken:
        raise UserError(f"{onnx_in}: a tensor named {LOGITS!r} is still in use; cannot bake")
    w_name, b_name, mm = "s4l_head_weight_t", "s4l_head_bias", "s4l_head_matmul"
    g.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(head.weight.T), w_name),
                          numpy_helper.from_array(head.bias.copy(), b_name)])
    g.node.extend([helper.make_node("MatMul", [EMBEDDING, w_name], [mm], name="s4l_head_matmul"),
                   helper.make_node("Add", [mm, b_name], [LOGITS], name="s4l_head_add")])
    g.output.append(helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["N", head.num_classes]))
    set_metadata(proto, {**{k: v for k, v in meta.items() if k.startswith("s4l.")},
                         "s4l.num_classes": str(head.num_classes),
                         "s4l.class_names": json.dumps(list(head.class_names)),
                         "s4l.head": json.dumps({"name": name, "solver": head.solver,
                                                 "metrics": head.metrics,
                                                 "provenance": head.provenance}, sort_keys=True)})
    onnx.checker.check_model(proto)
    onnx_out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(onnx_out) as tmp:  # renamed over onnx_out only if the parity check passes
        onnx.save(proto, str(tmp))
        sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        batch = np.random.default_rng(seed).integers(
            0, 256, (parity_images, spec.crop, spec.crop, 3), dtype=np.uint8)
        emb, logits = sess.run([EMBEDDING, LOGITS], {"images": batch})
        ref = head.apply(emb).astype(np.float64)
        err = float(np.abs(logits - ref).max())
        rel = err / max(float(np.abs(ref).max()), 1e-12)
        if rel > 1e-4:
            raise UserError(f"baked head disagrees with the artifact (max relative error {rel:.2e})")
    return {"max_abs_error": err, "max_rel_error": rel}

"""Print the TF-parity table of docs/pretrained.md: each committed fixture module imported, run in
torch and through `s4l export` + onnxruntime, compared with TensorFlow's stored outputs.

    .venv/bin/python dev/tfhub_parity_report.py      # no TensorFlow needed

Numbers are max |ours - TF| / max |TF| over the two fixed 224x224 images, per output.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/support/
from support.tfhub import FAMILIES, fixture_images, tf_outputs, unpack_fixture  # noqa: E402

from s4l.service.export import export_onnx  # noqa: E402
from s4l.training.checkpoint import load_for_inference  # noqa: E402
from s4l.training.tfhub.importer import import_tfhub  # noqa: E402

TF_NAME = {"pre_logits": "pre_logits", "classes": "classes", "rotation": "rotations",
           "embedding": "embeddings"}


def rel(a, b) -> float:
    b = np.asarray(b, np.float64)
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def main() -> int:
    import onnxruntime as ort

    images = fixture_images()
    rows = ["| family (BN scope) | output | torch vs TF | ONNX Runtime vs TF |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for family in FAMILIES:
            module = unpack_fixture(family, tmp / "m")
            ckpt = tmp / f"{family}.pt"
            import_tfhub(module, ckpt, progress=False)
            inf = load_for_inference(ckpt)
            heads = tuple(inf.spec.heads)
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            with torch.no_grad():
                out = {k: v.numpy() for k, v in inf.model(x, heads=heads).items()}
            export_onnx(ckpt, tmp / f"{family}.onnx")
            sess = ort.InferenceSession(str(tmp / f"{family}.onnx"),
                                        providers=["CPUExecutionProvider"])
            emb, logits = sess.run(["embedding", "logits"], {"images": images})
            onnx = {"pre_logits": emb, "classes": logits}
            for h in heads:
                if h != "classes":  # the ONNX embedding through the head's weights
                    lin = inf.model.heads[h]
                    onnx[h] = emb @ lin.weight.detach().numpy().T + lin.bias.detach().numpy()
            ref = tf_outputs(family)
            bn = "batch_norm" if family == "rotation_vat" else "batch_normalization"
            for name in ("pre_logits", *heads):
                rows.append(f"| {family} (`{bn}`) | {TF_NAME[name]} | "
                            f"{rel(out[name], ref[TF_NAME[name]]):.1e} | "
                            f"{rel(onnx[name], ref[TF_NAME[name]]):.1e} |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Embed image files with NVIDIA's own client, tritonclient, over the Open Inference Protocol v2.

It uses only calls Triton itself answers (live, ready, model ready, model metadata, infer with
UINT8 pixels), so the same script is meant to run against `s4l serve` and against the Triton
model repository `s4l export --triton-repo` writes (the latter not tried on our machines, which
run no Triton server). The eval crop happens here, with s4l's own
torch-free `s4l.imaging` (numpy + Pillow), because Triton receives pixels, not files; the crop
size comes from the model's metadata. (`s4l serve` also takes encoded files as the BYTES input
`image_bytes` and crops them itself; Triton would need a preprocessing model for that.)

    pip install "tritonclient[http]" s4l
    python docs/examples/triton_client.py --url 127.0.0.1:8000 --out embeddings.npz photo1.jpg photo2.png
    # with S4L_API_KEY set on the server: --api-key KEY (sent as Authorization: Bearer KEY)

tests/test_protocols_live.py runs this file against a real `s4l serve`.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import tritonclient.http as httpclient

from s4l.imaging import PreprocessSpec, decode_image, eval_crop


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("images", nargs="+", help="image files (JPEG, PNG, WebP, ...)")
    ap.add_argument("--url", default="127.0.0.1:8000", help="host:port, no scheme")
    ap.add_argument("--model", default="s4l")
    ap.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    ap.add_argument("--resize", type=int, default=None,
                    help="short side before the centre crop (default: ImageNet's 256/224 of the "
                         "crop, what `s4l export` records unless the model was trained otherwise)")
    ap.add_argument("--out", default=None, help="write every output to this .npz")
    args = ap.parse_args(argv)

    # A fresh dict per call: the client adds its own headers to the dict it is given.
    def headers() -> dict | None:
        return {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None

    client = httpclient.InferenceServerClient(url=args.url)
    if not (client.is_server_live(headers=headers()) and client.is_server_ready(headers=headers())):
        print(f"server at {args.url} is not ready", file=sys.stderr)
        return 1
    if not client.is_model_ready(args.model, headers=headers()):
        print(f"model {args.model} is not ready", file=sys.stderr)
        return 1

    meta = client.get_model_metadata(args.model, headers=headers())
    pixels = next(t for t in meta["inputs"] if t["name"] == "images")
    crop = pixels["shape"][1]  # [-1, H, W, 3]
    spec = PreprocessSpec(resize=args.resize, crop=crop) if args.resize else \
        PreprocessSpec.for_image_size(crop)
    batch = np.stack([eval_crop(decode_image(path), spec) for path in args.images])

    images = httpclient.InferInput("images", list(batch.shape), "UINT8")
    images.set_data_from_numpy(batch, binary_data=True)
    outputs = [httpclient.InferRequestedOutput(t["name"], binary_data=True) for t in meta["outputs"]]
    result = client.infer(args.model, [images], outputs=outputs, request_id="triton-client-example",
                          headers=headers())
    arrays = {t["name"]: result.as_numpy(t["name"]) for t in meta["outputs"]}
    for name, value in arrays.items():
        print(f"{name}: {value.dtype} {list(value.shape)}")
    if args.out:
        np.savez(args.out, **arrays)
    client.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

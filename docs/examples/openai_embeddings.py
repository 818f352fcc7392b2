"""Embed image files with the official OpenAI client against `s4l serve`'s /v1/embeddings.

The images travel as data URLs (`modality: "image"`, as infinity takes them); the client asks for
base64 (little-endian float32) unless `--float` is given, and decodes it itself. The vectors come
back unit-normalised, so a dot product is their cosine similarity.

    pip install openai
    python docs/examples/openai_embeddings.py --base-url http://127.0.0.1:8000/v1 --out embeddings.npy photo1.jpg photo2.png
    # with S4L_API_KEY set on the server: --api-key KEY (the client sends Authorization: Bearer KEY)

tests/test_protocols_live.py runs this file against a real `s4l serve`.
"""

from __future__ import annotations

import argparse
import base64
import mimetypes

import numpy as np
from openai import OpenAI


def data_url(path: str) -> str:
    mime = mimetypes.guess_type(path)[0] or "image/jpeg"
    with open(path, "rb") as f:
        return f"data:{mime};base64,{base64.b64encode(f.read()).decode('ascii')}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("images", nargs="+", help="image files (JPEG, PNG, WebP, ...)")
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default="none", help="the server's S4L_API_KEY, if it has one")
    ap.add_argument("--model", default="s4l")
    ap.add_argument("--float", action="store_true", help="ask for JSON floats instead of base64")
    ap.add_argument("--out", default=None, help="write the [N, D] vectors to this .npy")
    args = ap.parse_args(argv)

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    print("models:", [m.id for m in client.models.list()])
    res = client.embeddings.create(model=args.model, input=[data_url(p) for p in args.images],
                                   extra_body={"modality": "image"},
                                   **({"encoding_format": "float"} if args.float else {}))
    vectors = np.array([d.embedding for d in res.data], dtype=np.float32)
    print(f"embeddings: {list(vectors.shape)}, norms {np.round(np.linalg.norm(vectors, axis=1), 4).tolist()}")
    if len(vectors) > 1:
        print("cosine similarity of the first two:", float(vectors[0] @ vectors[1]))
    if args.out:
        np.save(args.out, vectors)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

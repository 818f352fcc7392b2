"""Protocols benchmark: Open Inference Protocol v2 and OpenAI requests vs /embed multipart, same run.

A real `s4l serve` on a standard-width ResNet50v2 at 224 px (untrained: speed does not depend on
the weights). One client sends requests of --images JPEGs (the same files every time), one
request of each variant in turn (the first rotating), for --duration seconds per round, so every
variant sees the same machine load; each round's images/s of a variant (over the time of its own
requests) is divided by that round's /embed images/s, and the median over rounds is reported.

- ``embed_multipart``: POST /embed, the files as multipart parts (the reference);
- ``v2_binary_bytes``: POST /v2/models/s4l/infer, input ``image_bytes`` BYTES [N] of the same
  files, binary tensor extension both ways (the like-for-like request: same decode and crop);
- ``v2_binary_uint8``: input ``images`` UINT8 [N,H,W,3], the same images cropped by the
  client beforehand (Triton's way: no decoding on the server), binary both ways;
- ``v2_json_uint8``: the same pixels as JSON ``data`` (a flat list, as tritonclient sends it;
  ``--json-layout nested`` for nested lists), output as JSON;
- ``openai_base64``: POST /v1/embeddings, the files as data URLs, base64 output.

Request bodies are built once before timing, so the client's encoding is not measured; the
server's parsing, decoding, inference and response writing are. Target: v2_binary_bytes within
5% of embed_multipart (ratio >= 0.95); JSON UINT8 is allowed to be slower and says by how much.

    .venv/bin/python benchmarks/protocols.py [--images 8] [--duration 30] [--rounds 5] [--out benchmarks/results/protocols.json]
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import struct
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from _report import host, write_report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
log = logging.getLogger("bench.protocols")

REFERENCE = "embed_multipart"


def bodies(blobs: list[bytes], crops: np.ndarray, url: str,
           json_layout: str = "flat") -> dict[str, tuple[str, bytes, dict]]:
    """variant -> (url, body, headers), built once."""
    multipart = httpx.Request("POST", url + "/embed", files=[
        ("files", (f"i{i}.jpg", b, "image/jpeg")) for i, b in enumerate(blobs)])
    multipart.read()

    def v2_binary(inp: dict, tail: bytes) -> tuple[str, bytes, dict]:
        head = json.dumps({"inputs": [{**inp, "parameters": {"binary_data_size": len(tail)}}],
                           "outputs": [{"name": "embedding", "parameters": {"binary_data": True}}]}
                          ).encode()
        return (url + "/v2/models/s4l/infer", head + tail,
                {"Inference-Header-Content-Length": str(len(head))})

    files_tail = b"".join(struct.pack("<I", len(b)) + b for b in blobs)
    json_uint8 = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8",
                                         "shape": list(crops.shape),
                                         "data": crops.ravel().tolist() if json_layout == "flat"
                                         else crops.tolist()}],
                             "outputs": [{"name": "embedding"}]}).encode()
    openai = json.dumps({"model": "s4l", "encoding_format": "base64", "input": [
        "data:image/jpeg;base64," + base64.b64encode(b).decode() for b in blobs]}).encode()
    return {
        REFERENCE: (url + "/embed", multipart.content, dict(multipart.headers)),
        "v2_binary_bytes": v2_binary({"name": "image_bytes", "datatype": "BYTES",
                                      "shape": [len(blobs)]}, files_tail),
        "v2_binary_uint8": v2_binary({"name": "images", "datatype": "UINT8",
                                      "shape": list(crops.shape)}, crops.tobytes()),
        "v2_json_uint8": (url + "/v2/models/s4l/infer", json_uint8,
                          {"Content-Type": "application/json"}),
        "openai_base64": (url + "/v1/embeddings", openai, {"Content-Type": "application/json"}),
    }


def embeddings_of(variant: str, r: httpx.Response, n: int) -> np.ndarray:
    """Each variant's embeddings, for the parity check before timing."""
    if variant == REFERENCE:
        return np.array([x["embedding"] for x in r.json()["results"]], np.float32)
    if variant == "openai_base64":
        return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in r.json()["data"]])
    if "inference-header-content-length" in r.headers:
        k = int(r.headers["inference-header-content-length"])
        return np.frombuffer(r.content[k:], "<f4").reshape(n, -1)
    out = r.json()["outputs"][0]
    return np.array(out["data"], np.float32).reshape(out["shape"])


def interleaved(client: httpx.Client, reqs: dict, seconds: float, images: int) -> dict[str, float]:
    """One request of each variant in turn (the first one rotating) until ``seconds`` pass;
    images/s of each variant over its own requests' time. Interleaving request by request,
    rather than in windows, gives every variant the same share of a shared machine's swings."""
    spent = dict.fromkeys(reqs, 0.0)
    count = dict.fromkeys(reqs, 0)
    names, k, t_end = list(reqs), 0, time.perf_counter() + seconds
    while time.perf_counter() < t_end or k < len(names):
        for name in names[k % len(names):] + names[:k % len(names)]:
            url, body, headers = reqs[name]
            t0 = time.perf_counter()
            r = client.post(url, content=body, headers=headers)
            spent[name] += time.perf_counter() - t0
            r.raise_for_status()
            count[name] += 1
        k += 1
    return {name: count[name] * images / spent[name] for name in names}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8, help="images per request (N)")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per round")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (a ratio each; median reported)")
    ap.add_argument("--tiny", action="store_true",
                    help="the tests' tiny model (width 1/16, 32 px) instead of ResNet50v2 at 224: "
                         "inference then costs little, so the request path itself is compared")
    ap.add_argument("--json-layout", choices=["flat", "nested"], default="flat",
                    help="JSON `data` of v2_json_uint8: flat (what tritonclient sends) or nested lists")
    ap.add_argument("--workdir", default=None, help="reuse the exported model here")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from heads import jpegs
    from serve import build_model
    from support.server import ServerProcess, export_tiny

    from s4l.imaging import PreprocessSpec, decode_image, eval_crop

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="s4l-bench-protocols-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        model = workdir / "tiny.onnx" if (workdir / "tiny.onnx").exists() else export_tiny(workdir)
        model_name = "tiny s4l test model (ResNet50v2 width 1/16, 32 px), fp32 onnxruntime CPU"
    else:
        model, _ = build_model(workdir, None, 0, 0, reuse=True)
        model_name = "ResNet50v2 width 1, 224 px, untrained, fp32 onnxruntime CPU"
    blobs = jpegs(args.images, size=320)
    env = {"S4L_MAX_IMAGES_PER_REQUEST": str(max(64, args.images))}
    times: dict[str, list[float]] = {}
    with ServerProcess(model, env=env, log=workdir / "server.log") as srv:
        info = httpx.get(srv.url + "/info").json()
        spec = PreprocessSpec.from_dict(info["preprocess"])
        crops = np.stack([eval_crop(decode_image(b), spec) for b in blobs])
        reqs = bodies(blobs, crops, srv.url, args.json_layout)
        with httpx.Client(timeout=300) as c:
            ref = None
            for name, (url, body, headers) in reqs.items():  # warm-up and parity
                r = c.post(url, content=body, headers=headers)
                r.raise_for_status()
                emb = embeddings_of(name, r, args.images)
                if ref is None:
                    ref = emb
                unit = ref / np.linalg.norm(ref, axis=1, keepdims=True)
                np.testing.assert_allclose(emb, unit if name == "openai_base64" else ref,
                                           rtol=1e-5, atol=1e-6, err_msg=name)
            for rnd in range(args.rounds):
                for name, rate in interleaved(c, reqs, args.duration, args.images).items():
                    times.setdefault(name, []).append(rate)
                log.info("round %d: %s", rnd, ", ".join(f"{k} {v[-1]:.2f} img/s" for k, v in times.items()))
    per_round = {name: [v / e for v, e in zip(times[name], times[REFERENCE])]
                 for name in times if name != REFERENCE}
    med = {name: float(np.median(v)) for name, v in per_round.items()}
    json_vs_binary = [j / b for j, b in zip(times["v2_json_uint8"], times["v2_binary_uint8"])]
    result = {
        "benchmark": "protocols",
        "what": f"images/s of each protocol's request of {args.images} images over /embed "
                "multipart on the same images, same server, requests interleaved one by one",
        "command": "benchmarks/protocols.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "host": host(),
        "model": model_name,
        "server": {"batching": info["batching"], "threads": info["threads"]},
        "json_layout": args.json_layout,
        "images_per_request": args.images, "round_s": args.duration, "rounds": args.rounds,
        "images_per_s": times,
        "per_round": {f"{k}_over_{REFERENCE}": v for k, v in per_round.items()},
        "ratios": {**{f"{k}_over_{REFERENCE}": v for k, v in med.items()},
                   "v2_json_uint8_over_v2_binary_uint8": float(np.median(json_vs_binary))},
        "bytes_per_request": {k: len(v[1]) for k, v in reqs.items()},
        "target": "v2_binary_bytes within 5% of embed_multipart (ratio >= 0.95)",
        "met": bool(med["v2_binary_bytes"] >= 0.95),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        write_report(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

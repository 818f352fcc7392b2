"""`s4l serve`: the HTTP feature service on an exported ONNX model (no torch imported)."""

from __future__ import annotations

import argparse
import logging

HELP = ("serve an exported ONNX model over HTTP (/embed, /classify, /heads, /search, /healthz, "
        "/readyz, /info, /metrics; Open Inference Protocol v2 under /v2; OpenAI-style "
        "/v1/embeddings)")

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    # Defaults None: unset options fall back to S4L_* environment variables, then Settings defaults.
    parser.add_argument("--model", help="ONNX file from `s4l export` (env S4L_MODEL)")
    parser.add_argument("--host", help="bind address (env S4L_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (env S4L_PORT, default 8000)")
    parser.add_argument("--provider", choices=["cpu", "cuda", "auto"],
                        help="execution provider (env S4L_PROVIDER, default cpu); cuda refuses to "
                             "start without CUDA")
    parser.add_argument("--backend", help="onnxruntime (default) or openvino (env S4L_BACKEND; "
                        "openvino needs pip install 's4l[openvino]')")
    parser.add_argument("--precision", help="fp32, bf16 or auto (env S4L_PRECISION, default auto: "
                        "bf16 on openvino where the CPU has native bf16 and the parity gate passes, "
                        "else fp32)")
    parser.add_argument("--parity-images", metavar="DIR",
                        help="held-out images for openvino's parity gate (env S4L_PARITY_IMAGES; "
                             "default: built-in crops)")
    parser.add_argument("--max-batch-size", type=int, help="env S4L_MAX_BATCH_SIZE (default 0 = auto: 2 x usable CPUs on CPU, 32 on CUDA)")
    parser.add_argument("--head", action="append", metavar="NAME=PATH",
                        help="a task head from `s4l probe` (heads/*.npz), served as "
                             "/classify?head=NAME; repeat for several (env S4L_HEADS, comma-separated)")
    parser.add_argument("--max-wait-ms", type=float, help="env S4L_MAX_WAIT_MS (default 5)")
    parser.add_argument("--gallery", action="append", metavar="NAME=FEATURES.H5",
                        help="serve an `s4l extract` feature file of this model to POST /search "
                             "(repeatable; env S4L_GALLERIES=NAME=PATH,NAME=PATH)")
    parser.add_argument("--gallery-dtype", choices=["float32", "float16"],
                        help="gallery storage (env S4L_GALLERY_DTYPE, default float32; float16 "
                             "halves the memory, searches slower)")


def main(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from s4l.errors import UserError
    from s4l.service.app import create_app, load_backend
    from s4l.service.backend import ModelLoadError
    from s4l.service.gallery import GalleryError, load_galleries
    from s4l.service.settings import Settings

    overrides = {k: v for k, v in {
        "model": args.model, "host": args.host, "port": args.port, "provider": args.provider,
        "backend": args.backend, "precision": args.precision, "parity_images": args.parity_images,
        "max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms,
        "heads": tuple(args.head) if args.head else None,
        "galleries": args.gallery, "gallery_dtype": args.gallery_dtype}.items()
        if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        reasons = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: "
                            f"{err['msg'].removeprefix('Value error, ')}" for err in e.errors())
        raise UserError(f"bad server settings: {reasons}") from e
    if settings.model is None:
        raise UserError("no model: pass --model model.onnx or set S4L_MODEL")
    try:
        backend = load_backend(settings)
    except ModelLoadError as e:
        raise UserError(str(e)) from e
    try:
        galleries = load_galleries(settings.galleries, backend.info, settings.gallery_dtype)
    except GalleryError as e:
        backend.close()
        raise UserError(str(e)) from e
    app = create_app(settings, backend=backend, galleries=galleries)
    log.info("serving %s on http://%s:%d (%s, %s %s)", settings.model, settings.host,
             settings.port, backend.provider, getattr(backend, "backend", "onnxruntime"),
             getattr(backend, "precision", "fp32"))
    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            log_level=settings.log_level.lower(),
                            timeout_graceful_shutdown=settings.graceful_shutdown_s,
                            limit_concurrency=None, access_log=False)
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1

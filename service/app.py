"""The FastAPI app factory: routers, limits, metrics, auth and the lifespan (warm-up, drain)."""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html

import s4l
from s4l.errors import UserError
from s4l.service import (
    routes_classify,
    routes_embed,
    routes_heads,
    routes_health,
    routes_info,
    routes_metrics,
    routes_openai,
    routes_search,
    routes_v2,
)
from s4l.service.backend import Backend, OnnxBackend, available_cpus
from s4l.service.batching import MicroBatcher
from s4l.service.deps import ApiKey
from s4l.service.errors import error_json, install_error_handlers
from s4l.service.gallery import Gallery, load_galleries
from s4l.service.head_registry import HeadRegistry, load_registry, reload_heads
from s4l.service.limits import BodyLimitMiddleware, BodyTooLarge
from s4l.service.pipeline import ServiceState
from s4l.service.settings import Settings
from s4l.service.telemetry import Metrics, MetricsMiddleware

log = logging.getLogger(__name__)

_ROUTERS = (routes_health, routes_embed, routes_classify, routes_heads, routes_search, routes_info,
            routes_metrics, routes_v2, routes_openai)
# Routers that speak another protocol (Open Inference Protocol v2, OpenAI), with its error shape.
_PROTOCOLS = (routes_v2, routes_openai)

DESCRIPTION = (
    "Embeddings and class predictions from an `s4l export` ONNX model. Images go through the "
    "same decode and eval crop as training (s4l.imaging); the model scales pixels itself. "
    "Errors are `{\"error\": {\"code\", \"message\"}}`; a bad image in a batch gets its own error "
    "entry and never fails the others.")


def load_heads(settings: Settings, backend: Backend) -> HeadRegistry:
    """The heads named in the settings, checked against the model (UserError on a mismatch)."""
    return load_registry(settings.heads, backend.info,
                         has_logits=bool(backend.info.num_classes))


def load_backend(settings: Settings) -> Backend:
    """The backend the settings ask for. OpenVINO also passes its parity gate here (with the
    settings' task heads), so a model that fails it never starts serving (docs/service.md)."""
    if settings.model is None:
        raise ValueError("no model: pass --model or set S4L_MODEL")
    if settings.backend == "openvino":
        from s4l.service.backend_openvino import open_openvino_backend

        return open_openvino_backend(settings, heads=lambda b: load_heads(settings, b).heads)
    from s4l.service.backend_openvino import resolve_precision

    resolve_precision("onnxruntime", settings.precision, None)  # bf16 refused here, one line
    return OnnxBackend(settings.model, provider=settings.provider,
                       intra_op_threads=settings.intra_op_threads, model_id=settings.model_id,
                       spinning=settings.ort_spinning)


def effective_max_batch_size(settings: Settings, backend: Backend) -> int:
    """The micro-batch cap. Auto (0): 32 on CUDA; on CPU 2 x the usable CPUs, because with
    closed-loop clients a batch as large as the number of clients leaves nothing to decode while
    it runs, and decoding then serialises with inference. Measured with benchmarks/serve.py on 2
    cores, 8 clients: cap 32 gave 0.74x raw throughput, cap 8 0.82x, cap 4 0.93x (0.94x at 32
    clients)."""
    if settings.max_batch_size:
        return settings.max_batch_size
    if "CUDA" in getattr(backend, "provider", ""):
        return 32
    return 2 * available_cpus()


def create_app(settings: Settings | None = None, backend: Backend | None = None,
               galleries: dict[str, Gallery] | None = None) -> FastAPI:
    """Build the app. Without ``backend`` the ONNX model named by the settings is loaded now,
    so a bad model or a missing provider fails here, before the server listens; so are the
    settings' galleries without ``galleries`` (GalleryError on a mismatch)."""
    settings = settings or Settings()
    backend = backend if backend is not None else load_backend(settings)
    heads = load_heads(settings, backend)
    if galleries is None:
        galleries = load_galleries(settings.galleries, backend.info, settings.gallery_dtype)
    metrics = Metrics()
    metrics.backend_info(getattr(backend, "backend", "onnxruntime"),
                         getattr(backend, "precision", "fp32"), backend.provider)
    batcher = MicroBatcher(backend.run, max_batch_size=effective_max_batch_size(settings, backend),
                           max_wait_s=settings.max_wait_ms / 1000.0,
                           max_queue_images=settings.max_queue_images, observer=metrics)
    decode_threads = settings.decode_threads or available_cpus()
    pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="s4l-decode")
    state = ServiceState(settings=settings, backend=backend, metrics=metrics, batcher=batcher,
                         decode_pool=pool, decode_threads=decode_threads, heads=heads,
                         galleries=galleries,
                         search_pool=ThreadPoolExecutor(1, thread_name_prefix="s4l-search")
                         if galleries else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        await _warm_up(state)
        hup = _install_sighup(state)
        try:
            yield
        finally:
            if hup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            state.ready, state.not_ready_reason = False, "shutting down"
            await batcher.stop()  # in-flight requests finish first (uvicorn waits for them)
            pool.shutdown(wait=True)
            if state.search_pool is not None:
                state.search_pool.shutdown(wait=True)
            backend.close()

    app = FastAPI(title="s4l service", version=s4l.__version__, description=DESCRIPTION,
                  lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.s4l = state
    install_error_handlers(app)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_, exc: BodyTooLarge):
        return error_json(413, "payload_too_large", str(exc), {"Connection": "close"})

    for m in _ROUTERS:
        app.include_router(m.router)

    @app.get("/openapi.json", include_in_schema=False, dependencies=[ApiKey])
    async def openapi():
        return app.openapi()

    @app.get("/docs", include_in_schema=False, dependencies=[ApiKey])
    async def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="s4l service")

    routes = {"/openapi.json", "/docs"} | {
        r.path for m in _ROUTERS for r in m.router.routes if hasattr(r, "path")}
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes,
                       error_shapes={m.PREFIX: m.error_body for m in _PROTOCOLS})
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=routes)
    return app


def _install_sighup(state: ServiceState) -> bool:
    """SIGHUP re-reads the head files (as POST /admin/reload-heads does), off the event loop."""
    loop = asyncio.get_running_loop()

    def reload() -> None:
        try:
            reg = reload_heads(state)
            log.info("SIGHUP: heads reloaded (generation %d): %s", reg.generation, reg.names)
        except UserError as e:
            log.warning("SIGHUP: head reload refused, old heads kept: %s", e)

    try:
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.run_in_executor(None, reload))
    except (ValueError, RuntimeError, NotImplementedError, AttributeError):
        return False  # not the main thread (test clients) or no SIGHUP on this platform
    return True


async def _warm_up(state: ServiceState) -> None:
    """A real inference in a worker thread: /readyz says ready only after it worked."""
    size = state.backend.info.image_size
    try:
        await asyncio.get_running_loop().run_in_executor(
            None, state.backend.run, np.zeros((1, size, size, 3), np.uint8))
    except Exception as e:
        log.exception("warm-up inference failed")
        state.ready, state.not_ready_reason = False, f"warm-up inference failed: {e}"
        return
    state.ready, state.not_ready_reason = True, ""
    log.info("ready: model %s on %s", state.backend.info.model_id, state.backend.provider)

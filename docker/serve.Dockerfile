# s4l feature service, CPU: slim Python + the `serve` extra only (onnxruntime, FastAPI; NO torch).
# Build from the repository root:
#   docker build -f docker/serve.Dockerfile -t s4l-serve .
# Run with the model mounted read-only:
#   docker run --rm -p 8000:8000 -v $PWD/demo-out/model.onnx:/models/model.onnx:ro s4l-serve
# or copy it into a derived image:
#   FROM s4l-serve
#   COPY --chown=s4l:s4l model.onnx /models/model.onnx
# tests/test_serve_env.py reproduces this image's Python environment without Docker.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY s4l ./s4l
COPY training ./training
COPY evaluation ./evaluation
COPY service ./service
# A wheel of the whole distribution; only the serve extra's dependencies are installed below.
RUN pip wheel --no-deps -w /wheels . \
 && python -m venv /opt/s4l \
 && /opt/s4l/bin/pip install "$(ls /wheels/s4l-*.whl)[serve]"

FROM python:3.11-slim
ENV PATH=/opt/s4l/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    S4L_MODEL=/models/model.onnx S4L_HOST=0.0.0.0 S4L_PORT=8000 S4L_PROVIDER=cpu
COPY --from=build /opt/s4l /opt/s4l
# Fails the build if torch slipped into the serve extra.
RUN ! python -c "import torch" 2>/dev/null \
 && groupadd --system s4l && useradd --system --gid s4l --no-create-home s4l \
 && mkdir -p /models && chown s4l:s4l /models
USER s4l
EXPOSE 8000
# Liveness only; orchestrators should gate traffic on /readyz (model loaded + warm-up done).
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
  CMD python -c "import os,urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"S4L_PORT\",\"8000\")}/healthz', timeout=2)" || exit 1
# SIGTERM -> uvicorn's graceful shutdown: in-flight requests finish (S4L_GRACEFUL_SHUTDOWN_S).
STOPSIGNAL SIGTERM
ENTRYPOINT ["s4l", "serve"]

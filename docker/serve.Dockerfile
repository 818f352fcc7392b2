# s4l feature service, CPU: slim Python + the `serve` extra only (onnxruntime, FastAPI; NO torch,
# no compilers), non-root, HEALTHCHECK on /readyz. Build from the repository root:
#   docker build -f docker/serve.Dockerfile -t s4l-serve .
# Run with the model mounted read-only (a read-only root with a tmpfs for /tmp works):
#   docker run --rm -p 8000:8000 --read-only --tmpfs /tmp \
#       -v $PWD/demo-out/model.onnx:/models/model.onnx:ro s4l-serve
# Build arguments:
#   BASE_IMAGE  any Debian/Ubuntu-like image with python3 (>= 3.11) and its venv module
#   PIP_OFFLINE=1  install only from docker/wheelhouse (pip --no-index), e.g. behind a proxy
#   EXTRAS       the s4l extras installed (default "serve openvino": onnxruntime and the OpenVINO
#                backend, S4L_BACKEND=openvino; "serve" alone is ~180 MB smaller, docker/README.md)
# tests/test_container_images.py builds and runs this image against a real engine (docker/build.sh).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG PIP_OFFLINE=0
ARG EXTRAS="serve openvino"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY docker/wheelhouse /wheelhouse
COPY pyproject.toml README.md ./
COPY docker/requirements.py ./docker/
# The extras' dependencies first (a layer that survives source edits), then s4l itself.
RUN if [ "$PIP_OFFLINE" = 1 ]; then set -- --no-index --find-links /wheelhouse; fi \
 && python3 -m venv /opt/s4l \
 && python3 docker/requirements.py $EXTRAS > /tmp/req.txt \
 && /opt/s4l/bin/pip install -q "$@" -r /tmp/req.txt
COPY s4l ./s4l
COPY training ./training
COPY evaluation ./evaluation
COPY service ./service
COPY study ./study
RUN if [ "$PIP_OFFLINE" = 1 ]; then set -- --no-index --find-links /wheelhouse; fi \
 && /opt/s4l/bin/pip install -q "$@" --no-deps . \
 && /opt/s4l/bin/pip uninstall -q -y pip setuptools

FROM ${BASE_IMAGE}
ENV PATH=/opt/s4l/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    S4L_MODEL=/models/model.onnx S4L_HOST=0.0.0.0 S4L_PORT=8000 S4L_PROVIDER=cpu
COPY --from=build /opt/s4l /opt/s4l
# Fails the build if torch slipped into the serve extra.
RUN ! python -c "import torch" 2>/dev/null \
 && groupadd --system s4l && useradd --system --gid s4l --no-create-home s4l \
 && mkdir -p /models && chown s4l:s4l /models
USER s4l
WORKDIR /tmp
EXPOSE 8000
# Healthy once the model is loaded and warmed up (/readyz); /healthz is liveness only.
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('S4L_PORT', '8000'), timeout=2)"]
# SIGTERM -> uvicorn's graceful shutdown: in-flight requests finish (S4L_GRACEFUL_SHUTDOWN_S).
STOPSIGNAL SIGTERM
ENTRYPOINT ["s4l", "serve"]

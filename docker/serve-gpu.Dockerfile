# s4l feature service on NVIDIA GPUs: CUDA + cuDNN runtime, onnxruntime-gpu, still no torch.
#   docker build -f docker/serve-gpu.Dockerfile -t s4l-serve-gpu .
#   docker run --rm --gpus all -p 8000:8000 -v $PWD/model.onnx:/models/model.onnx:ro s4l-serve-gpu
# S4L_PROVIDER=cuda (the default here): the server refuses to start when the CUDA provider cannot
# run, rather than silently serving on CPU (see docs/service.md).
# Build arguments: BASE_IMAGE (needs python3.11 or apt to get it), PIP_OFFLINE=1 (wheels from
# docker/wheelhouse only, pip --no-index).
ARG BASE_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04
FROM ${BASE_IMAGE}
ARG PIP_OFFLINE=0
# onnxruntime-gpu must match the base image's CUDA major: PyPI's 1.19-1.26 link CUDA 12
# (libcublas.so.12, checked on 1.26.0), 1.27.0 and newer link CUDA 13 (libcublas.so.13). With a
# CUDA 13 base image, pass e.g. --build-arg ORT_GPU="onnxruntime-gpu>=1.27".
ARG ORT_GPU="onnxruntime-gpu>=1.19,<1.27"
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN if ! python3.11 -c "import ensurepip" 2>/dev/null; then \
      apt-get update \
      && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
      && rm -rf /var/lib/apt/lists/*; fi
WORKDIR /src
COPY docker/wheelhouse /wheelhouse
COPY pyproject.toml README.md ./
COPY docker/requirements.py ./docker/
# The serve extra with onnxruntime-gpu in place of the CPU onnxruntime (same Python API); the
# dependencies first (a layer that survives source edits), then s4l itself.
RUN if [ "$PIP_OFFLINE" = 1 ]; then set -- --no-index --find-links /wheelhouse; fi \
 && python3.11 -m venv /opt/s4l \
 && python3.11 docker/requirements.py serve --without onnxruntime > /tmp/req.txt \
 && echo "$ORT_GPU" >> /tmp/req.txt \
 && /opt/s4l/bin/pip install -q "$@" -r /tmp/req.txt \
 && /opt/s4l/bin/python -c "import onnxruntime"
COPY s4l ./s4l
COPY training ./training
COPY evaluation ./evaluation
COPY service ./service
COPY study ./study
RUN if [ "$PIP_OFFLINE" = 1 ]; then set -- --no-index --find-links /wheelhouse; fi \
 && /opt/s4l/bin/pip install -q "$@" --no-deps . \
 && ! /opt/s4l/bin/python -c "import torch" 2>/dev/null \
 && cd / && rm -rf /src /wheelhouse /tmp/req.txt
ENV PATH=/opt/s4l/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    S4L_MODEL=/models/model.onnx S4L_HOST=0.0.0.0 S4L_PORT=8000 S4L_PROVIDER=cuda \
    S4L_MAX_BATCH_SIZE=64
RUN groupadd --system s4l && useradd --system --gid s4l --no-create-home s4l && mkdir -p /models
USER s4l
WORKDIR /tmp
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('S4L_PORT', '8000'), timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["s4l", "serve"]

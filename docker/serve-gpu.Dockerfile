# s4l feature service on NVIDIA GPUs: CUDA + cuDNN runtime, onnxruntime-gpu, still no torch.
#   docker build -f docker/serve-gpu.Dockerfile -t s4l-serve-gpu .
#   docker run --rm --gpus all -p 8000:8000 -v $PWD/model.onnx:/models/model.onnx:ro s4l-serve-gpu
# S4L_PROVIDER=cuda: the server refuses to start when the CUDA provider is absent, rather than
# silently serving on CPU (see docs/service.md).

FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY s4l ./s4l
COPY training ./training
COPY evaluation ./evaluation
COPY service ./service
# The serve extra minus the CPU onnxruntime, plus onnxruntime-gpu (same Python API).
RUN python3.11 -m venv /opt/s4l \
 && /opt/s4l/bin/pip install ".[serve]" \
 && /opt/s4l/bin/pip uninstall -y onnxruntime \
 && /opt/s4l/bin/pip install "onnxruntime-gpu>=1.17" \
 && ! /opt/s4l/bin/python -c "import torch" 2>/dev/null \
 && rm -rf /src
ENV PATH=/opt/s4l/bin:$PATH PYTHONUNBUFFERED=1 \
    S4L_MODEL=/models/model.onnx S4L_HOST=0.0.0.0 S4L_PORT=8000 S4L_PROVIDER=cuda \
    S4L_MAX_BATCH_SIZE=64
RUN groupadd --system s4l && useradd --system --gid s4l --no-create-home s4l && mkdir -p /models
WORKDIR /
USER s4l
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)" || exit 1
ENTRYPOINT ["s4l", "serve"]

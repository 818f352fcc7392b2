# s4l training / extraction: PyTorch with torchrun as the entry point (CUDA by default).
#   docker build -f docker/train.Dockerfile -t s4l-train .
#   docker run --rm --gpus all --ipc=host -v /data:/data -v $PWD/runs:/work/runs s4l-train \
#       --nproc-per-node=8 -m s4l.cli train --preset s4l_rotation_10pct --data /data/imagenet
# Multi-node: pass torchrun's --nnodes/--rdzv-* flags (see docs/service.md and the training docs).
# Build arguments:
#   BASE_IMAGE  default: the PyTorch CUDA runtime image (torch comes with it); any image with
#               python3 >= 3.11 and its venv module works when TORCH names a torch to install
#   TORCH       a torch requirement to install first, e.g. "torch==2.13.0" (empty: the base's)
#   WITHOUT     distributions to leave out of the extras, e.g. "torchvision" beside a CPU torch
#   PIP_OFFLINE=1  install only from docker/wheelhouse (pip --no-index)
# CPU variant, as tests/test_container_images.py builds it (docker/build.sh):
#   --build-arg BASE_IMAGE=python:3.11-slim --build-arg TORCH=torch==2.13.0 --build-arg WITHOUT=torchvision
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}
ARG PIP_OFFLINE=0
ARG TORCH=""
ARG WITHOUT=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
WORKDIR /src
COPY docker/wheelhouse /wheelhouse
COPY pyproject.toml README.md ./
COPY docker/requirements.py ./docker/
# With TORCH set: a venv of its own at /opt/s4l; otherwise the base image's Python (and torch).
# The dependencies first (a layer that survives source edits), then s4l itself.
RUN if [ "$PIP_OFFLINE" = 1 ]; then set -- --no-index --find-links /wheelhouse; fi \
 && if [ -n "$TORCH" ]; then python3 -m venv /opt/s4l; else mkdir -p /opt/s4l/bin \
      && ln -s "$(command -v python3)" /opt/s4l/bin/python; fi \
 && /opt/s4l/bin/python docker/requirements.py train eval export --without "$WITHOUT" > /tmp/req.txt \
 && /opt/s4l/bin/python -m pip install -q "$@" $TORCH -r /tmp/req.txt
COPY s4l ./s4l
COPY training ./training
COPY evaluation ./evaluation
COPY service ./service
COPY study ./study
RUN if [ "$PIP_OFFLINE" = 1 ]; then set -- --no-index --find-links /wheelhouse; fi \
 && /opt/s4l/bin/python -m pip install -q "$@" --no-deps . \
 && cd / && /opt/s4l/bin/python -c "import torch, s4l.training.trainer" \
 && rm -rf /src /wheelhouse /tmp/req.txt
ENV PATH=/opt/s4l/bin:$PATH
WORKDIR /work
ENTRYPOINT ["torchrun"]
CMD ["--help"]

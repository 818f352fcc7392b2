# s4l training / extraction on NVIDIA GPUs: CUDA PyTorch, torchrun as the entry point.
#   docker build -f docker/train.Dockerfile -t s4l-train .
#   docker run --rm --gpus all --ipc=host -v /data:/data -v $PWD/runs:/work/runs s4l-train \
#       --nproc-per-node=8 -m s4l.cli train --preset s4l_rotation_10pct --data /data/imagenet
# Multi-node: pass torchrun's --nnodes/--rdzv-* flags (see docs/service.md and the training docs).

FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY s4l ./s4l
COPY training ./training
COPY evaluation ./evaluation
COPY service ./service
# torch comes from the base image; the train/eval/export extras add the rest.
RUN pip install ".[train,eval,export]" && rm -rf /src
WORKDIR /work
ENTRYPOINT ["torchrun"]
CMD ["--help"]

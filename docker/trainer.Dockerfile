# The standalone trainer: `python -m embedding_trainer` (train, inspect, convert, render, demo, ...).
#
#   docker build -f docker/trainer.Dockerfile -t embedding-trainer .
#   docker run --gpus all -v "$PWD/photos:/data" -v "$PWD/models:/models" -v "$PWD/out:/out" embedding-trainer \
#       train --model /models/my-sd15 --images /data --name my-cat --output-dir /out --run-dir /out/runs/my-cat
#   docker run embedding-trainer demo            # the shipped demo, on the CPU
#
# Several GPUs: the same command under torchrun, one process per GPU (data-parallel, or a job file with `jobs`);
# NCCL needs more shared memory than Docker's default 64 MB, hence --ipc host (or --shm-size 1g):
#   docker run --gpus all --ipc host -v ... --entrypoint torchrun embedding-trainer \
#       --standalone --nproc-per-node 4 -m embedding_trainer train --model /models/my-sdxl --images /data ...
#
# Build arguments (defaults: public images and PyPI):
#   BASE_IMAGE   a Debian bookworm image (its python3 is 3.11)
#   TORCH_SPEC   the torch requirement; PyPI's torch 2.13.0 for Linux x86_64 is a CUDA build
#   PIP_OPTIONS  extra pip options, e.g. "--index-url https://download.pytorch.org/whl/cu124" or, for a build
#                from a local wheel set, "--no-index --find-links http://127.0.0.1:8000/wheels/" (builds run with
#                --network host; `python -m http.server` serves a folder of wheels)
ARG BASE_IMAGE=debian:bookworm-slim

# -- build: the virtual environment (the wheels and pip's work stay in this stage) --
FROM ${BASE_IMAGE} AS build
ARG TORCH_SPEC=torch==2.13.0
ARG PIP_OPTIONS=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
# torch first, in a layer of its own: the largest and the least often changed.
RUN /opt/venv/bin/pip install $PIP_OPTIONS "$TORCH_SPEC"
COPY docker/requirements-trainer.txt /tmp/requirements-trainer.txt
RUN /opt/venv/bin/pip install $PIP_OPTIONS -r /tmp/requirements-trainer.txt
COPY pyproject.toml README.md /src/
COPY embedding_trainer/ /src/embedding_trainer/
RUN /opt/venv/bin/pip install $PIP_OPTIONS --no-deps /src

# -- the image: Python, the environment and a user --
FROM ${BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/tmp/hf
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 trainer
COPY --from=build /opt/venv /opt/venv
USER trainer
WORKDIR /home/trainer
ENTRYPOINT ["python", "-m", "embedding_trainer"]
CMD ["--help"]

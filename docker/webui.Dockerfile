# AUTOMATIC1111's Stable Diffusion WebUI (v1.10.1) with Embedding Trainer built in, API on, as a non-root user.
#
#   docker build -f docker/webui.Dockerfile -t embedding-trainer-webui .
#   docker run --gpus all -p 7860:7860 \
#       -v "$PWD/models:/data/models" -v "$PWD/embeddings:/data/embeddings" \
#       -v "$PWD/outputs:/data/outputs" -v "$PWD/embtrain-runs:/data/embtrain-runs" embedding-trainer-webui
#   (or docker/compose.yaml). Extra WebUI options go after the image name, e.g. `... embedding-trainer-webui
#   --api-auth me:secret --xformers`, or in COMMANDLINE_ARGS.
#
# The WebUI's code lives read-only in /opt/webui, its data in /data (--data-dir): models/, embeddings/, outputs/,
# embtrain-runs/ (our run folders), extensions/ (your other extensions), config.json, caches. The folders must be
# writable by uid 1000 (the image's user).
#
# Build arguments (defaults: public images, GitHub and PyPI; the same file builds offline from local stand-ins):
#   BASE_IMAGE   a Debian bookworm image (its python3 is 3.11, which this WebUI release supports on Linux)
#   GITHUB       where source archives come from, as <GITHUB>/<owner>/<repo>/archive/<ref>.tar.gz
#   WEBUI_REPO, WEBUI_REF   the WebUI's source; the repositories below are the commits that release pins
#   TORCH_SPEC   the torch requirement: the WebUI's pin, which on PyPI is the CUDA 12.1 build
#   PIP_OPTIONS  extra pip options, e.g. "--no-index --find-links http://127.0.0.1:8000/wheels/" for a local wheel set
ARG BASE_IMAGE=debian:bookworm-slim

# -- build: sources and the virtual environment (downloads and pip's work stay in this stage) --
FROM ${BASE_IMAGE} AS build
ARG GITHUB=https://github.com
ARG WEBUI_REPO=AUTOMATIC1111/stable-diffusion-webui
ARG WEBUI_REF=v1.10.1
ARG TORCH_SPEC="torch==2.1.2 torchvision==0.16.2"
ARG PIP_OPTIONS=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
# The WebUI and, at the commits modules/launch_utils.py of v1.10.1 pins, the repositories its launcher would clone
# at first start (the image starts with --skip-prepare-environment: no git, no pip, no network at start-up).
RUN fetch() { mkdir -p "$2" && curl -fsSL "$GITHUB/$1.tar.gz" | tar -xz -C "$2" --strip-components=1; } \
    && fetch "$WEBUI_REPO/archive/$WEBUI_REF" /opt/webui \
    && mkdir -p /opt/webui/repositories && cd /opt/webui/repositories \
    && fetch AUTOMATIC1111/stable-diffusion-webui-assets/archive/6f7db241d2f8ba7457bac5ca9753331f0c266917 stable-diffusion-webui-assets \
    && fetch Stability-AI/stablediffusion/archive/cf1d67a6fd5ea1aa600c4df58e5b47da45f6bdbf stable-diffusion-stability-ai \
    && fetch Stability-AI/generative-models/archive/45c443b316737a4ab6e40413d7794a7f5657c19f generative-models \
    && fetch crowsonkb/k-diffusion/archive/ab527a9a6d347f364e3d185ba6d714e22d80cb3c k-diffusion \
    && fetch salesforce/BLIP/archive/48211a1594f1321b00f14c9f7a5b4813144b2fb9 BLIP \
    && mkdir -p /tmp/clip && cd /tmp/clip \
    && fetch openai/CLIP/archive/d50d76daa670286dd6cacf3bcd80b5e4823fc8e1 .
# torch first, in a layer of its own: the largest and the least often changed. setuptools 69.5.1 is the WebUI's
# pin; CLIP's setup.py needs its pkg_resources, so CLIP builds against it without build isolation.
# Every other package is pinned by docker/webui-constraints.txt to the set the Docker test tier ran.
COPY docker/webui-constraints.txt /tmp/constraints.txt
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install $PIP_OPTIONS -c /tmp/constraints.txt setuptools wheel \
    && /opt/venv/bin/pip install $PIP_OPTIONS -c /tmp/constraints.txt $TORCH_SPEC
RUN /opt/venv/bin/pip install $PIP_OPTIONS -c /tmp/constraints.txt -r /opt/webui/requirements_versions.txt \
    && /opt/venv/bin/pip install $PIP_OPTIONS -c /tmp/constraints.txt --no-build-isolation /tmp/clip \
    && rm -rf /tmp/clip /tmp/constraints.txt
# Embedding Trainer, as `git clone` would put it in extensions/; a built-in extension here, so that /data/extensions
# stays yours (a volume over it would hide anything the image put there).
COPY embedding_trainer/ /opt/webui/extensions-builtin/embedding-trainer/embedding_trainer/
COPY scripts/ /opt/webui/extensions-builtin/embedding-trainer/scripts/
COPY javascript/ /opt/webui/extensions-builtin/embedding-trainer/javascript/
COPY style.css install.py metadata.ini README.md /opt/webui/extensions-builtin/embedding-trainer/
COPY docker/webui-entrypoint.sh docker/webui-healthcheck.py /opt/webui/docker/

# -- the image: Python, git (the Extensions tab clones with it), OpenCV's libraries, the WebUI and a user --
FROM ${BASE_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/data/cache/huggingface \
    TORCH_HOME=/data/cache/torch \
    WEBUI_PORT=7860
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 git ca-certificates libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 webui \
    && mkdir -p /data/models/Stable-diffusion /data/embeddings /data/outputs /data/embtrain-runs /data/extensions \
        /data/cache /data/config_states \
    && chown -R webui:webui /data
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/webui /opt/webui
# The WebUI keeps saved extension states beside its code: keep them with the data.
RUN ln -s /data/config_states /opt/webui/config_states
USER webui
WORKDIR /opt/webui
EXPOSE 7860
# Healthy once the WebUI has started and its API answers (our routes are added after start-up; 401 counts: the
# server answered behind --api-auth). Large models take minutes to load: a long start period.
HEALTHCHECK --interval=15s --timeout=10s --start-period=10m --retries=3 \
    CMD ["python", "/opt/webui/docker/webui-healthcheck.py"]
ENTRYPOINT ["/opt/webui/docker/webui-entrypoint.sh"]

# syntax=docker/dockerfile:1
# CPU worker image of avatar-batch: the default `preview` backend, run by a Prefect process worker on the
# `avatar-render` pool (README "Production"). GPU workers use Dockerfile.cuda.
#
#   docker build -t avatar-batch:0.1.0 .
#   docker run --rm -e PREFECT_API_URL=http://prefect-server:4200/api avatar-batch:0.1.0
#
# Secrets (AWS_*, PREFECT_API_KEY) are never baked in: pass them at run time (docker-compose.yml).
FROM python:3.11.15-slim-bookworm

# PyTorch's CPU wheel index, used for torch alone: PyPI's Linux torch wheel is a multi-GB CUDA build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    AVATAR_BATCH_HOME=/srv/avatar-batch \
    DO_NOT_TRACK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false

# What the pipeline needs from Debian at run time: tini (PID 1: passes SIGTERM on to the worker and reaps its
# flow-run and ffmpeg children) and libgomp1 (OpenMP, numba's threading layer under librosa). The rest ships in
# the wheels: ffmpeg in imageio-ffmpeg and PyAV, libsndfile in soundfile, and opencv-python-headless needs no libGL.
# Debian versions are not pinned: a stable point release drops the old ones from the mirror and breaks the build.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 tini \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 avatar \
    && useradd --system --uid 10001 --gid avatar --create-home --home-dir /home/avatar \
        --shell /usr/sbin/nologin avatar \
    && python -m venv /opt/venv

WORKDIR /srv/avatar-batch

# `make install` without the dev tools: the pinned runtime stack first (its own layer, rebuilt only when
# requirements.txt changes), then the package itself with --no-deps. torch comes first, alone, from the CPU
# index, pinned as in requirements.txt; requirements.txt then finds it installed (2.13.0+cpu is ==2.13.0).
COPY requirements.txt ./
RUN pip install --no-deps --index-url "$TORCH_INDEX_URL" torch==2.13.0 \
    && pip install -r requirements.txt \
    && python -c "import torch; assert torch.version.cuda is None, torch.version.cuda"

COPY . .
RUN pip install --no-deps . \
    && rm -rf build ./*.egg-info \
    && mkdir -p out catalog weights \
    && chown avatar:avatar out catalog \
    && python -c "import flows.cli, tasks.graph"

# non-root; the code stays root-owned and read-only, only out/ and catalog/ (and $HOME/.prefect) are writable
USER 10001:10001

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["prefect", "worker", "start", "--pool", "avatar-render", "--type", "process"]

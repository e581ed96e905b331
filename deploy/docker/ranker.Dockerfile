# ctl ranker: Recommend and catalog ingestion over gRPC (ctl serve-ranker).
# No torch, no Pillow: numpy, grpcio, the Qdrant libraries. Build from the repository root:
#   docker build -f deploy/docker/ranker.Dockerfile -t ghcr.io/ctl-project/ctl-ranker:0.1.0 .
FROM python:3.11.14-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ctl ctl
COPY ctl_app ctl_app
COPY style_model style_model
COPY encoder_service encoder_service
COPY ranker_service ranker_service
RUN python -m venv /opt/ctl && /opt/ctl/bin/pip install .

FROM python:3.11.14-slim-bookworm
COPY --from=build /opt/ctl /opt/ctl
RUN useradd --system --uid 10001 --gid 0 --home-dir /var/lib/ctl --create-home ctl
USER 10001
WORKDIR /var/lib/ctl
ENV PATH=/opt/ctl/bin:$PATH PYTHONUNBUFFERED=1 CTL_RANKER_STORE_PATH=/var/lib/ctl/store/{model_version}
# glibc keeps a malloc arena per thread (gRPC runs several) and gives back little of what they held; with 2,
# the ranker returns the memory of large requests (bench/hostile.py: 739 -> 588 MiB at rest after them)
ENV MALLOC_ARENA_MAX=2
EXPOSE 50052 9465
HEALTHCHECK --interval=10s --timeout=4s --start-period=60s CMD ["ctl", "health", "localhost:50052"]
ENTRYPOINT ["ctl", "serve-ranker"]

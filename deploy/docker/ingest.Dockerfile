# ctl ingest: the bulk ingestion job (a catalog and its images, mounted at /catalog, streamed to the
# ranker). The base install: no torch, no Pillow. Build from the repository root:
#   docker build -f deploy/docker/ingest.Dockerfile -t ghcr.io/ctl-project/ctl-ingest:0.1.0 .
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
RUN useradd --system --uid 10001 --gid 0 --no-create-home ctl
USER 10001
ENV PATH=/opt/ctl/bin:$PATH PYTHONUNBUFFERED=1 CTL_PROGRESS=0
ENTRYPOINT ["ctl", "ingest"]

# ctl encoder: image bytes in, style embeddings out (ctl serve-encoder). CPU torch for the in-process
# backend; with --backend triton it only decodes images and calls Triton. Build from the repository root:
#   docker build -f deploy/docker/encoder.Dockerfile -t ghcr.io/ctl-project/ctl-encoder:0.1.0 .
# The exported model repository (ctl export) is mounted at /models, not baked in.
FROM python:3.11.14-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/ctl \
 && /opt/ctl/bin/pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml README.md ./
COPY ctl ctl
COPY ctl_app ctl_app
COPY style_model style_model
COPY encoder_service encoder_service
COPY ranker_service ranker_service
RUN /opt/ctl/bin/pip install '.[model,triton]'

FROM python:3.11.14-slim-bookworm
COPY --from=build /opt/ctl /opt/ctl
RUN useradd --system --uid 10001 --gid 0 --no-create-home ctl
USER 10001
ENV PATH=/opt/ctl/bin:$PATH PYTHONUNBUFFERED=1 CTL_ENCODER_MODEL_REPO=/models
# fewer glibc malloc arenas: the memory of large requests goes back to the system (see ranker.Dockerfile)
ENV MALLOC_ARENA_MAX=2
EXPOSE 50051 9464
HEALTHCHECK --interval=10s --timeout=4s --start-period=120s CMD ["ctl", "health", "localhost:50051"]
ENTRYPOINT ["ctl", "serve-encoder"]

# The kernel: registry, scheduler and request pipeline. The base package only: no torch,
# no transformers, so this image stays small (tests/contract/test_compose.py checks it).
#
#   docker build -f deploy/docker/kernel.Dockerfile -t llmos-kernel .   (repository root)
#
# Build stage: a virtual environment in /opt/llmos; the final stage copies only that.
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/llmos
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY protos/ protos/
COPY kernel/ kernel/
COPY services/ services/
COPY plugins/ plugins/
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/llmos/bin/pip install -c constraints.txt .

FROM python:3.11-slim
# A fixed numeric uid, the same in every llmos image: the data volume they share stays
# writable, and Kubernetes can verify runAsNonRoot.
RUN groupadd --gid 10001 llmos \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin llmos \
    && install -d -o 10001 -g 10001 /data
COPY --from=build /opt/llmos /opt/llmos
ENV PATH=/opt/llmos/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    LLMOS_HOST=0.0.0.0 \
    LLMOS_DATA_DIR=/data \
    LLMOS_LOG_FORMAT=json
USER 10001:10001
WORKDIR /home/llmos
# gRPC, and Prometheus /metrics (the gRPC port + 1000).
EXPOSE 50051 51051
CMD ["llmos", "serve", "kernel"]

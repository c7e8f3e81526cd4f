# One image for the light services: safety, privacy, explain and hardware. No torch.
# The process to run is the last word of the command (default: safety):
#
#   docker build -f deploy/docker/service.Dockerfile -t llmos-service .   (repository root)
#   docker run llmos-service llmos serve privacy
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
    /opt/llmos/bin/pip install -c constraints.txt '.[safety,privacy,hardware]'

FROM python:3.11-slim
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
# safety, privacy, explain, hardware: the kernel's port (50051) plus 2, 3, 4, 5; and
# their Prometheus /metrics, each on its gRPC port + 1000.
EXPOSE 50053 50054 50055 50056 51053 51054 51055 51056
CMD ["llmos", "serve", "safety"]

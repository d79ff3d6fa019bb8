# bgproxy: blue-green traffic-switching reverse proxy.
#
#   docker build -t bgproxy .
#   docker run --rm -p 8080:8080 -p 9901:9901 \
#     -e BGPROXY_ADMIN_TOKEN="$(openssl rand -hex 32)" \
#     -v "$PWD/bgproxy.yaml:/etc/bgproxy/bgproxy.yaml:ro" bgproxy
#
# Config:  /etc/bgproxy/bgproxy.yaml (mount yours over it; the image ships
#          config/examples/bgproxy.yaml there, whose admin listener is loopback-only).
# Ports:   8080 the public listener, 9901 the admin API, /metrics and the dashboard.
#          To reach 9901 from outside the container, set admin.listen to "0.0.0.0:9901"
#          and BGPROXY_ADMIN_TOKEN (bgproxy refuses a non-loopback admin without a token).
# Signals: SIGTERM drains and exits by drain.timeout; SIGHUP reloads the config file.
# See docs/edge-deployment.md.

# Build stage: wheels for bgproxy and its dependencies, so the final image holds
# neither the source tree nor pip's build leftovers.
# Python 3.11: the version the test suite runs on.
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A C compiler for the compiled hot path (setup.py); the final image needs none.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY proxy ./proxy
COPY admin ./admin
COPY config ./config
RUN pip wheel --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BGPROXY_HEALTHCHECK_URL=http://127.0.0.1:9901/healthz
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels bgproxy \
    && python -c 'from proxy import _hotpath; assert _hotpath.KIND == "compiled", _hotpath.describe()' \
    && groupadd --system --gid 10001 bgproxy \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin bgproxy
COPY config/examples/bgproxy.yaml /etc/bgproxy/bgproxy.yaml

# Numeric, so Kubernetes' runAsNonRoot can verify it without a runAsUser.
USER 10001:10001
EXPOSE 8080 9901
# Liveness of the admin listener, from inside the container (loopback works with the
# default config). Override BGPROXY_HEALTHCHECK_URL if admin.listen uses another port.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['BGPROXY_HEALTHCHECK_URL'], timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["bgproxy"]
CMD ["serve", "-c", "/etc/bgproxy/bgproxy.yaml"]

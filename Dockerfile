# bgproxy: blue-green traffic-switching reverse proxy.
#   docker build -t bgproxy .
#   docker run -p 8080:8080 -p 9901:9901 -v $PWD/bgproxy.yaml:/etc/bgproxy/bgproxy.yaml:ro bgproxy
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY admin ./admin
COPY config ./config
RUN pip install . && useradd --system --uid 10001 --no-create-home bgproxy \
    && mkdir -p /etc/bgproxy && cp config/examples/bgproxy.yaml /etc/bgproxy/bgproxy.yaml

USER bgproxy
EXPOSE 8080 9901
# The admin listener must be reachable inside the container for the health check;
# mount a config whose admin.listen is 0.0.0.0:9901 with BGPROXY_ADMIN_TOKEN set to expose it.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2)" || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["bgproxy"]
CMD ["serve", "-c", "/etc/bgproxy/bgproxy.yaml"]

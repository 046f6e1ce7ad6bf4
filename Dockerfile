# consoleproxy production image (docs/deploy.md).
#
#   docker build -t consoleproxy:0.1.0 .
#   docker run -d -p 443:8443 -v /srv/consoleproxy:/var/lib/consoleproxy \
#     -v /etc/consoleproxy/keys.json:/etc/consoleproxy/keys.json:ro consoleproxy:0.1.0
#
# Stage 1 fetches noVNC with npm (the version pinned in package-lock.json); stage 2 builds the
# Python wheel; the runtime is a slim Python image without node, npm or a compiler, running as an
# unprivileged user. Base images carry explicit version tags, never "latest".

FROM node:20.18-bookworm-slim AS novnc
WORKDIR /build
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --ignore-scripts --no-audit --no-fund

FROM python:3.11.10-slim-bookworm AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY consoleproxy ./consoleproxy
# With uvloop: serve's default event loop when it is installed (bench/README.md measures both).
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[uvloop]"

FROM python:3.11.10-slim-bookworm AS runtime
# ping and traceroute for `consoleproxy diagnose --ping/--traceroute` and POST /api/diagnostics.
RUN apt-get update \
    && apt-get install -y --no-install-recommends iputils-ping traceroute \
    && rm -rf /var/lib/apt/lists/*
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
RUN groupadd --system --gid 10001 consoleproxy \
    && useradd --system --uid 10001 --gid consoleproxy --home-dir /var/lib/consoleproxy \
       --shell /usr/sbin/nologin consoleproxy \
    && mkdir -p /etc/consoleproxy /var/lib/consoleproxy/certs \
    && chown -R consoleproxy:consoleproxy /var/lib/consoleproxy
COPY --from=novnc /build/node_modules/@novnc/novnc /opt/consoleproxy/novnc
COPY novnc_static /opt/consoleproxy/static
# The image's default configuration; mount your own file over it (every key can also be set with
# CONSOLEPROXY_<SECTION>_<KEY>). Port 8443: an unprivileged user cannot bind 443 everywhere.
RUN printf '%s\n' \
    '[listen]' 'address = "0.0.0.0"' 'ports = [8443]' 'tls = true' \
    '[admin]' 'address = "127.0.0.1"' 'port = 8001' 'key_file = "/var/lib/consoleproxy/admin.key"' \
    '[tls]' 'store = "/var/lib/consoleproxy/certs"' \
    '[tokens]' 'keyring = "/etc/consoleproxy/keys.json"' \
    '[page]' 'static_dir = "/opt/consoleproxy/static"' 'novnc_dir = "/opt/consoleproxy/novnc"' \
    > /etc/consoleproxy/consoleproxy.toml
USER consoleproxy:consoleproxy
WORKDIR /var/lib/consoleproxy
VOLUME ["/var/lib/consoleproxy"]
# 8443: console page, WebSocket, /healthz, /readyz. 8001: admin API (loopback unless
# CONSOLEPROXY_ADMIN_ADDRESS is set and a key file exists). 53/udp+tcp: the optional DNS responder.
EXPOSE 8443 8001
# Liveness only (/healthz); readiness (/readyz) is for load balancers. The certificate may be the
# development one, so this local probe does not verify it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import ssl, urllib.request; urllib.request.urlopen('https://127.0.0.1:8443/healthz', context=ssl._create_unverified_context(), timeout=4)"]
STOPSIGNAL SIGTERM
CMD ["consoleproxy", "serve", "--config", "/etc/consoleproxy/consoleproxy.toml"]

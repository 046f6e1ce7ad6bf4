# consoleproxy production image (docs/deploy.md).
#
#   docker build -t consoleproxy:0.3.0 .
#   docker run -d -p 443:8443 -v /srv/consoleproxy:/var/lib/consoleproxy \
#     -v /etc/consoleproxy/keys.json:/etc/consoleproxy/keys.json:ro consoleproxy:0.3.0
#
# Stage 1 fetches the noVNC tarball that package-lock.json pins; stage 2 builds the Python wheel,
# which carries the console page and noVNC (buildsupport/consoleproxy_build.py checks the tarball's
# sha512 against the lock); the runtime is a slim Python image without node, npm or a compiler,
# running as an unprivileged user. Base images carry explicit version tags, never "latest".
# tests/test_image.py runs these steps for real (no container engine): keep to WORKDIR, COPY, RUN,
# ENV and one instruction a line's meaning, and keep the facts (paths, user, ports) here and in
# docker/consoleproxy.toml only.

FROM node:20.18-bookworm-slim AS novnc
WORKDIR /build
COPY package.json package-lock.json ./
RUN mkdir -p /build/novnc \
    && npm pack --no-audit --no-fund --pack-destination /build/novnc \
       "@novnc/novnc@$(node -p "require('./package-lock.json').packages['node_modules/@novnc/novnc'].version")"

FROM python:3.11.10-slim-bookworm AS wheel
WORKDIR /src
COPY pyproject.toml README.md MANIFEST.in package.json package-lock.json ./
COPY buildsupport ./buildsupport
COPY consoleproxy ./consoleproxy
COPY novnc_static ./novnc_static
COPY --from=novnc /build/novnc ./build/novnc
# With uvloop: serve's default event loop when it is installed (bench/README.md measures both).
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[uvloop]"

FROM python:3.11.10-slim-bookworm AS runtime
LABEL org.opencontainers.image.title="consoleproxy" \
      org.opencontainers.image.version="0.3.0"
ENV CONSOLEPROXY_CONFIG=/etc/consoleproxy/consoleproxy.toml
# ping and traceroute for `consoleproxy diagnose --ping/--traceroute` and POST /api/diagnostics.
RUN apt-get update \
    && apt-get install -y --no-install-recommends iputils-ping traceroute \
    && rm -rf /var/lib/apt/lists/*
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
RUN groupadd --system --gid 10001 consoleproxy \
    && useradd --system --uid 10001 --gid consoleproxy --home-dir /var/lib/consoleproxy \
       --shell /usr/sbin/nologin consoleproxy
RUN mkdir -p /etc/consoleproxy /var/lib/consoleproxy/certs \
    && chown -R 10001:10001 /var/lib/consoleproxy
# The image's default configuration; mount your own file over it (every key can also be set with
# CONSOLEPROXY_<SECTION>_<KEY>). The page and noVNC come with the wheel.
COPY docker/consoleproxy.toml /etc/consoleproxy/consoleproxy.toml
USER 10001:10001
WORKDIR /var/lib/consoleproxy
VOLUME ["/var/lib/consoleproxy"]
# 8443: console page, WebSocket, /healthz, /readyz. 8001: admin API (loopback unless
# CONSOLEPROXY_ADMIN_ADDRESS is set and a key file exists). 53/udp+tcp: the optional DNS responder.
EXPOSE 8443 8001
# Liveness only (/healthz), at the port and scheme of the configuration (consoleproxy/healthcheck.py).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-m", "consoleproxy.healthcheck"]
STOPSIGNAL SIGTERM
CMD ["consoleproxy", "serve", "--config", "/etc/consoleproxy/consoleproxy.toml"]

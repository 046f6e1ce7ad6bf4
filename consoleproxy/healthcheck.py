"""The image's HEALTHCHECK: ``python -m consoleproxy.healthcheck [CONFIG]``; exit 0 when /healthz answers 200.

It reads the same configuration as ``serve`` (the file named on the command line or in
``CONSOLEPROXY_CONFIG``, then the ``CONSOLEPROXY_*`` overrides), so the probe follows the listen
port and TLS setting an operator picks instead of repeating them in the Dockerfile. Liveness only;
readiness (/readyz) is for load balancers.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request

from consoleproxy.config import Config, load_config
from consoleproxy.errors import ConfigError

TIMEOUT_SECONDS = 4.0  # below the Dockerfile's HEALTHCHECK --timeout


def healthz_url(cfg: Config) -> str:
    """The first public port's /healthz, on loopback when the proxy listens on every address."""
    host = cfg.listen.address.strip("[]") or "0.0.0.0"
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if cfg.listen.tls else 'http'}://{host}:{cfg.listen.ports[0]}/healthz"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = args[0] if args else os.environ.get("CONSOLEPROXY_CONFIG")
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        print(f"healthcheck: {exc}", file=sys.stderr)
        return 2
    url = healthz_url(cfg)
    # A local liveness probe of our own listener, which may serve the development certificate and
    # is reached by address: checking the certificate here would test the wrong thing.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS, context=ctx) as resp:  # noqa: S310
            status = resp.status
    except (OSError, urllib.error.URLError) as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"healthcheck: {url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The public listeners' certificates while the proxy runs: loaded, watched, reloaded.

``ServingCertificates`` owns the live SNI contexts (certsni.py) over the on-disk store
(certstore.py), the expiry metric and the certificate part of readiness: ``problem`` is the
reason ``/readyz`` fails while no live bundle verifies (expired, missing). A reload that fails
keeps the contexts that were serving.
"""

from __future__ import annotations

import logging
from pathlib import Path

from consoleproxy.config import Tls
from consoleproxy.metrics import Metrics
from consoleproxy.tls.certchain import bundle_key
from consoleproxy.tls.certpem import CertificateError
from consoleproxy.tls.certsni import SNIContexts
from consoleproxy.tls.certstore import CertStore
from consoleproxy.tls.devcert import CA_FILE as DEV_CA_FILE
from consoleproxy.tls.devcert import ensure_dev_certificate

__all__ = ["DEV_SUFFIX", "ServingCertificates"]

log = logging.getLogger("consoleproxy")

DEV_SUFFIX = "*.consoleproxy.local"


class ServingCertificates:
    """``tls``: contexts made beforehand (tests, workers); else ``load`` makes them in start()."""

    def __init__(self, metrics: Metrics, tls: SNIContexts | None = None) -> None:
        self.metrics = metrics
        self.tls = tls
        self.store: CertStore | None = tls.store if tls else None
        self.problem: str | None = None
        # The development CA a browser must trust, when the store had no certificate of its own.
        self.dev_ca: Path | None = None

    def load(self, t: Tls, directory: Path) -> SNIContexts:
        """The store's live bundles; a development CA and wildcard when the store has none."""
        store = CertStore(directory)
        name = t.fqdn or t.domain_suffix or None
        live = store.live_bundles()
        if not live:
            self.dev_ca = ensure_dev_certificate(store.directory, t.domain_suffix or DEV_SUFFIX)
        elif bundle_key(t.domain_suffix or DEV_SUFFIX) in live and (store.directory / DEV_CA_FILE).is_file():
            self.dev_ca = store.directory / DEV_CA_FILE  # made by an earlier start
        if self.dev_ca is not None:
            log.warning("no certificate configured: serving a development certificate; "
                        "trust this CA in the browser: %s", self.dev_ca)
        self.store = store
        self.tls = SNIContexts(store, default_key=name)
        self.refresh()
        return self.tls

    def refresh(self) -> None:
        """Refresh the expiry metric and ``problem`` from the store's live bundles."""
        store = self.store
        if store is None:
            return
        problem = None
        keys = list(store.live_bundles())
        if not keys:
            problem = "no usable certificate"
        for key in keys:
            try:
                bundle = store.verify(key)
            except CertificateError as exc:
                problem = f"certificate {key}: {exc}"
                continue
            self.metrics.certificate_expiry_timestamp_seconds.labels(key).set(
                bundle.not_after.timestamp()
            )
        self.problem = problem

    def reload(self) -> list[str]:
        """Use the store's current live bundles for new handshakes; on error keep the old ones."""
        if self.tls is None:
            return []
        try:
            keys = self.tls.reload()
        except CertificateError as exc:
            log.error("certificate reload failed; keeping the current certificates: %s", exc)
            raise
        finally:
            self.refresh()
        log.info("certificates reloaded: %s", ", ".join(keys))
        return keys

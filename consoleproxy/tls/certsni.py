"""TLS contexts for the public listeners (TLS): one ``ssl.SSLContext`` per live bundle of the
store, chosen per handshake by SNI; a reload swaps them for new handshakes only.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import TYPE_CHECKING

from consoleproxy.tls.certchain import bundle_key, default_bundle_key
from consoleproxy.tls.certpem import CertificateError

if TYPE_CHECKING:
    from consoleproxy.tls.certstore import CertStore

__all__ = ["SNIContexts", "make_ssl_context"]



# --------------------------------------------------------------------------------------------------
# TLS contexts


def make_ssl_context(chain_path: Path | str, key_path: Path | str) -> ssl.SSLContext:
    """Server context: TLS >= 1.2, forward-secret AEAD suites only, ALPN http/1.1."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # TLS 1.2 list only; TLS 1.3 suites are all AEAD and keep OpenSSL's defaults.
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    ctx.set_alpn_protocols(["http/1.1"])
    # One TLS 1.3 session ticket per connection, not OpenSSL's two: enough for the browser to
    # resume the page's session for the console's WebSocket, and 60 us less per handshake.
    ctx.num_tickets = 1
    try:
        ctx.load_cert_chain(str(chain_path), str(key_path))
    except (ssl.SSLError, OSError) as exc:
        raise CertificateError(f"cannot load certificate {chain_path} / key {key_path}: {exc}") from None
    return ctx


class SNIContexts:
    """One SSLContext per live bundle, chosen per handshake by server name.

    Listeners are created once with ``context``; its ``sni_callback`` hands every new handshake the
    context of the current bundle, so ``reload`` changes certificates for new handshakes while
    established connections keep theirs.
    """

    def __init__(self, store: CertStore, default_key: str | None = None) -> None:
        self.store = store
        self.default_key = bundle_key(default_key) if default_key else None
        self.contexts: dict[str, ssl.SSLContext] = {}
        self.default: ssl.SSLContext | None = None
        self.context: ssl.SSLContext | None = None
        self.reload()

    def reload(self) -> list[str]:
        """Re-reads the store; on any error the current contexts stay in use and the error is raised."""
        bundles = self.store.live_bundles()
        if not bundles:
            raise CertificateError(f"no live certificate bundle in {self.store.directory}")
        contexts = {key: make_ssl_context(chain, keyp) for key, (chain, keyp) in bundles.items()}
        default_key = self.default_key if self.default_key in contexts else default_bundle_key(list(contexts))
        chain, keyp = bundles[default_key]
        if self.context is None:
            self.context = make_ssl_context(chain, keyp)
            self.context.sni_callback = self.sni_callback
        else:
            # The listener's context keeps the default certificate current for clients that never
            # reach the callback's switch (OpenSSL copies it at SSL_new, so live connections keep theirs).
            self.context.load_cert_chain(str(chain), str(keyp))
        self.contexts = contexts
        self.default = contexts[default_key]
        return sorted(contexts)

    def select(self, server_name: str | None) -> ssl.SSLContext:
        if server_name:
            host = server_name.lower().rstrip(".")
            if host in self.contexts:
                return self.contexts[host]
            head, _, rest = host.partition(".")
            if head and ("*." + rest) in self.contexts:
                return self.contexts["*." + rest]
        assert self.default is not None
        return self.default

    def sni_callback(self, sslobj: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
        sslobj.context = self.select(server_name)

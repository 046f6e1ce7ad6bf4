"""ACME orders (RFC 8555): certbot's ``acme`` package speaks the protocol, this module orchestrates.

One ``AcmeManager`` per instance. Its loop checks every ``[acme] check_interval_seconds``:

1. If the certificate store's live bundle changed behind our back (another instance installed a
   renewal into the shared store directory), tell the server to reload it.
2. If the live certificate is due (``acme_policy.renew_at``; a certificate this manager did not
   issue is due at once) and the backoff allows, try to become the one orderer and order.

An order runs in a worker thread (the library is synchronous): account key (created once, 0600),
new order, challenge answers published in ``ChallengeRecords`` (the DNS responder answers the
``_acme-challenge`` TXT names, the redirect port the HTTP-01 tokens), finalize with a CSR for a
fresh key of ``key_type``, download, complete the chain with a root from ``[acme] roots``, verify
and import through ``CertStore`` -- the same verify-then-swap as an upload: new handshakes get the
new certificate, open consoles are untouched, the old bundle stays as ``previous`` for rollback. A
failure never touches the store; it is counted (``acme_renewals_total{result}``), logged in one
line naming the ACME error, and the next attempt waits ``acme_policy.retry_delay``.

Load-balanced mode. The one-orderer lock is the shared replay store's only primitive, an atomic
"first to add this key" (``SET NX PX`` in Redis, an upsert in SQLite): the key names the live
certificate being replaced and a time slot of twice the order timeout; a winner also takes the
next slot, so an order that runs across a slot boundary is never doubled (an instance's own keys
do not block its retries). With ``[cluster] on_store_error = "accept"`` a store outage lets each
instance order on its own; the CA's rate limits bound that. The issued bundle is
published through the certificate store directory, which load-balanced instances share (a volume,
NFS): every instance's loop sees the new live bundle and installs it. The replay store holds
short-lived keys, not documents, which is why the bundle does not travel through it. Challenge
answers live in the same directory (``acme/challenges.json``), so whichever instance the CA's
resolver or HTTP request reaches answers.

Secrets: the account key and certificate keys are written 0600 (``acme/account-key.pem`` here,
``key.pem`` and item files by ``CertStore``) and never logged; the log names domains, results and
ACME error types only.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from acme import challenges, client, crypto_util, errors, messages
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from josepy.jwa import ES256
from josepy.jwk import JWKEC

from consoleproxy.config import Config
from consoleproxy.metrics import Metrics
from consoleproxy.policy.acme_policy import (
    AcmeError,
    ChallengeRecords,
    challenge_txt_name,
    directory_url,
    near_expiry,
    order_lock_keys,
    order_names,
    parse_retry_after,
    renew_at,
    retry_delay,
)
from consoleproxy.policy.replay import ReplayStore, ReplayStoreUnavailable
from consoleproxy.tls.certchain import DEV_SERVER_ITEM, Item, bundle_key, verify_bundle
from consoleproxy.tls.certpem import CertificateError
from consoleproxy.tls.certstore import CertStore
from consoleproxy.tls.devcert import write_private

__all__ = ["AcmeManager", "AcmeState", "classify_error", "complete_chain"]

log = logging.getLogger("consoleproxy.acme")

ACME_ITEM = "acme"
USER_AGENT = "consoleproxy-acme"


def classify_error(exc: BaseException, timeout: float = 0) -> AcmeError:
    """An exception of an order -> ``AcmeError`` with its metric label and one-line message."""
    if isinstance(exc, AcmeError):
        return exc
    if isinstance(exc, messages.Error):
        result = "rate_limited" if exc.code == "rateLimited" else "rejected"
        return AcmeError(result, f"the CA answered {exc.typ}: {exc.detail or exc.description or ''}".strip())
    if isinstance(exc, errors.ValidationError):
        parts = []
        for authzr in exc.failed_authzrs:
            for ch in authzr.body.challenges:
                if ch.error is not None:
                    parts.append(
                        f"{authzr.body.identifier.value} {ch.chall.typ}: {ch.error.typ}: {ch.error.detail}"
                    )
        return AcmeError("challenge_failed", "challenge failed: " + "; ".join(parts or ["(no detail)"]))
    if isinstance(exc, errors.TimeoutError):
        return AcmeError("rejected", f"the CA did not finish the order within {timeout:g} s")
    if isinstance(exc, errors.IssuanceError):
        return AcmeError("rejected", f"the CA refused to issue: {exc.error.typ}: {exc.error.detail}")
    if isinstance(exc, requests.exceptions.RequestException):
        return AcmeError("unreachable", f"the ACME directory is unreachable: {type(exc).__name__}: {exc}")
    if isinstance(exc, errors.ClientError):
        return AcmeError("unreachable", f"unexpected answer from the CA: {exc}")
    if isinstance(exc, CertificateError):
        return AcmeError("rejected", f"the issued certificate was refused by the store: {exc}")
    if isinstance(exc, ReplayStoreUnavailable):
        return AcmeError("unreachable", f"the shared store (order lock) is unavailable: {exc}")
    return AcmeError("rejected", f"{type(exc).__name__}: {exc}")


def complete_chain(chain: list[x509.Certificate], roots: list[x509.Certificate]) -> list[x509.Certificate]:
    """Leaf + intermediates (what an ACME CA sends) + the root among ``roots`` that issued the top.

    AcmeError when no root signs it: the store keeps the root so ``certs verify`` re-checks the chain.
    """
    top = chain[-1]
    if top.subject == top.issuer:
        return chain
    for root in roots:
        if root.subject != top.issuer:
            continue
        try:
            top.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return [*chain, root]
    raise AcmeError(
        "rejected",
        f"no trusted root issued '{top.issuer.rfc4514_string()}'; add it to [acme] roots",
    )


def _load_roots(path: Path | None) -> list[x509.Certificate]:
    if path is None:
        default = ssl.get_default_verify_paths().cafile
        path = Path(default) if default else Path("/etc/ssl/certs/ca-certificates.crt")
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise AcmeError("rejected", f"cannot read the roots file {path}: {exc}") from None


def _new_key(key_type: str) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type.rpartition("-")[2]))


@dataclass
class AcmeState:
    """What ``status`` shows; the manager changes it on the event loop only."""

    names: list[str]
    directory: str
    challenge: str
    failures: int = 0
    last_result: str | None = None
    last_error: str | None = None
    last_attempt: float | None = None
    next_attempt: float = 0.0
    backoff_seconds: float = 0.0  # the wait chosen after the last failure
    orders: int = 0  # attempts that held the lock and talked to the CA
    issued: int = 0  # of those, certificates that went live
    ordering: bool = False
    waiting: bool = False  # another instance holds the order lock
    live: dict[str, Any] = field(default_factory=dict)


class AcmeManager:
    """Keeps the ``[acme]`` certificate live: orders, renews, installs, backs off."""

    def __init__(
        self,
        cfg: Config,
        store: CertStore,
        records: ChallengeRecords,
        *,
        lock: ReplayStore | None,
        metrics: Metrics,
        on_installed: Callable[[], object],
    ) -> None:
        a = cfg.acme
        self.cfg = cfg
        self.settings = a
        self.store = store
        self.records = records
        self.lock = lock
        self.metrics = metrics
        self.on_installed = on_installed
        self.names = order_names(a.challenge, cfg.tls.domain_suffix, cfg.tls.fqdn)
        self.key = bundle_key(self.names[0])
        self.directory = directory_url(a.directory)
        self.ca_bundle = cfg.path(a.ca_bundle) if a.ca_bundle else None
        self.roots_path = cfg.path(a.roots) if a.roots else None
        self.acme_dir = store.directory / "acme"
        self.state = AcmeState(self.names, self.directory, a.challenge)
        self._installed_fp: str | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._order_lock = asyncio.Lock()
        # Retry-After of the CA's last 429/503 answer, set by a requests hook in the worker thread
        # and read on the loop after the thread is done.
        self._retry_after: float | None = None
        self._held: set[str] = set()  # lock keys this instance added to the shared store

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def status(self) -> dict[str, Any]:
        s = self.state
        return {
            "names": s.names,
            "directory": s.directory,
            "challenge": s.challenge,
            "live": s.live,
            "ordering": s.ordering,
            "waiting_for_other_instance": s.waiting,
            "orders": s.orders,
            "issued": s.issued,
            "failures": s.failures,
            "last_result": s.last_result,
            "last_error": s.last_error,
            "last_attempt": _iso(s.last_attempt),
            "next_attempt": _iso(s.next_attempt) if s.failures else None,
            "backoff_seconds": s.backoff_seconds if s.failures else None,
        }

    def problem(self) -> str | None:
        """A readiness reason only while the last attempt failed and the live certificate is near expiry."""
        s = self.state
        if not s.failures or not s.live.get("not_after"):
            return None
        nb = dt.datetime.fromisoformat(s.live["not_before"])
        na = dt.datetime.fromisoformat(s.live["not_after"])
        if near_expiry(nb, na, dt.datetime.now(dt.UTC)):
            return f"certificate {self.key} near expiry and ACME renewal failing: {s.last_error}"
        return None

    async def renew_now(self) -> dict[str, Any]:
        """Order now whatever the schedule (``certs acme renew-now``, admin API); returns the status."""
        await self._attempt(force=True)
        return self.status()

    # -- the loop ---------------------------------------------------------------------------------

    async def _run(self) -> None:
        interval = self.settings.check_interval_seconds
        while True:
            try:
                await self._tick()
            except Exception:
                # A bug must cost one check, never the renewals that follow.
                log.exception("acme: unexpected error in the renewal loop")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._wake.wait()
            self._wake.clear()

    async def _tick(self) -> None:
        live = await asyncio.to_thread(self._live)
        fp = live.get("fingerprint")
        if fp != self._installed_fp:
            if self._installed_fp is not None and fp is not None and not self.state.ordering:
                # Another instance (or an operator) changed the shared store: serve it.
                self.on_installed()
                if live.get("acme"):
                    self.metrics.acme_renewals_total.labels(result="installed").inc()
                    log.info("acme: installed %s issued by another instance (expires %s)",
                             self.key, live.get("not_after"))
            self._installed_fp = fp
        self.state.live = live
        self._update_gauge(live)
        if self._due(live) and time.time() >= self.state.next_attempt:
            await self._attempt(force=False)

    def _due(self, live: dict[str, Any]) -> bool:
        if not live or not live.get("acme"):
            return True  # nothing live, or not ours (an upload, the development certificate)
        nb = dt.datetime.fromisoformat(live["not_before"])
        na = dt.datetime.fromisoformat(live["not_after"])
        days = self.settings.renew_before_days
        when = renew_at(nb, na, renew_before=dt.timedelta(days=days) if days else None)
        return dt.datetime.now(dt.UTC) >= when

    def _live(self) -> dict[str, Any]:
        """The live bundle for our key: fingerprint, dates, and whether we issued it."""
        paths = self.store.live_paths(self.key)
        if paths is None:
            return {}
        chain_pem = paths[0].read_bytes()
        leaf = x509.load_pem_x509_certificate(chain_pem)
        fp = leaf.fingerprint(hashes.SHA256()).hex()
        issued = self._issued_fingerprints()
        return {
            "fingerprint": fp,
            "not_before": leaf.not_valid_before_utc.isoformat(),
            "not_after": leaf.not_valid_after_utc.isoformat(),
            "issuer": leaf.issuer.rfc4514_string(),
            "acme": fp in issued,
        }

    def _issued_fingerprints(self) -> list[str]:
        try:
            data = json.loads((self.acme_dir / "issued.json").read_text())
        except (OSError, ValueError):
            return []
        return [str(x) for x in data.get("fingerprints", [])]

    def _update_gauge(self, live: dict[str, Any]) -> None:
        if live.get("not_after"):
            na = dt.datetime.fromisoformat(live["not_after"])
            left = (na - dt.datetime.now(dt.UTC)).total_seconds()
            self.metrics.acme_certificate_days_left.set(left / 86400)

    # -- one attempt ------------------------------------------------------------------------------

    async def _attempt(self, *, force: bool) -> None:
        async with self._order_lock:
            live = await asyncio.to_thread(self._live)
            if not force and not self._due(live):
                return  # renewed while we waited for the lock
            s = self.state
            s.live = live
            s.last_attempt = time.time()
            try:
                s.waiting = not await self._take_lock(live.get("fingerprint") or "none")
                if s.waiting:
                    log.info("acme: another instance is ordering %s; waiting for its bundle", self.key)
                    return
                s.ordering = True
                s.orders += 1
                log.info("acme: ordering %s from %s (%s)", ", ".join(self.names), self.directory,
                         self.settings.challenge)
                self._retry_after = None
                meta = await asyncio.to_thread(self._order)
            except Exception as exc:
                err = classify_error(exc, self.settings.order_timeout_seconds)
                if err.result in ("rate_limited", "unreachable") and self._retry_after is not None:
                    err.retry_after = self._retry_after
                s.failures += 1
                delay = retry_delay(
                    s.failures,
                    base=self.settings.retry_base_seconds,
                    cap=self.settings.retry_max_seconds,
                    retry_after=err.retry_after,
                )
                s.next_attempt = time.time() + delay
                s.backoff_seconds = delay
                s.last_result, s.last_error = err.result, str(err)
                self.metrics.acme_renewals_total.labels(result=err.result).inc()
                log.error("acme: order for %s failed (%s): %s; the live certificate stays; "
                          "next attempt in %.0f s", ", ".join(self.names), err.result, err, delay)
                return
            finally:
                s.ordering = False
            s.failures, s.next_attempt = 0, 0.0
            s.last_result, s.last_error = "issued", None
            s.issued += 1
            self.metrics.acme_renewals_total.labels(result="issued").inc()
            # Before any await: the loop's check must not take our own bundle for another's.
            self._installed_fp = meta["fingerprint"]
            self.on_installed()
            live = await asyncio.to_thread(self._live)
            s.live = live
            self._update_gauge(live)
            log.info("acme: %s is live (expires %s)", self.key, meta.get("not_after"))

    async def _take_lock(self, live_fp: str) -> bool:
        if self.lock is None:
            return True
        window = 2 * self.settings.order_timeout_seconds
        now = time.time()
        current, following = order_lock_keys(self.key, live_fp, now, window)
        expires = now + 2 * window + 60
        # A key this instance took earlier is still its own: its retries are not locked out.
        if current not in self._held:
            if not await self.lock.add(current, expires):
                return False
            self._held.add(current)
        if following not in self._held and await self.lock.add(following, expires):
            self._held.add(following)
        while len(self._held) > 16:
            self._held.pop()
        return True

    # -- the protocol (worker thread) -------------------------------------------------------------

    def _account_key(self) -> JWKEC:
        path = self.acme_dir / "account-key.pem"
        if path.is_file():
            key = serialization.load_pem_private_key(path.read_bytes(), None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise AcmeError("rejected", f"{path} is not an EC private key")
        else:
            key = ec.generate_private_key(ec.SECP256R1())
            write_private(path, _pkcs8(key))
        return JWKEC(key=key)

    def _note_retry_after(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        if response.status_code in (429, 503):
            self._retry_after = parse_retry_after(
                response.headers.get("Retry-After"), dt.datetime.now(dt.UTC)
            )

    def _client(self) -> client.ClientV2:
        jwk = self._account_key()
        verify: Any = str(self.ca_bundle) if self.ca_bundle else True
        timeout = int(max(5, min(30, self.settings.order_timeout_seconds)))
        net = client.ClientNetwork(
            jwk, alg=ES256, verify_ssl=verify, user_agent=USER_AGENT, timeout=timeout
        )
        net.session.hooks["response"].append(self._note_retry_after)
        try:
            directory = client.ClientV2.get_directory(self.directory, net)
        except (requests.exceptions.RequestException, ValueError) as exc:
            # acme < 5 wraps a refused connection in ValueError; both mean no usable directory.
            raise AcmeError("unreachable", f"the ACME directory is unreachable: {exc}") from None
        acme = client.ClientV2(directory, net)
        contact = self.settings.contact.strip()
        if contact and not contact.startswith("mailto:"):
            contact = "mailto:" + contact
        reg = messages.NewRegistration.from_data(terms_of_service_agreed=True)
        if contact:
            reg = reg.update(contact=(contact,))
        try:
            acme.new_account(reg)
        except errors.ConflictError as exc:
            # The key is registered already: RFC 8555 7.3.1 answers with the account's URL.
            net.account = messages.RegistrationResource(uri=exc.location, body=messages.Registration())
        return acme

    def _order(self) -> dict[str, Any]:
        deadline = dt.datetime.now() + dt.timedelta(seconds=self.settings.order_timeout_seconds)
        acme = self._client()
        key = _new_key(self.settings.key_type)
        key_pem = _pkcs8(key)
        csr = crypto_util.make_csr(key_pem, self.names)
        order = acme.new_order(csr)
        published: list[Callable[[], None]] = []
        try:
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:
                    continue  # the CA reuses a recent validation
                ident = authz.body.identifier.value
                if authz.body.wildcard:
                    ident = "*." + ident
                published.append(self._answer(acme, authz, ident))
            order = acme.poll_and_finalize(order, deadline)
        finally:
            for undo in published:
                undo()
        return self._install(order.fullchain_pem, key_pem)

    def _answer(
        self, acme: client.ClientV2, authz: messages.AuthorizationResource, ident: str
    ) -> Callable[[], None]:
        """Publish the answer to our challenge of ``authz`` and tell the CA; returns the undo."""
        want = self.settings.challenge
        for challb in authz.body.challenges:
            chall = challb.chall
            if want == "dns-01" and isinstance(chall, challenges.DNS01):
                resp, value = chall.response_and_validation(acme.net.key)
                name = challenge_txt_name(ident)
                self.records.add_txt(name, value)
                acme.answer_challenge(challb, resp)
                return lambda: self.records.remove_txt(name, value)
            if want == "http-01" and isinstance(chall, challenges.HTTP01):
                resp, value = chall.response_and_validation(acme.net.key)
                token = chall.encode("token")
                self.records.add_http(token, value)
                acme.answer_challenge(challb, resp)
                return lambda: self.records.remove_http(token)
        offered = ", ".join(c.chall.typ for c in authz.body.challenges)
        raise AcmeError("rejected", f"the CA offers no {want} challenge for {ident} (offered: {offered})")

    def _install(self, fullchain_pem: str, key_pem: bytes) -> dict[str, Any]:
        certs = x509.load_pem_x509_certificates(fullchain_pem.encode())
        if not certs:
            raise AcmeError("rejected", "the CA sent no certificate")
        chain = complete_chain(certs, _load_roots(self.roots_path))
        server_name = self._server_item_name()
        pems = [c.public_bytes(serialization.Encoding.PEM).decode() for c in chain]
        n = len(pems)
        cas = [Item(f"{server_name}-ca{n - i}", n - i, pems[i]) for i in range(n - 1, 0, -1)]
        server = Item(server_name, n + 1, pems[0], key_pem.decode(), self.key)
        # Verified whole before the store is touched: a bad chain leaves every file as it was.
        bundle = verify_bundle([server, *cas])
        self._remember(bundle.fingerprint)
        for item in cas:
            self.store.import_item(item)
        result = self.store.import_item(server)
        if result.status not in ("live", "unchanged"):
            raise AcmeError("rejected", f"the store did not make the bundle live: {result.message}")
        return {"not_after": bundle.not_after.isoformat(), "fingerprint": bundle.fingerprint}

    def _remember(self, fingerprint: str) -> None:
        # Recorded before the swap so no instance ever sees our bundle as "not ACME's".
        known = self._issued_fingerprints()[-9:]
        data = json.dumps({"fingerprints": [*known, fingerprint]}).encode()
        write_private(self.acme_dir / "issued.json", data)

    def _server_item_name(self) -> str:
        """The item that serves our key already (an upload is replaced, kept as ``previous``)."""
        for item in self.store.items():
            if item.private_key and item.domain_suffix and item.name != DEV_SERVER_ITEM:
                with contextlib.suppress(CertificateError):
                    if bundle_key(item.domain_suffix) == self.key:
                        return item.name
        return ACME_ITEM


def _pkcs8(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _iso(ts: float | None) -> str | None:
    if not ts:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()


"""ACME policy (RFC 8555, DESIGN.md section 10 ``[acme]``): values in, decisions out, no sockets.

What the orderer (``acme_orders.py``) asks and this module answers:

* which directory URL a ``directory`` setting means (``letsencrypt``, ``letsencrypt-staging``, a URL);
* which names to order for a challenge type (``*.<suffix>`` for DNS-01, the FQDN for HTTP-01);
* when a live certificate is due (a third of its lifetime left, an explicit ``renew_before``, or the
  CA's ARI window, RFC 9773, when it offers one);
* how long to wait after the n-th failure in a row (doubling, capped, never sooner than the CA's
  ``Retry-After``);
* which metric label and log line an ACME error becomes (``AcmeError``);
* the challenge answers in flight: ``_acme-challenge`` TXT values for the DNS responder and HTTP-01
  key authorizations for the redirect port (``ChallengeRecords``).
"""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import threading
from pathlib import Path
from urllib.parse import urlsplit

from consoleproxy.atomicfile import write_atomic
from consoleproxy.errors import ConsoleProxyError

__all__ = [
    "CHALLENGES",
    "DIRECTORY_PRESETS",
    "KEY_TYPES",
    "RESULTS",
    "AcmeError",
    "ChallengeRecords",
    "challenge_txt_name",
    "directory_url",
    "near_expiry",
    "order_lock_keys",
    "order_names",
    "parse_retry_after",
    "renew_at",
    "retry_delay",
]

DIRECTORY_PRESETS = {
    "letsencrypt": "https://acme-v02.api.letsencrypt.org/directory",
    "letsencrypt-staging": "https://acme-staging-v02.api.letsencrypt.org/directory",
}
CHALLENGES = ("dns-01", "http-01", "tls-alpn-01")
KEY_TYPES = ("ec-p256", "rsa-2048", "rsa-3072")
# Labels of acme_renewals_total{result}: one per way an attempt ends.
RESULTS = (
    "issued",  # a new bundle went live
    "installed",  # another instance ordered; this one installed the bundle it published
    "unreachable",  # the CA did not answer (down, refused, TLS failure, timeout)
    "challenge_failed",  # the CA could not validate a challenge (wrong TXT, HTTP-01 not reachable)
    "rate_limited",  # the CA's rateLimited error
    "rejected",  # any other ACME error, or an issued chain our store refused
)


class AcmeError(ConsoleProxyError):
    """One failed attempt: ``result`` is its metric label, ``retry_after`` the CA's wish (seconds)."""

    def __init__(self, result: str, message: str, retry_after: float | None = None) -> None:
        if result not in RESULTS:
            raise ValueError(f"unknown ACME result label {result!r}")
        super().__init__(message)
        self.result = result
        self.retry_after = retry_after


def directory_url(value: str) -> str:
    """``letsencrypt`` / ``letsencrypt-staging`` / an https URL -> the URL; ValueError otherwise."""
    v = value.strip()
    if v in DIRECTORY_PRESETS:
        return DIRECTORY_PRESETS[v]
    parts = urlsplit(v)
    if parts.scheme != "https" or not parts.hostname:
        presets = ", ".join(DIRECTORY_PRESETS)
        raise ValueError(f"an https:// ACME directory URL or one of {presets} (got {value!r})")
    return v


def order_names(challenge: str, domain_suffix: str, fqdn: str) -> list[str]:
    """The identifiers of an order: DNS-01 the wildcard of the suffix, HTTP-01/TLS-ALPN-01 the FQDN.

    A wildcard can only be validated over DNS-01 (RFC 8555 7.1.3), so the suffix mode needs it; an
    FQDN can use any challenge. ValueError names the setting that is missing.
    """
    if challenge not in CHALLENGES:
        raise ValueError(f"challenge must be one of {', '.join(CHALLENGES)} (got {challenge!r})")
    suffix = domain_suffix.strip().lower().removeprefix("*.").strip(".")
    host = fqdn.strip().lower().strip(".")
    if challenge == "dns-01":
        if suffix:
            return [f"*.{suffix}"]
        if host:
            return [host]
        raise ValueError("dns-01 needs [tls] domain_suffix (the wildcard's zone) or [tls] fqdn")
    if not host:
        raise ValueError(f"{challenge} cannot validate a wildcard; set [tls] fqdn or use dns-01")
    return [host]


def challenge_txt_name(identifier: str) -> str:
    """``*.zone`` or ``host.zone`` -> ``_acme-challenge.zone`` / ``_acme-challenge.host.zone``."""
    return "_acme-challenge." + identifier.lower().removeprefix("*.").rstrip(".")


def renew_at(
    not_before: dt.datetime,
    not_after: dt.datetime,
    *,
    renew_before: dt.timedelta | None = None,
    ari_window: tuple[dt.datetime, dt.datetime] | None = None,
) -> dt.datetime:
    """When to start renewing a certificate valid from ``not_before`` to ``not_after``.

    The CA's ARI window wins when given (its middle: the CA may ask for an early renewal, e.g.
    before a mass revocation). Otherwise ``renew_before`` ahead of expiry, clipped to the lifetime;
    by default when a third of the lifetime is left (Let's Encrypt's advice: day 60 of 90).
    """
    if ari_window is not None:
        start, end = ari_window
        if end >= start:
            return start + (end - start) / 2
    lifetime = max(not_after - not_before, dt.timedelta(0))
    before = lifetime / 3 if renew_before is None or renew_before <= dt.timedelta(0) else renew_before
    return not_after - min(before, lifetime)


def retry_delay(
    failures: int, *, base: float, cap: float, retry_after: float | None = None
) -> float:
    """Seconds to wait after ``failures`` failed attempts in a row: base, 2*base, 4*base ... cap.

    A CA's ``Retry-After`` (rate limits) is a floor, even above the cap: asking earlier only
    spends the limit again.
    """
    if failures <= 0:
        return 0.0
    delay = min(cap, base * 2.0 ** min(failures - 1, 60))
    if retry_after is not None and retry_after > delay:
        delay = retry_after
    return delay


def parse_retry_after(value: str | None, now: dt.datetime) -> float | None:
    """An HTTP ``Retry-After`` (RFC 9110 10.2.3: seconds or an HTTP date) -> seconds from ``now``."""
    if not value:
        return None
    v = value.strip()
    if v.isdigit():
        return float(v)
    try:
        when = email.utils.parsedate_to_datetime(v)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - now).total_seconds())


def near_expiry(not_before: dt.datetime, not_after: dt.datetime, now: dt.datetime) -> bool:
    """Less than a tenth of the lifetime left (9 days of a 90-day certificate): /readyz cares."""
    return not_after - now < (not_after - not_before) / 10


def order_lock_keys(key: str, live_fingerprint: str, now: float, window: float) -> tuple[str, str]:
    """Keys of the one-orderer lock in the shared store: (this time slot, the next one).

    The key names what is being replaced (the live certificate's fingerprint), so a renewal of a
    new certificate is a new lock. The slot bounds how long a failed orderer blocks the others;
    taking the next slot too keeps an order that runs across a slot boundary from being doubled.
    """
    slot = int(now // window)
    base = f"acme-order:{key}:{live_fingerprint}:"
    return base + str(slot), base + str(slot + 1)


class ChallengeRecords:
    """Challenge answers in flight: TXT values by name, HTTP-01 key authorizations by token.

    The orderer writes from its worker thread while the DNS responder and the redirect port read
    from the event loop, hence the lock. With ``path`` the records also live in a file (the
    certificate store's ``acme/challenges.json``): instances that share the store directory answer
    for each other, so a challenge is answered by whichever instance the CA reaches. A reader
    re-reads the file only when its modification time changed (one ``stat`` per challenge query).
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._txt: dict[str, list[str]] = {}
        self._http: dict[str, str] = {}
        self._stamp: int | None = None

    # -- writing (the orderer) ----------------------------------------------------------------

    def add_txt(self, name: str, value: str) -> None:
        with self._lock:
            self._refresh()
            values = self._txt.setdefault(_norm(name), [])
            if value not in values:
                values.append(value)
            self._save()

    def remove_txt(self, name: str, value: str) -> None:
        with self._lock:
            self._refresh()
            values = self._txt.get(_norm(name), [])
            if value in values:
                values.remove(value)
            if not values:
                self._txt.pop(_norm(name), None)
            self._save()

    def add_http(self, token: str, key_authorization: str) -> None:
        with self._lock:
            self._refresh()
            self._http[token] = key_authorization
            self._save()

    def remove_http(self, token: str) -> None:
        with self._lock:
            self._refresh()
            self._http.pop(token, None)
            self._save()

    # -- reading (DNS responder, redirect port) ---------------------------------------------------

    def txt(self, name: str) -> list[str]:
        with self._lock:
            self._refresh()
            return list(self._txt.get(_norm(name), []))

    def http(self, token: str) -> str | None:
        with self._lock:
            self._refresh()
            return self._http.get(token)

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            self._refresh()
            return {"txt": {k: list(v) for k, v in self._txt.items()}, "http": sorted(self._http)}

    # -- file backing -------------------------------------------------------------------------

    def _refresh(self) -> None:
        if self.path is None:
            return
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._txt, self._http, self._stamp = {}, {}, None
            return
        if st.st_mtime_ns == self._stamp:
            return
        try:
            data = json.loads(self.path.read_text())
            txt = {str(k): [str(x) for x in v] for k, v in dict(data.get("txt", {})).items()}
            http = {str(k): str(v) for k, v in dict(data.get("http", {})).items()}
        except (OSError, ValueError, TypeError, AttributeError):
            return  # a torn or foreign file: keep what we had; the writer replaces it whole
        self._txt, self._http, self._stamp = txt, http, st.st_mtime_ns

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Challenge records live minutes and are written again on a restart: no fsync.
        write_atomic(self.path, json.dumps({"txt": self._txt, "http": self._http}).encode(), fsync=False)
        self._stamp = self.path.stat().st_mtime_ns


def _norm(name: str) -> str:
    return name.strip().lower().rstrip(".")

"""[acme] without sockets: policy, challenge records, error naming, the DNS answers, config errors."""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
import requests
from acme import messages
from certutil_helpers import make_chain
from harness import make_config

from consoleproxy.config import ConfigError
from consoleproxy.net.dns import DnsSettings, Responder
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
from consoleproxy.policy.replay import MemoryReplayStore
from consoleproxy.policy.tokens import Keyring
from consoleproxy.server import ProxyServer
from consoleproxy.tls.acme_orders import AcmeManager, classify_error, complete_chain
from consoleproxy.tls.certpem import CertificateError
from consoleproxy.tls.certstore import CertStore

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def test_directory_presets_and_urls() -> None:
    assert directory_url("letsencrypt") == "https://acme-v02.api.letsencrypt.org/directory"
    assert "staging" in directory_url("letsencrypt-staging")
    assert directory_url("https://ca.example/dir") == "https://ca.example/dir"
    for bad in ("http://ca.example/dir", "letsencrypt-prod", "", "https://"):
        with pytest.raises(ValueError, match="ACME directory URL"):
            directory_url(bad)


def test_order_names_per_challenge() -> None:
    assert order_names("dns-01", "*.Cp.Example.com", "") == ["*.cp.example.com"]
    assert order_names("dns-01", "cp.example.com", "") == ["*.cp.example.com"]
    assert order_names("http-01", "", "Console.Example.com.") == ["console.example.com"]
    with pytest.raises(ValueError, match="cannot validate a wildcard"):
        order_names("http-01", "*.cp.example.com", "")
    with pytest.raises(ValueError, match="domain_suffix"):
        order_names("dns-01", "", "")
    with pytest.raises(ValueError, match="challenge must be one of"):
        order_names("dns-02", "*.cp.example.com", "")
    assert challenge_txt_name("*.cp.example.com") == "_acme-challenge.cp.example.com"
    assert challenge_txt_name("Host.Example.com.") == "_acme-challenge.host.example.com"


def test_renew_at_a_third_of_the_lifetime_by_default() -> None:
    na = T0 + dt.timedelta(days=90)
    assert renew_at(T0, na) == T0 + dt.timedelta(days=60)
    assert renew_at(T0, na, renew_before=dt.timedelta(days=10)) == T0 + dt.timedelta(days=80)
    # More than the lifetime: due at issuance, never before it.
    assert renew_at(T0, na, renew_before=dt.timedelta(days=400)) == T0
    # The CA's ARI window wins: its middle.
    window = (T0 + dt.timedelta(days=20), T0 + dt.timedelta(days=22))
    assert renew_at(T0, na, ari_window=window) == T0 + dt.timedelta(days=21)


def test_retry_delay_doubles_up_to_the_cap_and_honours_retry_after() -> None:
    assert retry_delay(0, base=60, cap=3600) == 0
    assert [retry_delay(n, base=60, cap=3600) for n in (1, 2, 3, 4)] == [60, 120, 240, 480]
    assert retry_delay(30, base=60, cap=3600) == 3600
    assert retry_delay(10_000, base=60, cap=3600) == 3600  # no overflow
    assert retry_delay(1, base=60, cap=3600, retry_after=7200) == 7200  # a floor, even above the cap
    assert retry_delay(3, base=60, cap=3600, retry_after=10) == 240


def test_near_expiry_is_the_last_tenth() -> None:
    na = T0 + dt.timedelta(days=90)
    assert not near_expiry(T0, na, T0 + dt.timedelta(days=80))
    assert near_expiry(T0, na, T0 + dt.timedelta(days=82))


def test_acme_error_labels_are_fixed() -> None:
    with pytest.raises(ValueError, match="unknown ACME result"):
        AcmeError("oops", "x")


async def test_one_orderer_per_slot_in_a_shared_store() -> None:
    store = MemoryReplayStore()
    window = 240.0
    t0 = (time.time() // window) * window + 1  # early in a slot
    keep = t0 + 3 * window
    a = order_lock_keys("*.cp.example.com", "fp1", t0, window)
    b = order_lock_keys("*.cp.example.com", "fp1", t0 + 1, window)
    assert a == b
    assert await store.add(a[0], keep) and await store.add(a[1], keep)  # instance A orders
    assert not await store.add(b[0], keep)  # instance B waits
    # Just past the boundary the next slot is still A's: an order in flight is never doubled.
    c = order_lock_keys("*.cp.example.com", "fp1", t0 + window, window)
    assert c[0] == a[1] and not await store.add(c[0], keep)
    # Renewing a different live certificate is a different lock.
    d = order_lock_keys("*.cp.example.com", "fp2", t0, window)
    assert await store.add(d[0], keep)


def test_challenge_records_memory_and_case() -> None:
    r = ChallengeRecords()
    r.add_txt("_acme-challenge.CP.example.com.", "v1")
    r.add_txt("_acme-challenge.cp.example.com", "v2")
    r.add_txt("_acme-challenge.cp.example.com", "v2")
    assert r.txt("_ACME-CHALLENGE.cp.example.com") == ["v1", "v2"]
    r.remove_txt("_acme-challenge.cp.example.com", "v1")
    assert r.txt("_acme-challenge.cp.example.com") == ["v2"]
    r.remove_txt("_acme-challenge.cp.example.com", "v2")
    assert r.txt("_acme-challenge.cp.example.com") == []
    r.add_http("tok", "tok.thumb")
    assert r.http("tok") == "tok.thumb" and r.http("other") is None
    r.remove_http("tok")
    assert r.http("tok") is None


def test_challenge_records_shared_through_a_file(tmp_path: Path) -> None:
    path = tmp_path / "acme" / "challenges.json"
    writer, reader = ChallengeRecords(path), ChallengeRecords(path)
    writer.add_txt("_acme-challenge.cp.example.com", "abc")
    writer.add_http("tok", "tok.thumb")
    assert reader.txt("_acme-challenge.cp.example.com") == ["abc"]
    assert reader.http("tok") == "tok.thumb"
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    writer.remove_txt("_acme-challenge.cp.example.com", "abc")
    assert reader.txt("_acme-challenge.cp.example.com") == []
    # A torn or foreign file keeps the last good records instead of failing the DNS answer.
    path.write_text("{not json")
    os.utime(path, ns=(1, 1))
    assert reader.http("tok") == "tok.thumb"


def _ask(responder: Responder, name: str, rdtype: str) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype)
    out = responder.handle(q.to_wire())
    assert out is not None
    return dns.message.from_wire(out)


def test_dns_responder_answers_acme_challenge_txt() -> None:
    records = ChallengeRecords()
    responder = Responder(DnsSettings(zone="cp.example.com"), challenges=records)
    r = _ask(responder, "_acme-challenge.cp.example.com", "TXT")
    assert r.rcode() == dns.rcode.NXDOMAIN  # nothing in flight
    records.add_txt("_acme-challenge.cp.example.com", "v1")
    records.add_txt("_acme-challenge.cp.example.com", "v2")  # wildcard + apex share one name
    r = _ask(responder, "_ACME-challenge.CP.example.com", "TXT")
    assert r.rcode() == dns.rcode.NOERROR and r.flags & dns.flags.AA
    (rrset,) = r.answer
    assert rrset.ttl == 0  # no resolver keeps a stale challenge
    assert sorted(b"".join(rd.strings).decode() for rd in rrset) == ["v1", "v2"]
    r = _ask(responder, "_acme-challenge.cp.example.com", "A")
    assert r.rcode() == dns.rcode.NOERROR and not r.answer  # NODATA
    # The a-b-c-d names are untouched.
    r = _ask(responder, "1-2-3-4.cp.example.com", "A")
    assert r.answer[0][0].address == "1.2.3.4"
    # Without [acme] the name does not exist.
    plain = Responder(DnsSettings(zone="cp.example.com"))
    assert _ask(plain, "_acme-challenge.cp.example.com", "TXT").rcode() == dns.rcode.NXDOMAIN


def _problem(code: str, detail: str) -> messages.Error:
    return messages.Error(typ="urn:ietf:params:acme:error:" + code, detail=detail)


def test_classify_errors_names_each_kind() -> None:
    e = classify_error(_problem("rateLimited", "too many certificates already issued"))
    assert e.result == "rate_limited"
    assert "urn:ietf:params:acme:error:rateLimited" in str(e) and "too many certificates" in str(e)
    e = classify_error(_problem("rejectedIdentifier", "no"))
    assert e.result == "rejected" and "rejectedIdentifier" in str(e)
    e = classify_error(requests.exceptions.ConnectionError("refused"))
    assert e.result == "unreachable" and "unreachable" in str(e)
    e = classify_error(CertificateError("item 'acme': expired", "acme"))
    assert e.result == "rejected" and "refused by the store" in str(e)


def test_complete_chain_adds_the_root_that_signed_it() -> None:
    chain = make_chain()
    sent = [chain.leaf.cert, chain.inter.cert]
    other = make_chain()
    full = complete_chain(sent, [other.root.cert, chain.root.cert])
    assert full[-1] == chain.root.cert and len(full) == 3
    with pytest.raises(AcmeError, match="no trusted root issued"):
        complete_chain(sent, [other.root.cert])


@pytest.mark.parametrize(
    ("acme", "extra", "message"),
    [
        ({}, {"dns": {"enabled": False}}, "set \\[dns\\] enabled = true"),
        ({"challenge": "http-01"}, {"tls": {"domain_suffix": "", "fqdn": "c.cp.example.com"}},
         "redirect_http_port"),
        ({"challenge": "http-01"}, {}, "cannot validate a wildcard"),
        ({"challenge": "tls-alpn-01"}, {"tls": {"domain_suffix": "", "fqdn": "c.cp.example.com"}},
         "not supported yet"),
        ({}, {"listen": {"tls": False}}, "needs \\[listen\\] tls = true"),
        ({}, {"dns": {"enabled": True, "zone": "other.example.com"}}, "inside \\[dns\\] zone"),
        ({"directory": "http://ca.example/dir"}, {}, "https:// ACME directory URL"),
        ({"key_type": "ed25519"}, {}, "ec-p256"),
        ({"challenge": "dns-1"}, {}, "dns-01"),
        ({"retry_base_seconds": 0}, {}, "retry_base_seconds"),
    ],
)
def test_config_errors_are_specific(
    tmp_path: Path, acme: dict[str, Any], extra: dict[str, dict[str, Any]], message: str
) -> None:
    sections: dict[str, dict[str, Any]] = {
        "listen": {"tls": True},
        "tls": {"domain_suffix": "*.cp.example.com"},
        "dns": {"enabled": True, "zone": "cp.example.com"},
    }
    for k, v in extra.items():
        sections[k] = {**sections.get(k, {}), **v}
    with pytest.raises(ConfigError, match=message):
        make_config(tmp_path, acme={"enabled": True, **acme}, **sections)


def test_config_defaults_are_off_and_letsencrypt(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    assert cfg.acme.enabled is False
    assert (cfg.acme.directory, cfg.acme.challenge, cfg.acme.key_type) == ("letsencrypt", "dns-01", "ec-p256")


def test_parse_retry_after_seconds_and_dates() -> None:
    now = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after("Thu, 01 Jan 2026 12:05:00 GMT", now) == 300.0
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now) == 0.0  # past: now
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


def test_readyz_reports_a_failing_renewal_only_near_expiry(tmp_path: Path) -> None:
    cfg = make_config(
        tmp_path,
        listen={"tls": True},
        tls={"domain_suffix": "*.cp.example.com"},
        dns={"enabled": True, "zone": "cp.example.com"},
        acme={"enabled": True},
    )
    server = ProxyServer(cfg, keyring=Keyring.generate())
    manager = AcmeManager(
        cfg, CertStore(tmp_path / "certs"), ChallengeRecords(), lock=None, metrics=server.metrics,
        on_installed=lambda: None,
    )  # fmt: skip
    server.acme = manager
    now = dt.datetime.now(dt.UTC)
    live = {"not_before": (now - dt.timedelta(days=80)).isoformat(),
            "not_after": (now + dt.timedelta(days=10)).isoformat()}  # fmt: skip
    manager.state.live = live
    assert server.not_ready_reason() is None  # no failure
    manager.state.failures, manager.state.last_error = 1, "the CA answered ...:rateLimited: slow down"
    assert server.not_ready_reason() is None  # 10 of 90 days left: renewal still has time
    live["not_before"] = (now - dt.timedelta(days=85)).isoformat()
    live["not_after"] = (now + dt.timedelta(days=5)).isoformat()
    reason = server.not_ready_reason()
    assert reason is not None and "near expiry" in reason and "rateLimited" in reason
    manager.state.failures = 0  # a renewal that works again clears it
    assert server.not_ready_reason() is None

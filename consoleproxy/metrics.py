"""Prometheus metrics of DESIGN.md section 9.

One ``Metrics`` object per proxy instance, each with its own registry, so several instances can
live in one process (tests, ``--workers`` supervisors) without clashing on global names.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "consoleproxy_"
        self.sessions_active = Gauge(p + "sessions_active", "Consoles relaying now", registry=r)
        self.sessions_total = Counter(
            p + "sessions_total", "Consoles ended, by result", ["result"], registry=r
        )
        self.bytes_total = Counter(
            p + "bytes_total",
            "Bytes relayed; direction is 'up' (browser to VNC) or 'down'",
            ["direction"],
            registry=r,
        )
        self.token_rejections_total = Counter(
            p + "token_rejections_total", "Tokens refused, by reason", ["reason"], registry=r
        )
        self.backend_connect_seconds = Histogram(
            p + "backend_connect_seconds",
            "Time to open the TCP connection to the hypervisor",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.session_duration_seconds = Histogram(
            p + "session_duration_seconds",
            "Console durations",
            buckets=(1, 10, 60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400),
            registry=r,
        )
        self.certificate_expiry_timestamp_seconds = Gauge(
            p + "certificate_expiry_timestamp_seconds",
            "notAfter of each live certificate, Unix time",
            ["name"],
            registry=r,
        )
        self.draining = Gauge(p + "draining", "1 while the instance drains", registry=r)
        # cause: "drain" (the page saw 1001), "network" (1006 and other abnormal closes), "other".
        self.resumes_total = Counter(
            p + "resumes_total", "Consoles resumed with a resume ticket, by the cause of the break",
            ["cause"], registry=r,
        )
        self.acme_renewals_total = Counter(
            p + "acme_renewals_total",
            "ACME order attempts, by result (issued, installed, unreachable, challenge_failed, "
            "rate_limited, rejected)",
            ["result"],
            registry=r,
        )
        self.acme_certificate_days_left = Gauge(
            p + "acme_certificate_days_left", "Days until the ACME-managed certificate expires", registry=r
        )
        self.dns_queries_total = Counter(
            p + "dns_queries_total", "DNS queries answered, by rcode", ["rcode"], registry=r
        )
        self.replay_store_unacknowledged_total = Counter(
            p + "replay_store_unacknowledged_total",
            "Token marks no replica acknowledged within [cluster] store_wait_timeout_ms "
            "(redis+sentinel; such a mark is lost if the primary fails before it replicates)",
            registry=r,
        )
        self.replay_store_errors_total = Counter(
            p + "replay_store_errors_total",
            "Token checks the shared replay store could not answer (with [cluster] "
            "on_store_error = accept, each admitted a console without the single-use check)",
            registry=r,
        )

        self.connections_refused_total = Counter(
            p + "connections_refused_total",
            "Public connections closed by the accept layer before HTTP, by reason "
            "(handshakes, handshakes_per_ip, rate, head_timeout, head_too_large, proxy_header, "
            "untrusted_proxy, tls)",
            ["reason"],
            registry=r,
        )
        self.handshakes_in_progress = Gauge(
            p + "handshakes_in_progress",
            "Public connections between accept and the end of their first request head",
            registry=r,
        )

        self.recordings_active = Gauge(
            p + "recordings_active", "Consoles being recorded now", registry=r
        )
        self.recording_bytes_total = Counter(
            p + "recording_bytes_total", "Bytes of recordings written to the store", registry=r
        )
        self.recordings_incomplete_total = Counter(
            p + "recordings_incomplete_total",
            "Recordings that stopped before their console ended (slow or failing store)",
            registry=r,
        )

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))

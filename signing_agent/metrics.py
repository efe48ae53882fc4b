"""Prometheus metrics: one registry for the agent (never prometheus-client's global default), and its instruments.

Owns: the metric names, labels and buckets. Everything here is a cheap in-memory update; the API serves the text
exposition at ``GET /metrics``. Labels only ever carry configured names (routes, backends, services, identities),
status codes and fixed state names: never a payload, a key, a PIN or a peer-supplied string.

Must not import aiohttp, backends or any other part of the package: the layers above import this module (or are
handed callbacks that update it, as the vendor-free backends are).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE_LATEST", "METRICS", "RECOVERY_STATES", "Metrics"]

_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SLOW = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

RECOVERY_STATES = ("stopped", "watching", "recovering", "submitted", "untrusted", "failed")
"""The states of a recovery watcher, exported one time series per state (1 for the current one, else 0)."""


class Metrics:
    """The agent's instruments, in their own registry (tests make their own instance)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "signing_agent_requests", "API requests by route template, method and status code.",
            ("route", "method", "code"), registry=r,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "signing_agent_request_duration_seconds", "API request latency by route template.",
            ("route",), buckets=_SLOW, registry=r,
        )  # fmt: skip
        self.sign_seconds = Histogram(
            "signing_agent_sign_duration_seconds", "Key store signing latency (one digest) by backend.",
            ("backend",), buckets=_FAST, registry=r,
        )  # fmt: skip
        self.sign_failures = Counter(
            "signing_agent_sign_failures", "Key store signing operations that raised, by backend.",
            ("backend",), registry=r,
        )  # fmt: skip
        self.ccf_seconds = Histogram(
            "signing_agent_ccf_request_duration_seconds", "Latency of one attempt of a request to CCF, by service.",
            ("service",), buckets=_SLOW, registry=r,
        )  # fmt: skip
        self.ccf_responses = Counter(
            "signing_agent_ccf_responses",
            "Attempts of requests to CCF by service and outcome: the HTTP status, or 'timeout' / 'unreachable'.",
            ("service", "code"), registry=r,
        )  # fmt: skip
        self.ccf_retries = Counter(
            "signing_agent_ccf_retries", "Requests to CCF resent (same bytes) after a retryable failure.",
            ("service",), registry=r,
        )  # fmt: skip
        self.throttle_wait_seconds = Histogram(
            "signing_agent_keystore_throttle_wait_seconds",
            "Time a key store operation queued in the agent's rate limiter (Key Vault), by vault host.",
            ("host",), buckets=_SLOW, registry=r,
        )  # fmt: skip
        self.recovery_watcher_state = Gauge(
            "signing_agent_recovery_watcher_state",
            "Recovery watcher state per service and identity: 1 for the current state, 0 for the others.",
            ("service", "identity", "state"), registry=r,
        )  # fmt: skip
        self.recovery_shares = Counter(
            "signing_agent_recovery_shares",
            "Recovery share submissions by service, identity and result: 'submitted' or 'failed'.",
            ("service", "identity", "result"), registry=r,
        )  # fmt: skip
        self.audit_write_failures = Counter(
            "signing_agent_audit_write_failures", "Audit records that could not be written (the request failed).",
            registry=r,
        )  # fmt: skip
        self.crypto_worker_restarts = Counter(
            "signing_agent_crypto_worker_restarts", "Crypto worker processes that died and were replaced.",
            registry=r,
        )  # fmt: skip
        self.reloads = Counter(
            "signing_agent_config_reloads", "Configuration reloads (SIGHUP) by result: 'ok' or 'rejected'.",
            ("result",), registry=r,
        )  # fmt: skip
        self.identity_up = Gauge(
            "signing_agent_identity_up", "1 when the identity passed its last self-test or signature, else 0.",
            ("identity",), registry=r,
        )  # fmt: skip
        self.service_up = Gauge(
            "signing_agent_service_up", "1 when the CCF service answered the last health check, else 0.",
            ("service",), registry=r,
        )  # fmt: skip
        self.certificate_expiry_seconds = Gauge(
            "signing_agent_certificate_expiry_seconds",
            "Seconds until the identity's member certificate expires (negative once it has), as of the scrape.",
            ("identity",), registry=r,
        )  # fmt: skip
        self._expiring: set[str] = set()

    def set_recovery_state(self, service: str, identity: str, state: str) -> None:
        """Mark ``state`` (one of ``RECOVERY_STATES``) as the watcher's current state."""
        if state not in RECOVERY_STATES:
            raise ValueError(f"unknown recovery watcher state {state!r}")
        for s in RECOVERY_STATES:
            self.recovery_watcher_state.labels(service, identity, s).set(1.0 if s == state else 0.0)

    def set_certificate_expiries(self, not_after: Mapping[str, float], clock: Callable[[], float] = time.time) -> None:
        """Export each identity's member certificate expiry (``notAfter`` as UNIX time), counted down at every scrape;
        identities not named any more (a reload removed them) are dropped."""
        for gone in self._expiring - not_after.keys():
            self.certificate_expiry_seconds.remove(gone)
        for identity, when in not_after.items():
            self.certificate_expiry_seconds.labels(identity).set_function(_countdown(when, clock))
        self._expiring = set(not_after)

    def observe_sign(self, backend: str, seconds: float, ok: bool) -> None:
        """A key store signature took ``seconds`` (the ``KeyStores`` observer)."""
        self.sign_seconds.labels(backend).observe(seconds)
        if not ok:
            self.sign_failures.labels(backend).inc()

    def observe_throttle_wait(self, host: str, seconds: float) -> None:
        """A key store operation waited ``seconds`` in the rate limiter (the Key Vault throttle's callback)."""
        self.throttle_wait_seconds.labels(host).observe(seconds)

    def exposition(self) -> bytes:
        """The Prometheus text format, served with ``CONTENT_TYPE_LATEST``."""
        return generate_latest(self.registry)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """One sample's current value (0.0 when absent): for tests and the health output."""
        got = self.registry.get_sample_value(name, labels or {})
        return 0.0 if got is None else got


def _countdown(when: float, clock: Callable[[], float]) -> Callable[[], float]:
    return lambda: when - clock()


METRICS = Metrics()
"""The process's instruments. The daemon serves these; components default to them unless handed their own."""

"""Prometheus metrics of the outer side, and their HTTP exposition.

Outer side only. The inner side has no metrics port, on purpose: a port on the inner side that
outsiders can read would be an upload channel with no meter. What the inner knows stays
inside (its logs, its ledger) or travels up the metered uplink. (The spot-check verifier's
optional port, `inner.verifier`, is for the inner side's own network.)

    uplimit_uplink_bytes_total        uplink bytes received (as the receive counts count: the
                                      link's, and what uplinks sent before they proved
                                      themselves)
    uplimit_downlink_bytes_total      downlink bytes sent
    uplimit_budget_left_bytes         lifetime budget less every uplink byte ever received:
                                      an upper bound, the inner's ledger also charges timing
                                      and connections (`uplimit meters` has the exact figure);
                                      0: the outer's own receive budget is spent and it reads
                                      nothing more (alarm kind "receive-budget")
    uplimit_bits_per_token            histogram, per decoded frame with tokens: its uplink
                                      bits per token
    uplimit_frames_total{outcome}     frames decoded / rejected
    uplimit_tokens_total              tokens delivered
    uplimit_mismatches_total          frames that failed their check and started a resend
    uplimit_alarms_total{kind}        alarms by kind (`wire.receiver.AlarmKind`; "bits": the
                                      monitor; "verifier": bytes from the spot-check verifier)
    uplimit_spotchecks_total{outcome} streams chosen for the spot-check verifier: sent, or
                                      unsent (its queue was full, or its connection failed)
    uplimit_link_state{uplimit_link_state}   the link's state (1 for the current one)
    uplimit_meter_bytes{meter}        uplink bytes by meter as the status page last read them
                                      (ledger wire bytes, received, kernel TCP payload)
    uplimit_meters_agree              1 when every `link.agreement` check held at that read,
                                      0 when one failed, NaN with fewer than two meters
"""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

from uplimit.wire.receiver import LinkState

__all__ = ["BITS_PER_TOKEN_BUCKETS", "OuterMetrics", "serve_metrics"]

# From a near-certain token (~0.05 bit) to a raw resend (18 bits a token, plus headers).
BITS_PER_TOKEN_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 8, 13, 20, 40)


class OuterMetrics:
    """The outer side's metrics, in their own registry (one per link)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.uplink_bytes = Counter(
            "uplimit_uplink_bytes", "Uplink bytes received by the outer side.", registry=r
        )
        self.downlink_bytes = Counter(
            "uplimit_downlink_bytes", "Downlink bytes sent by the outer side.", registry=r
        )
        self.budget_left = Gauge(
            "uplimit_budget_left_bytes",
            "Lifetime upload budget less every uplink byte received (an upper bound).",
            registry=r,
        )
        # NaN until the budget is known: 0 would read as "exhausted" on a dashboard.
        self.budget_left.set(float("nan"))
        self.bits_per_token = Histogram(
            "uplimit_bits_per_token",
            "Uplink bits per token of each decoded frame.",
            buckets=BITS_PER_TOKEN_BUCKETS,
            registry=r,
        )
        self.frames = Counter(
            "uplimit_frames", "Uplink frames by outcome.", ["outcome"], registry=r
        )
        self.tokens = Counter("uplimit_tokens", "Tokens decoded and delivered.", registry=r)
        self.mismatches = Counter(
            "uplimit_mismatches", "Frames that failed their check (a resend followed).", registry=r
        )
        self.alarms = Counter("uplimit_alarms", "Alarms raised, by kind.", ["kind"], registry=r)
        self.spotchecks = Counter(
            "uplimit_spotchecks",
            "Streams chosen for the spot-check verifier, by outcome (sent, unsent).",
            ["outcome"],
            registry=r,
        )
        self.state = Enum(
            "uplimit_link_state",
            "State of the link.",
            states=[s.value for s in LinkState],
            registry=r,
        )
        self.state.state(LinkState.HANDSHAKING.value)
        self.meter_bytes = Gauge(
            "uplimit_meter_bytes",
            "Uplink bytes by meter at the status page's last read.",
            ["meter"],
            registry=r,
        )
        self.meters_agree = Gauge(
            "uplimit_meters_agree",
            "1 if the meters agreed at the last read, 0 if not, NaN if fewer than two were read.",
            registry=r,
        )
        self.meters_agree.set(float("nan"))
        self.inner_confined = Gauge(
            "uplimit_inner_confined",
            "1 if the inner said at the handshake that it runs in its namespace behind the"
            " kernel quota, 0 if it runs unconfined, NaN before a handshake (the inner's claim).",
            registry=r,
        )
        self.inner_confined.set(float("nan"))
        self._budget: int | None = None

    def set_budget(self, lifetime_bytes: int, received_bytes: int) -> None:
        """The lifetime budget, and the uplink bytes received before this process started."""
        self._budget = lifetime_bytes
        self.budget_left.set(lifetime_bytes - received_bytes)

    def received(self, n_bytes: int) -> None:
        self.uplink_bytes.inc(n_bytes)
        if self._budget is not None:
            self.budget_left.dec(n_bytes)

    def frame(self, wire_bytes: int, tokens: int) -> None:
        self.frames.labels("decoded").inc()
        self.tokens.inc(tokens)
        if tokens:
            self.bits_per_token.observe(8 * wire_bytes / tokens)

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)


def serve_metrics(metrics: OuterMetrics, host: str = "127.0.0.1", port: int = 9464) -> WSGIServer:
    """Serve `metrics` over HTTP at http://host:port/metrics from a thread; `.shutdown()` on
    the returned server stops it. Outer side only (module doc)."""
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return server

"""Prometheus metrics, one registry per `App` (so tests can run several apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
CYCLE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 120.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.quotes = Counter(
            "finnstream_quotes", "Quote requests by outcome", ["outcome"], registry=r
        )
        self.records_delivered = Counter(
            "finnstream_records_delivered", "Records accepted by Kinesis", ["source"], registry=r
        )
        self.put_calls = Counter(
            "finnstream_put_records_calls", "PutRecords calls", ["result"], registry=r
        )
        self.records_retried = Counter(
            "finnstream_records_retried",
            "Records resent after a failed entry",
            ["error"],
            registry=r,
        )
        self.records_spooled = Counter(
            "finnstream_records_spooled", "Records written to the spool", registry=r
        )
        self.spool_rejected = Counter(
            "finnstream_spool_rejected", "Records the full spool shed to the gap ledger", registry=r
        )
        self.spool_depth = Gauge(
            "finnstream_spool_depth_records", "Records waiting in the spool", registry=r
        )
        self.spool_bytes = Gauge(
            "finnstream_spool_depth_bytes", "Bytes waiting in the spool", registry=r
        )
        self.gaps_open = Gauge("finnstream_gaps_open", "Slots in the gap ledger", registry=r)
        self.gaps_published = Counter(
            "finnstream_gaps_published", "gap records published", registry=r
        )
        self.candles = Counter(
            "finnstream_backfill_candles", "candle records published", registry=r
        )
        self.cycle_seconds = Histogram(
            "finnstream_cycle_seconds",
            "Tick to last record accepted",
            buckets=CYCLE_BUCKETS,
            registry=r,
        )
        self.schedule_lag = Histogram(
            "finnstream_schedule_lag_seconds",
            "Tick to first request",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.last_cycle = Gauge(
            "finnstream_last_cycle_timestamp_seconds",
            "Minute slot of the last cycle started",
            registry=r,
        )
        self.skipped_slots = Counter(
            "finnstream_skipped_slots",
            "Slots not polled live (sent to the gap ledger)",
            ["reason"],
            registry=r,
        )
        self.held_records = Gauge(
            "finnstream_held_records",
            "Undelivered records kept only in memory because the disk refused writes",
            registry=r,
        )
        self.records_released = Counter(
            "finnstream_records_released",
            "Held records given up while the disk refused writes (their slots become gaps)",
            registry=r,
        )
        self.drain_failures = Counter(
            "finnstream_spool_drain_failures",
            "Spool batches Kinesis did not take, or the spool could not retire",
            registry=r,
        )
        self.active = Gauge(
            "finnstream_active",
            "1 while this process holds the spool lock and polls; 0 while it is a standby",
            registry=r,
        )
        self.loop_lag = Gauge(
            "finnstream_event_loop_max_lag_seconds",
            "Longest event-loop stall seen since start (a 100 ms sleep that woke this late)",
            registry=r,
        )
        self.backfill_enabled = Gauge(
            "finnstream_backfill_enabled", "1 while backfill is on", registry=r
        )
        self.token_valid = Gauge(
            "finnstream_token_valid", "1 while Finnhub accepts the token", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""CloudWatch metrics without an agent: Embedded Metric Format (EMF) lines on stdout.

With `log.format: json`, the active daemon writes one JSON line per cycle beside its log events
(ECS's awslogs driver sends stdout to CloudWatch Logs, which turns the line into metrics in the
namespace `Finnstream`, dimensions `Stream` and `Shard`); a standby writes `Active` = 0 once a
minute. The alarms in deploy/cloudformation.yaml read these names: change none of them.

Counts "since the previous line" are deltas of the Prometheus counters (`CounterDeltas`), so
deliveries by the spool drainer and the backfiller between cycles are counted, and `/metrics`
and CloudWatch never disagree; gauges are read from the same registry. A line holds counts,
durations, the stream's name and the shard's index: never the token nor any other secret.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

import orjson
import structlog

from finnstream.metrics import Metrics

if TYPE_CHECKING:
    from finnstream.app import CycleReport

NAMESPACE: Final = "Finnstream"
DIMENSIONS: Final = ("Stream", "Shard")
COUNT, SECONDS, NONE = "Count", "Seconds", "None"

# Every metric a line may carry, with its CloudWatch unit (a metric keeps one unit for good).
UNITS: Final[Mapping[str, str]] = {
    "SlotsExpected": COUNT,  # symbols expected in the cycle's minute; only polled minutes have it
    "QuotesOk": COUNT,
    "QuotesFailed": COUNT,  # their slots went to the gap ledger
    "QuotesUnknown": COUNT,  # Finnhub answered c=0, t=0
    "RecordsDelivered": COUNT,  # accepted by Kinesis since the previous line, every source
    "RecordsSpooled": COUNT,  # since the previous line
    "GapsPublished": COUNT,  # `gap` records accepted by Kinesis since the previous line
    "GapsOpen": COUNT,  # gauge: slots in the gap ledger
    "SpoolDepth": COUNT,  # gauge: records waiting in the spool
    "CycleSeconds": SECONDS,  # from the cycle's own start to its records settled
    "ScheduleLagSeconds": SECONDS,  # tick to first request; only for cycles started by a tick
    "TokenValid": NONE,  # 1 while Finnhub accepts the token, else 0
    "Active": NONE,  # 1: this process polls; 0: a standby
}
STANDBY_EVERY_S: Final = 60.0


def emf_line(
    timestamp_ms: int,
    dimensions: Mapping[str, str],
    values: Mapping[str, float],
    properties: Mapping[str, Any] | None = None,
) -> str:
    """One EMF log event as a JSON line (no newline). Pure: no clock, no I/O.

    Every metric and dimension value is a top-level key, declared in `_aws.CloudWatchMetrics`
    with its unit; `properties` are plain fields for Logs Insights, not metrics.
    """
    unknown = set(values) - set(UNITS)
    if unknown or set(dimensions) != set(DIMENSIONS):
        raise ValueError(f"not an EMF line of finnstream's: {sorted(unknown) or dimensions}")
    directive = {
        "Namespace": NAMESPACE,
        "Dimensions": [list(DIMENSIONS)],
        "Metrics": [{"Name": name, "Unit": UNITS[name]} for name in values],
    }
    body: dict[str, Any] = dict(properties or {})
    body.update(dimensions)
    body.update(values)
    body["_aws"] = {"Timestamp": timestamp_ms, "CloudWatchMetrics": [directive]}
    return orjson.dumps(body).decode()


def cycle_values(
    report: CycleReport, since_last: Mapping[str, float], gauges: Mapping[str, float]
) -> dict[str, float]:
    """A cycle's metrics: its quotes from the report, the rest from the counters and gauges.
    Pure. The lag is left out of a catch-up cycle's line (the one for the minute already under
    way at start-up, or `run --once`): its 'lag' is how far into the minute it started."""
    values: dict[str, float] = {
        "SlotsExpected": report.symbols,
        "QuotesOk": report.published,
        "QuotesFailed": report.failed,
        "QuotesUnknown": report.unknown,
        **since_last,
        **gauges,
        "CycleSeconds": round(report.took_s, 3),
    }
    if report.on_time:
        values["ScheduleLagSeconds"] = round(max(0.0, report.lag_s), 4)
    values["Active"] = 1
    return values


def _value(metric: Any, **labels: str) -> int:
    """A counter's or gauge's value, summed over its label sets that match `labels`, read with
    prometheus_client's public `collect()` (a counter's `_created` samples left out). Every
    metric read here counts whole things."""
    total = 0.0
    for family in metric.collect():
        for sample in family.samples:
            if not sample.name.endswith("_created") and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                total += sample.value
    return round(total)


class CounterDeltas:
    """The Prometheus counters' growth since the previous `take()` (the first: since start)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._last = dict.fromkeys(self._read(), 0)

    def _read(self) -> dict[str, int]:
        m = self._metrics
        return {
            "RecordsDelivered": _value(m.records_delivered),
            "RecordsSpooled": _value(m.records_spooled),
            # Counted by the sink when Kinesis accepts it, also after a stay in the spool.
            "GapsPublished": _value(m.gaps_published),
        }

    def take(self) -> dict[str, int]:
        now = self._read()
        delta = {name: now[name] - self._last[name] for name in now}
        self._last = now
        return delta


def gauges(metrics: Metrics) -> dict[str, int]:
    return {
        "GapsOpen": _value(metrics.gaps_open),
        "SpoolDepth": _value(metrics.spool_depth),
        "TokenValid": _value(metrics.token_valid),
    }


def write_stdout(line: str) -> None:
    """One line to stdout through structlog's own printer, which holds the same per-file lock
    as the log events: a metrics line and a log line never interleave, threads included."""
    structlog.PrintLogger(sys.stdout).msg(line)


class EmfWriter:
    """Writes the lines for one process: its dimensions, and the counters' last readings."""

    def __init__(
        self,
        metrics: Metrics,
        stream: str,
        shard: int,
        write: Callable[[str], None] = write_stdout,
    ) -> None:
        self._metrics = metrics
        self._deltas = CounterDeltas(metrics)
        self.dimensions = {"Stream": stream, "Shard": str(shard)}
        self._write = write

    def cycle(self, report: CycleReport) -> None:
        """The cycle's line, stamped with its minute slot (the tick's wall time), so each
        minute's line falls in that minute's one-minute period however long the cycle took."""
        values = cycle_values(report, self._deltas.take(), gauges(self._metrics))
        props = {"event": "metrics.cycle", "minute": report.minute}
        self._write(emf_line(report.minute * 1000, self.dimensions, values, props))

    def standby(self, now: float) -> None:
        """A standby's line: only `Active` = 0, stamped with the wall clock `now`."""
        props = {"event": "metrics.standby"}
        self._write(emf_line(round(now * 1000), self.dimensions, {"Active": 0}, props))

"""A seeded fault schedule: everything a simulated run will do to finnstream, from one integer.

`Plan.generate(seed)` draws the configuration (symbols, cron, market hours, backfill plan,
spool size, retries) and a schedule of faults on virtual time: Finnhub down, failing, rate
limiting, slow or answering garbage; Kinesis down, throttling records, failing calls, slow or
losing its answers after accepting; the disk full (spool, ledger or both); and process events
(SIGTERM, SIGKILL with a restart later, SIGSTOP pauses). `describe()` prints it all, so a
failing seed can be read and replayed (FINNSTREAM_SIM_SEED=<seed>).
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass, field

MINUTE = 60.0

FINNHUB_FAULTS = ("finnhub_down", "finnhub_5xx", "finnhub_429", "finnhub_slow", "finnhub_garbage")
KINESIS_FAULTS = (
    "kinesis_down",
    "kinesis_throttle",
    "kinesis_errors",
    "kinesis_slow",
    "kinesis_lost_answers",
)
DISK_FAULTS = ("disk_full", "spool_disk_full", "ledger_disk_full")
UNKNOWN_SYMBOL = "ZZZZ"
# Monday 2 March 2026, 14:00 UTC (09:00 New York, EST): ordinary days all week.
BASE_EPOCH = dt.datetime(2026, 3, 2, 14, 0, tzinfo=dt.UTC).timestamp()
MARKET_CLOSE_RUN_EPOCH = dt.datetime(2026, 3, 3, 20, 25, tzinfo=dt.UTC).timestamp()  # 15:25 NY


@dataclass(frozen=True)
class Span:
    """A fault active from `start` to `end` (virtual seconds since the run began)."""

    kind: str
    start: float
    end: float
    level: float = 1.0  # a share of calls or records, or seconds of latency

    def active(self, t: float) -> bool:
        return self.start <= t < self.end


@dataclass(frozen=True)
class Event:
    """A process event: `sigterm`/`sigkill` (then `length` seconds down), or `pause` (SIGSTOP
    for `length` seconds)."""

    at: float
    kind: str
    length: float


@dataclass
class Plan:
    seed: int
    start_epoch: float
    symbols: list[str]
    cron: str = "* * * * *"
    market_hours: bool = False
    candles: str = "premium"  # premium | free (403) | off (backfill.enabled false)
    max_attempts: int = 3
    every_minutes: int = 2
    spool_max_bytes: int = 256 * 1024 * 1024
    requests_per_minute: int = 6000
    requests_per_second: int = 30
    max_retries: int = 8
    retries: int = 3
    duration: float = 60 * MINUTE
    spans: list[Span] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    calm: bool = False  # the liveness phase: every fault off

    def level(self, kind: str, t: float) -> float | None:
        """The fault's level at `t` if it is active (the strongest of overlapping spans)."""
        if self.calm:
            return None
        levels = [s.level for s in self.spans if s.kind == kind and s.active(t)]
        return max(levels) if levels else None

    def scheduled(self, kind: str, t: float) -> bool:
        """The plan had this fault active at `t` (calm phase or not: for the checks)."""
        return any(s.kind == kind and s.active(t) for s in self.spans)

    @property
    def known_symbols(self) -> list[str]:
        return [s for s in self.symbols if s != UNKNOWN_SYMBOL]

    @classmethod
    def generate(cls, seed: int) -> Plan:
        rng = random.Random(seed)
        n = rng.choice([2, 5, 12, 30])
        symbols = [f"S{i:02d}" for i in range(n)]
        if rng.random() < 0.3:
            symbols.append(UNKNOWN_SYMBOL)
        market = rng.random() < 0.15
        start = MARKET_CLOSE_RUN_EPOCH if market else BASE_EPOCH + rng.randrange(0, 4) * 86_400
        start += rng.randrange(0, 3_600) + rng.random() * MINUTE if not market else rng.random()
        plan = cls(
            seed=seed,
            start_epoch=start,
            symbols=symbols,
            cron=rng.choice(["* * * * *"] * 6 + ["*/2 * * * *", "*/5 * * * *"]),
            market_hours=market,
            candles=rng.choice(["premium"] * 3 + ["free", "off"]),
            max_attempts=rng.randint(1, 3),
            every_minutes=rng.randint(1, 5),
            spool_max_bytes=rng.choice([256 * 1024 * 1024] * 3 + [12 * 1024, 40 * 1024]),
            requests_per_minute=rng.choice([6000] * 4 + [max(2, n - 2)]),
            max_retries=rng.randint(0, 8),
            retries=rng.randint(0, 4),
            duration=rng.uniform(30, 90) * MINUTE,
        )
        for kind in (*FINNHUB_FAULTS, *KINESIS_FAULTS, *DISK_FAULTS):
            if rng.random() < 0.35:
                for _ in range(rng.randint(1, 3)):
                    plan.spans.append(cls._span(rng, kind, plan.duration))
        if plan.spool_max_bytes < 1024 * 1024 and rng.random() < 0.8:
            # A small spool is only interesting while Kinesis refuses for long enough to fill it.
            start = rng.uniform(0, plan.duration / 2)
            plan.spans.append(Span("kinesis_down", round(start, 3), round(start + 20 * MINUTE, 3)))
        t = 0.0
        while True:
            t += rng.expovariate(1 / (20 * MINUTE))
            if t >= plan.duration - MINUTE:
                break
            kind = rng.choice(["sigterm", "sigkill", "sigkill", "pause", "pause"])
            length = rng.uniform(3, 240) if kind == "pause" else rng.uniform(0, 600)
            plan.events.append(Event(round(t, 3), kind, round(length, 3)))
        return plan

    @staticmethod
    def _span(rng: random.Random, kind: str, duration: float) -> Span:
        start = rng.uniform(0, duration)
        end = start + rng.uniform(0.5, 15) * MINUTE
        if kind.endswith("_slow"):
            level = rng.choice([0.5, 3.0, 12.0])  # seconds; past finnhub.timeout_s is a timeout
        elif kind in ("finnhub_down", "kinesis_down") or kind in DISK_FAULTS:
            level = 1.0
        else:
            level = rng.choice([0.1, 0.5, 0.9])
        return Span(kind, round(start, 3), round(end, 3), level)

    def describe(self) -> str:
        start = dt.datetime.fromtimestamp(self.start_epoch, tz=dt.UTC).isoformat()
        lines = [
            f"seed {self.seed}: start {start}, {self.duration / MINUTE:.1f} min, "
            f"{len(self.symbols)} symbols {self.symbols[:3]}..., cron {self.cron!r}, "
            f"market_hours {self.market_hours}, candles {self.candles}, "
            f"max_attempts {self.max_attempts}, every_minutes {self.every_minutes}, "
            f"spool {self.spool_max_bytes} B, {self.requests_per_minute}/min, "
            f"kinesis.max_retries {self.max_retries}, finnhub.retries {self.retries}",
        ]
        lines += [
            f"  {s.kind:<22} {s.start / MINUTE:7.2f} .. {s.end / MINUTE:7.2f} min  level {s.level}"
            for s in sorted(self.spans, key=lambda s: s.start)
        ]
        lines += [
            f"  {e.kind:<22} at {e.at / MINUTE:7.2f} min  for {e.length:.1f} s" for e in self.events
        ]
        return "\n".join(lines)

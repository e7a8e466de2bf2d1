"""Run the real finnstream through a seeded plan of faults on virtual time, then check the promise.

What runs is the real `App` (cycle, limiter, Finnhub client, Kinesis sink and publisher, spool,
gap ledger, slot keeper, drainer, backfiller, APScheduler's ticker) on a `VirtualLoop`; only
the network ends are fakes (`FakeFinnhub` as the transport, `FakeKinesis` as the client) and
the spool directory is a real one. A process is one loop: SIGTERM is `request_stop`, SIGKILL
abandons the loop mid-step (no `finally` runs, the lock is dropped as the kernel would) and the
next start opens the same directory; a pause jumps the clock while nothing runs. A full disk
makes the spool's fsyncs and the ledger's transactions fail with ENOSPC.

The checks:
- at every crash and stop, each expected slot is delivered, in the spool, in the gap ledger,
  or after the durable watermark (the next start ledgers it);
- at the end, after a calm phase with backfill running, each expected slot has a record
  (`quote`, `candle` or `gap`), the spool is empty and the ledger holds nothing old;
- every quote record was requested inside its own minute and carries exactly what Finnhub
  answered; no record for an unknown symbol or a price that is not positive; every PutRecords
  call kept Kinesis's limits; finnstream's own pace never drew a 429.
"""

from __future__ import annotations

import errno
import gc
import os
import random
import sqlite3
import sys
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import stamina
import structlog

import finnstream.spool
from finnstream.app import App, CycleReport, Deps
from finnstream.clock import MINUTE_S, minute_slot
from finnstream.config import Config, minute_capacity
from finnstream.cycle import RETRY_WINDOW_S
from finnstream.errors import FinnstreamError
from finnstream.ledger import GapLedger
from finnstream.records import Record
from finnstream.schedule import FIRE_EARLY_S
from finnstream.slots import Expected, SlotKeeper
from finnstream.spool import Spool

from .fakes import TOKEN, FakeFinnhub, FakeKinesis
from .plan import MINUTE, UNKNOWN_SYMBOL, Event, Plan
from .vloop import VirtualClock, VirtualLoop, virtual_apscheduler

CALM_PHASE_S = 25 * MINUTE  # after the faults: long enough for every backfill to finish
STOP_GRACE_S = 30.0  # ECS (and compose) kill a task this long after SIGTERM
LATE_START_S = 2.0  # a cycle on its tick starts its first request within this of the minute
RESTART_AFTER_FAILED_START_S = 30.0  # ECS restarts a task that exited, a little later
SETTLED_BEFORE_END_S = 6 * MINUTE  # slots this recent may still be on their way at the end
GRAVEYARD: list[Any] = []  # crashed processes' loops and tasks: not collected while the run goes


@dataclass
class Disk:
    """A disk that refuses writes (ENOSPC) while the plan says it is full (never while the
    checker reads it)."""

    plan: Plan
    clock: VirtualClock
    checking: bool = False

    def spool_full(self) -> bool:
        t = self.clock.now
        full = self.plan.level("disk_full", t) or self.plan.level("spool_disk_full", t)
        return bool(full) and not self.checking

    def ledger_full(self) -> bool:
        t = self.clock.now
        full = self.plan.level("disk_full", t) or self.plan.level("ledger_disk_full", t)
        return bool(full) and not self.checking

    @contextmanager
    def looked_at(self) -> Iterator[None]:
        self.checking = True
        try:
            yield
        finally:
            self.checking = False


class _FaultyOs:
    """`os` for the spool module: fsync fails with ENOSPC while the disk is full."""

    def __init__(self, disk: Disk) -> None:
        self._disk = disk

    def fsync(self, fd: int) -> None:
        if self._disk.spool_full():
            raise OSError(errno.ENOSPC, "No space left on device")
        os.fsync(fd)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


@contextmanager
def faulty_disk(disk: Disk) -> Iterator[None]:
    real_commit, real_expand, real_setup = (
        GapLedger.commit,
        GapLedger.expand_window,
        GapLedger._setup,
    )

    def refuse() -> None:
        if disk.ledger_full():
            raise sqlite3.OperationalError("database or disk is full")

    def commit(self: GapLedger, *args: Any, **kwargs: Any) -> int:
        if disk.ledger_full():
            raise self._error("cannot be read or written", sqlite3.OperationalError("disk full"))
        return real_commit(self, *args, **kwargs)

    def expand(self: GapLedger, *args: Any, **kwargs: Any) -> int:
        if disk.ledger_full():
            raise self._error("cannot be read or written", sqlite3.OperationalError("disk full"))
        return real_expand(self, *args, **kwargs)

    def setup(self: GapLedger, conn: sqlite3.Connection) -> None:
        refuse()
        real_setup(self, conn)

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(finnstream.spool, "os", _FaultyOs(disk)))
        stack.enter_context(mock.patch.object(GapLedger, "commit", commit))
        stack.enter_context(mock.patch.object(GapLedger, "expand_window", expand))
        stack.enter_context(mock.patch.object(GapLedger, "_setup", setup))
        yield


@dataclass
class Ended:
    how: str  # stopped | crashed | failed-start
    at: float
    code: int | None = None


@dataclass
class Outcome:
    plan: Plan
    problems: list[str] = field(default_factory=list)
    ends: list[Ended] = field(default_factory=list)
    delivered: int = 0
    log_tail: list[str] = field(default_factory=list)

    def report(self) -> str:
        lines = [self.plan.describe(), "problems:"]
        lines += [f"  {p}" for p in self.problems[:30]]
        lines += ["process ends: " + ", ".join(f"{e.how}@{e.at / MINUTE:.2f}" for e in self.ends)]
        lines += ["last log lines:", *[f"  {line}" for line in self.log_tail[-40:]]]
        lines += [f"replay: FINNSTREAM_SIM_SEED={self.plan.seed} pytest tests/test_simulation.py"]
        return "\n".join(lines)


class _LogTail:
    """A structlog processor that keeps the last events in memory and prints nothing."""

    def __init__(self, size: int = 200) -> None:
        self.lines: deque[str] = deque(maxlen=size)

    def __call__(self, _logger: Any, _name: str, event: Any) -> Any:
        fields = " ".join(f"{k}={v}" for k, v in event.items() if k != "event")
        self.lines.append(f"{event.get('event')} {fields}"[:300])
        raise structlog.DropEvent


class Simulation:
    def __init__(self, plan: Plan, workdir: Path) -> None:
        self.plan = plan
        self.dir = workdir / "spool"
        self.clock = VirtualClock(plan.start_epoch)
        self.rng = random.Random(plan.seed)
        self.finnhub = FakeFinnhub(plan, self.clock, random.Random(plan.seed + 1))
        self.kinesis = FakeKinesis(plan, self.clock, random.Random(plan.seed + 2))
        self.outcome = Outcome(plan)
        self.cycles: list[CycleReport] = []
        self.starts: list[float] = []  # wall time each process started
        self.paused: list[tuple[float, float]] = []  # wall time each pause began and ended
        self.first_watermark: int | None = None
        self.disk = Disk(plan, self.clock)
        self._is_open = self._market() if plan.market_hours else None
        self.expected = Expected(plan.cron, self._is_open)

    @staticmethod
    def _market() -> Callable[[int], bool]:
        from finnstream.markets import MarketHours  # noqa: PLC0415

        return MarketHours().is_open

    def config(self, *, every_minutes: int) -> Config:
        plan = self.plan
        backfill = {
            "enabled": plan.candles != "off",
            "every_minutes": every_minutes,
            "max_attempts": plan.max_attempts,
        }
        doc = {
            "symbols": plan.symbols,
            "finnhub": {
                "base_url": "https://finnhub.invalid/api/v1",
                "requests_per_minute": plan.requests_per_minute,
                "requests_per_second": plan.requests_per_second,
                "retries": plan.retries,
                "timeout_s": 5,
            },
            "schedule": {"cron": plan.cron, "market_hours_only": plan.market_hours},
            "kinesis": {
                "stream_name": "sim",
                "region": "us-east-1",
                "max_retries": plan.max_retries,
            },
            "spool": {"dir": str(self.dir)},
            "backfill": backfill,
            "health": {"port": 0},
            "log": {"level": "DEBUG", "format": "console"},
        }
        cfg = Config.model_validate(doc)
        # Below the 1 MiB a user may set, so a short outage fills it.
        spool = cfg.spool.model_copy(update={"max_bytes": plan.spool_max_bytes})
        return cfg.model_copy(update={"spool": spool})

    # ---- running -----------------------------------------------------------------------------

    def run(self) -> Outcome:
        tail = _LogTail()
        structlog.configure(processors=[tail], cache_logger_on_first_use=False)
        random.seed(self.plan.seed)  # stamina's jitter
        with ExitStack() as stack:
            stack.enter_context(stamina.set_testing(False))  # real backoff, on virtual time
            stack.enter_context(virtual_apscheduler(self.clock))
            stack.enter_context(faulty_disk(self.disk))
            stack.enter_context(self._note_first_watermark())
            try:
                self._fault_phase()
                self._calm_phase()
            finally:
                self.outcome.log_tail = list(tail.lines)
                _bury()
        self.outcome.delivered = len(self.kinesis.accepted)
        return self.outcome

    def _fault_phase(self) -> None:
        events = deque(e for e in self.plan.events if e.kind != "pause")
        pauses = [e for e in self.plan.events if e.kind == "pause"]
        every = self.plan.every_minutes
        while self.clock.now < self.plan.duration:
            nxt: Event | None = events[0] if events else None
            until = min(nxt.at, self.plan.duration) if nxt else self.plan.duration
            kill = nxt is not None and nxt.at < self.plan.duration and nxt.kind == "sigkill"
            ended = self._incarnation(self.config(every_minutes=every), until, kill, pauses)
            self._check_accounted(ended)
            if ended.how == "failed-start":
                self.clock.advance(RESTART_AFTER_FAILED_START_S)
                continue
            if nxt is not None and nxt.at < self.plan.duration:
                events.popleft()
                self.clock.advance(nxt.length)

    def _calm_phase(self) -> None:
        self.plan.calm = True
        self.calm_from = self.clock.time()
        end = self.clock.now + CALM_PHASE_S
        while self.clock.now < end:
            ended = self._incarnation(self.config(every_minutes=1), end, False, [])
            self._check_accounted(ended)
            if ended.how == "failed-start":
                self.clock.advance(RESTART_AFTER_FAILED_START_S)
        self._check_complete()
        self._check_calm_quotes()
        self._check_cycles_on_time()
        self._check_records()

    def _incarnation(self, cfg: Config, until: float, kill: bool, pauses: list[Event]) -> Ended:
        until = max(until, self.clock.now)  # a signal planned while it was down comes at start
        self.starts.append(self.clock.time())
        loop = VirtualLoop(self.clock)
        self.finnhub.process += 1
        app = App(
            cfg,
            clock=self.clock,
            environ={"FINNHUB_TOKEN": TOKEN},
            deps=Deps(finnhub_transport=self.finnhub, kinesis_client=self.kinesis),
        )

        async def main() -> int:
            async with app:
                return await app.run_forever()

        app.cycle_listeners.append(self.cycles.append)

        for pause in pauses:
            if self.clock.now <= pause.at < until:
                loop.call_at(pause.at, self._pause, pause.length)
        signalled: list[float] = []

        def sigterm() -> None:
            signalled.append(self.clock.now)
            app.request_stop()

        loop.call_at(until, loop.stop if kill else sigterm)
        try:
            code = loop.run_until_complete(main())
        except FinnstreamError as exc:
            loop.close()
            ended = Ended("failed-start", self.clock.now, exc.exit_code)
        except RuntimeError as exc:
            if "Event loop stopped" not in str(exc):
                raise
            GRAVEYARD.append((loop, loop.abandon(), app))
            _die(app)
            ended = Ended("crashed", self.clock.now)
        else:
            loop.close()
            ended = Ended("stopped", self.clock.now, code)
            if code != 0:
                self.outcome.problems.append(f"a stop at {self.clock.now:.1f} s exited {code}")
            took = self.clock.now - signalled[0] if signalled else 0.0
            if took > STOP_GRACE_S:
                self.outcome.problems.append(
                    f"SIGTERM at {signalled[0]:.1f} s took {took:.1f} s to exit"
                )
        self.outcome.ends.append(ended)
        return ended

    def _pause(self, seconds: float) -> None:
        """SIGSTOP, then SIGCONT `seconds` later: nothing runs, the clock goes on."""
        began = self.clock.time()
        self.clock.advance(seconds)
        self.paused.append((began, self.clock.time()))

    @contextmanager
    def _note_first_watermark(self) -> Iterator[None]:
        """Where the promise begins: the first watermark a process made durable (its start's
        minute less one); every expected slot after it must end as a record."""
        real = SlotKeeper.account_downtime

        def account(keeper: SlotKeeper, current: int) -> bool:
            fresh = keeper.watermark is None
            needs = real(keeper, current)
            if fresh and self.first_watermark is None:
                self.first_watermark = keeper.watermark
            return needs

        with mock.patch.object(SlotKeeper, "account_downtime", account):
            yield

    # ---- checks ------------------------------------------------------------------------------

    def _expected(self, upto_wall: float) -> set[tuple[str, int]]:
        if self.first_watermark is None:
            return set()
        minutes = self.expected.minutes(self.first_watermark + MINUTE_S, int(upto_wall) + 1)
        return {(s, m) for m in minutes for s in self.plan.known_symbols}

    def _durable_state(self) -> tuple[set[tuple[str, int]], set[tuple[str, int]], int | None]:
        with self.disk.looked_at():
            return self._read_disk()

    def _read_disk(self) -> tuple[set[tuple[str, int]], set[tuple[str, int]], int | None]:
        spooled = {(r.symbol, r.minute) for r in read_spool(self.dir, self.plan.spool_max_bytes)}
        if not (self.dir / "ledger.sqlite3").exists():
            return spooled, set(), None
        with GapLedger(self.dir) as ledger:
            ledgered = {(g.symbol, g.minute) for g in ledger.open_gaps()}
            for w in ledger.windows():
                minutes = self.expected.minutes(w.first, w.last + 1)
                ledgered |= {(w.symbol, m) for m in minutes}
            watermark = ledger.watermark()
        return spooled, ledgered, watermark

    def _delivered(self) -> set[tuple[str, int]]:
        return {(r["symbol"], r["minute"]) for r in self.kinesis.accepted}

    def _check_accounted(self, ended: Ended) -> None:
        spooled, ledgered, watermark = self._durable_state()
        if watermark is None:
            return
        self._check_attempts()
        covered = self._delivered() | spooled | ledgered
        lost = sorted(
            (m, s) for s, m in self._expected(self.clock.time()) - covered if m <= watermark
        )
        for minute, symbol in lost[:10]:
            self.outcome.problems.append(
                f"after {ended.how} at {ended.at / MINUTE:.2f} min: ({symbol}, {minute}) is "
                f"nowhere (watermark {watermark})"
            )

    def _check_complete(self) -> None:
        end = self.clock.time()
        spooled, ledgered, _ = self._durable_state()
        delivered = self._delivered()
        for symbol, minute in sorted(self._expected(end - SETTLED_BEFORE_END_S)):
            if (symbol, minute) not in delivered:
                where = "spool" if (symbol, minute) in spooled else "ledger"
                where = where if (symbol, minute) in spooled | ledgered else "nowhere"
                self.outcome.problems.append(f"({symbol}, {minute}) has no record ({where})")
                if len(self.outcome.problems) > 30:
                    return
        if spooled:
            self.outcome.problems.append(f"{len(spooled)} records still in the spool at the end")

    def _check_cycles_on_time(self) -> None:
        """A cycle on its tick starts at once, whatever the spool, Kinesis or backfill are
        doing. Only a pause (which stops everything) may make a tick late; retries at a
        failing Finnhub, which use up the minute window (they are bounded by the minute); or,
        near the plan's capacity, a catch-up cycle late in the minute before, after a restart
        (its requests hold the window: the next minute's start that late, then it settles)."""
        paused = self.paused
        failing = ("finnhub_down", "finnhub_5xx", "finnhub_429", "finnhub_slow", "finnhub_garbage")
        for report in self.cycles:
            if not report.on_time or report.lag_s < LATE_START_S:
                continue
            if any(a - MINUTE <= report.minute <= b + 2 * MINUTE for a, b in paused):
                continue
            if any(0 <= report.minute - start <= 2 * MINUTE for start in self.starts):
                continue
            since = report.minute - self.plan.start_epoch
            recent = [since - back for back in range(0, 181, 5)]
            if any(self.plan.scheduled(kind, t) for kind in failing for t in recent):
                continue
            self.outcome.problems.append(
                f"the cycle of {report.minute} started {report.lag_s:.1f} s late"
            )

    def _check_attempts(self) -> None:
        """A slot's failed tries are tries that were made: never more than the candle requests
        that covered it (a stop while waiting for the limiter is not a try)."""
        asked: dict[str, list[tuple[int, int]]] = {}
        for symbol, first, last in self.finnhub.candle_requests:
            asked.setdefault(symbol, []).append((first, last))
        with self.disk.looked_at(), GapLedger(self.dir) as ledger:
            gaps = ledger.open_gaps()
        for gap in gaps:
            tries = sum(1 for a, b in asked.get(gap.symbol, []) if a <= gap.minute <= b)
            if gap.attempts > tries:
                self.outcome.problems.append(
                    f"({gap.symbol}, {gap.minute}): {gap.attempts} attempts, {tries} requests"
                )

    def _check_calm_quotes(self) -> None:
        """With nothing failing, every minute's quotes land live (as many as fit the pace)."""
        cfg = self.config(every_minutes=1)
        fits = minute_capacity(cfg.finnhub)
        # From 6 minutes after the restart: near the key's capacity, a catch-up late in its
        # minute holds places of the minute window the next cycles need, and they may lose a few
        # live quotes (to candles or gaps) while the limiter settles (README, State and failover).
        first = minute_slot(self.calm_from) + 6 * MINUTE_S
        quoted: dict[int, int] = {}
        for rec in self.kinesis.accepted:
            if rec["source"] == "quote" and rec["minute"] >= first:
                quoted[rec["minute"]] = quoted.get(rec["minute"], 0) + 1
        want = len(self.plan.known_symbols)
        if len(self.plan.symbols) > fits:
            want = fits - (len(self.plan.symbols) - want)  # may poll the unknown one
        for minute in self.expected.minutes(first, int(self.clock.time()) - 2 * MINUTE_S):
            if quoted.get(minute, 0) < want:
                self.outcome.problems.append(
                    f"calm minute {minute}: {quoted.get(minute, 0)} quotes landed, {want} expected"
                )

    def _check_records(self) -> None:
        served = {(s.symbol, round(s.answered, 3)): s for s in self.finnhub.served}
        problems = self.outcome.problems
        problems += self.kinesis.contract_violations[:5]
        if self.finnhub.paced_429:
            problems.append(f"finnstream's own pace drew {self.finnhub.paced_429} 429s")
        for rec in self.kinesis.accepted:
            symbol, minute, source = rec["symbol"], rec["minute"], rec["source"]
            if symbol == UNKNOWN_SYMBOL and source != "gap":
                problems.append(f"a {source} record for the unknown symbol at {minute}")
            if source in ("quote", "candle") and not rec["price"] > 0:
                problems.append(f"{symbol} {minute}: {source} price {rec['price']}")
            if source == "gap" and not rec.get("reason"):
                problems.append(f"{symbol} {minute}: gap record without a reason")
            if source != "quote":
                continue
            answer = served.get((symbol, rec["fetched_at"]))
            if answer is None:
                problems.append(f"{symbol} {minute}: a quote record Finnhub never answered")
            elif not minute - FIRE_EARLY_S <= answer.asked <= minute + RETRY_WINDOW_S:
                problems.append(
                    f"{symbol} {minute}: requested at {answer.asked - minute:.1f} s into its minute"
                )
            elif rec["price"] != answer.body["c"] or rec["quote_time"] != answer.body["t"]:
                problems.append(f"{symbol} {minute}: the record is not what Finnhub answered")
            if len(problems) > 40:
                return


def read_spool(directory: Path, max_bytes: int) -> list[Record]:
    """Every record waiting in a spool directory (read without retiring anything)."""
    if not (directory / "spool").exists():
        return []
    spool = Spool(directory, max_bytes)
    return [r for batch in spool.batches() for r in batch.records]


def _bury() -> None:
    """After the checks, let the crashed processes' coroutines go. Collecting them runs their
    `finally` blocks on dead loops, which complain; nothing they do matters any more."""
    hook = sys.unraisablehook
    sys.unraisablehook = lambda _: None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "coroutine ... was never awaited", and the like
            GRAVEYARD.clear()
            gc.collect()
    finally:
        sys.unraisablehook = hook


def _die(app: App) -> None:
    """What the kernel does for a killed process: its file descriptors close, so its spool
    lock goes (sqlite holds no lock between transactions)."""
    fd = app.lock._fd
    if fd is not None:
        os.close(fd)
        app.lock._fd = None

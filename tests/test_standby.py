"""One poller per spool.dir (issue 9): real `finnstream run` processes on one directory.

Each process is `python -m finnstream` with its own health port; the tests follow them by their
JSON log lines, and check what the simulator was asked for and what landed in the stream.
The minute boundary is real, so a test that needs a tick waits for one (at most a minute).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from finnstream.lock import SpoolLock
from finnstream.simulator import Simulator

from .conftest import (
    TOKEN,
    Aws,
    ConfigFactory,
    ShiftedClock,
    early_in_a_minute,
    open_slots,
    quotes_served,
    subprocess_env,
)
from .faults import KinesisFaults, patched_kinesis
from .test_daemon import free_port, get, metric
from .test_faults import keys

Event = dict[str, Any]


class Proc:
    """A finnstream process whose stdout log events are collected as they are written."""

    def __init__(self, *args: str, env: dict[str, str], port: int = 0, python: str = "") -> None:
        self.args = args
        self.env = env
        self.port = port
        self.python = python  # code run instead of `-m finnstream` (to inject a fault)
        self.events: list[Event] = []
        self.stderr = ""
        self.started = 0.0
        self.ended = 0.0  # monotonic, when it exited
        self._changed = asyncio.Event()
        self._proc: asyncio.subprocess.Process | None = None
        self._readers: list[asyncio.Task[None]] = []

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        assert self._proc is not None
        return self._proc.returncode

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Proc:
        entry = ["-c", self.python] if self.python else ["-m", "finnstream"]
        self.started = time.monotonic()
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *entry,
            *self.args,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        self._readers = [
            asyncio.create_task(self._read_stdout()),
            asyncio.create_task(self._read_stderr()),
            asyncio.create_task(self._reap()),
        ]
        return self

    async def _reap(self) -> None:
        assert self._proc is not None
        await self._proc.wait()
        self.ended = time.monotonic()

    async def _read_stdout(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        async for raw in self._proc.stdout:
            line = raw.decode()
            assert "Traceback" not in line and TOKEN not in line, line
            if line.startswith("{"):
                self.events.append(json.loads(line))
                self._changed.set()
        self._changed.set()

    async def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        self.stderr = (await self._proc.stderr.read()).decode()

    def named(self, name: str) -> list[Event]:
        return [e for e in self.events if e["event"] == name]

    async def event(
        self, name: str, within: float, where: Callable[[Event], bool] = lambda _: True
    ) -> Event:
        """The first log event `name` that matches `where`, waiting up to `within` seconds."""
        async with asyncio.timeout(within):
            while True:
                for e in self.named(name):
                    if where(e):
                        return e
                assert self._proc is not None
                if self._proc.returncode is not None and self._readers[0].done():
                    raise AssertionError(f"exited {self._proc.returncode} before {name}: {self}")
                self._changed.clear()
                await self._changed.wait()

    def signal(self, sig: signal.Signals) -> None:
        assert self._proc is not None
        self._proc.send_signal(sig)

    async def wait(self, within: float) -> int:
        assert self._proc is not None
        code = await asyncio.wait_for(self._proc.wait(), within)
        await asyncio.wait_for(asyncio.gather(*self._readers), 5)
        return code

    async def metric(self, name: str) -> float:
        status, text = await get(f"{self.base}/metrics")
        assert status == 200
        return metric(text, name)

    def __str__(self) -> str:
        tail = [e["event"] for e in self.events[-10:]]
        return f"pid {self.pid} {self.args}: events {tail}, stderr {self.stderr!r}"


@pytest.fixture(autouse=True)
def _real_wall(wall: ShiftedClock) -> None:
    """Real processes on the real clock: so is the simulator."""
    wall.offset = 0.0


@pytest.fixture
async def spawn(aws: Aws) -> AsyncIterator[Callable[..., Any]]:
    """Start finnstream processes; any still running at the end is killed."""
    procs: list[Proc] = []

    async def start(*args: str, health: bool = False, python: str = "", **env: str) -> Proc:
        port = free_port() if health else 0
        environ = subprocess_env(AWS_ENDPOINT_URL=aws.url, **env)
        if health:
            environ |= {
                "FINNSTREAM_HEALTH__HOST": "127.0.0.1",
                "FINNSTREAM_HEALTH__PORT": str(port),
            }
        proc = Proc(*args, env=environ, port=port, python=python)
        procs.append(await proc.start())
        return proc

    yield start
    for proc in procs:
        if proc.returncode is None:
            proc.signal(signal.SIGKILL)
            await proc.wait(10)


def lock_is_free(spool: Path) -> bool:
    """Take the spool lock from this process, as a third party would, and give it back."""
    lock = SpoolLock(spool)
    if not lock.try_acquire():
        return False
    lock.release()
    return True


def asked_twice(sim: Simulator, first_symbol: str, checks: int) -> dict[tuple[str, int], int]:
    """(symbol, minute) pairs the simulator answered more than once, beyond the token checks.

    Every process that takes the lock checks its token with one quote of its first symbol
    before its first cycle (`FinnhubClient.check_token`): in the minute it took over, that
    symbol may be asked once more than the cycles ask it. `checks`: how many processes did so.
    """
    served = Counter((symbol, minute) for symbol, minute, _ in quotes_served(sim))
    for (symbol, minute), n in list(served.items()):
        if symbol == first_symbol and n > 1 and checks:
            extra = min(n - 1, checks)
            served[symbol, minute] -= extra
            checks -= extra
    return {slot: n for slot, n in served.items() if n > 1}


def one_line_without_traceback(err: str) -> str:
    assert "Traceback" not in err and TOKEN not in err
    assert len(err.strip().splitlines()) == 1, err
    return err


async def test_one_process_polls_while_standbys_and_a_run_once_wait_and_follow_the_holder(
    make_config: ConfigFactory, aws: Aws, sim: Simulator, spawn: Callable[..., Any], tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    symbols = ["AAPL", "MSFT", "AMZN", "BRK.B"]
    path = str(make_config(symbols))
    await early_in_a_minute()
    active = await spawn("run", "--config", path, health=True)
    first = await active.event("cycle.done", 30)  # the catch-up cycle for the minute under way
    standbys = [await spawn("run", "--config", path, health=True) for _ in range(2)]
    for standby in standbys:
        waiting = await standby.event("lock.standby", 30)
        assert waiting["holder"].startswith(f"pid {active.pid} on ")
        status, body = await get(f"{standby.base}/healthz")
        assert status == 200 and f"pid {active.pid} on " in json.loads(body)["standby"], body
        status, body = await get(f"{standby.base}/readyz")
        reason = json.loads(body)["reason"]
        assert status == 503 and reason.startswith("standby: ") and str(spool) in reason
        assert await standby.metric("finnstream_active") == 0
        assert (await standby.event("metrics.standby", 5))["Active"] == 0  # CloudWatch's view
    assert await active.metric("finnstream_active") == 1
    assert (await get(f"{active.base}/readyz"))[0] == 200

    # The next tick: the active process polls it; the standbys still wait.
    tick = await active.event("cycle.done", 75, lambda e: e["minute"] > first["minute"])
    assert tick["delivered"] == len(symbols)
    for standby in standbys:
        assert not standby.named("cycle.done") and not standby.named("app.ready")
        assert await standby.metric("finnstream_quotes_total") == 0
    active.signal(signal.SIGTERM)
    assert await active.wait(30) == 0, active

    # One standby takes over; the other and `run --once` now wait for it, and say so.
    taken = await asyncio.wait(
        [asyncio.create_task(s.event("lock.taken_over", 10)) for s in standbys],
        return_when=asyncio.FIRST_COMPLETED,
    )
    (new,) = [s for s in standbys if s.named("lock.taken_over")]
    (other,) = [s for s in standbys if s is not new]
    for task in taken[1]:
        task.cancel()
    follows = await other.event("lock.standby", 10, lambda e: f"pid {new.pid} on " in e["holder"])
    status, body = await get(f"{other.base}/readyz")
    assert status == 503 and follows["holder"] in json.loads(body)["reason"]
    await new.event("app.ready", 10)
    assert await new.metric("finnstream_active") == 1
    # `run --once` on the held directory gives up after its bounded wait, naming the new holder
    # and the directory. (Started before the takeover, it could win the freed lock itself.)
    once = await spawn("run", "--once", "--config", path)
    assert await once.wait(45) == 3
    assert 30 <= once.ended - once.started < 40, once.ended - once.started
    err = one_line_without_traceback(once.stderr)
    assert f"pid {new.pid} on " in err and str(spool) in err
    assert not once.named("app.ready") and not once.named("cycle.done")

    other.signal(signal.SIGTERM)
    assert await other.wait(10) == 0, other
    assert not lock_is_free(spool)  # a standby's exit leaves the active one's lock alone
    new.signal(signal.SIGTERM)
    assert await new.wait(30) == 0, new
    assert lock_is_free(spool)

    minutes = {first["minute"], tick["minute"]}
    polled = {(s, m) for s, m, _ in quotes_served(sim)}
    assert polled == {(s, m) for s in symbols for m in minutes}  # the new one repolled nothing
    assert asked_twice(sim, symbols[0], checks=0) == {}
    landed = keys(aws.records())
    assert set(landed) == {(s, m, "quote") for s in symbols for m in minutes}
    assert set(landed.values()) == {1}


MID_CYCLE_SYMBOLS = [f"K{i:02d}" for i in range(20)]


async def in_a_first_cycle(
    make_config: ConfigFactory, sim: Simulator, spawn: Callable[..., Any], quotes: int
) -> tuple[Proc, Proc]:
    """(active, standby) on one directory, the active one `quotes` into its first cycle, which
    takes 10 s (MID_CYCLE_SYMBOLS at 2 a second)."""
    path = str(make_config(MID_CYCLE_SYMBOLS, finnhub={"requests_per_second": 2}))
    await early_in_a_minute(30)
    active = await spawn("run", "--config", path, health=True)
    await active.event("app.ready", 30)
    standby = await spawn("run", "--config", path, health=True)
    await standby.event("lock.standby", 30)
    await asyncio.wait_for(sim.wait_served(len(sim.stats.served) + quotes), 10)
    return active, standby


async def test_after_a_sigkill_the_standby_polls_the_next_minute_and_every_slot_lands(
    make_config: ConfigFactory, aws: Aws, sim: Simulator, spawn: Callable[..., Any], tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    symbols = MID_CYCLE_SYMBOLS
    active, standby = await in_a_first_cycle(make_config, sim, spawn, quotes=2)
    assert await standby.metric("finnstream_quotes_total") == 0
    assert not active.named("cycle.done")  # killed in the middle of its first cycle
    active.signal(signal.SIGKILL)
    assert await active.wait(10) == -signal.SIGKILL

    await standby.event("lock.taken_over", 5)
    catch_up = await standby.event("cycle.done", 30)  # the killed cycle's minute, polled again
    assert (await get(f"{standby.base}/readyz"))[0] == 200
    assert await standby.metric("finnstream_active") == 1
    tick = await standby.event("cycle.done", 75, lambda e: e["minute"] > catch_up["minute"])
    assert tick["minute"] == catch_up["minute"] + 60 and tick["delivered"] == len(symbols)
    standby.signal(signal.SIGTERM)
    assert await standby.wait(30) == 0, standby

    minutes = (catch_up["minute"], tick["minute"])
    landed = {(s, m) for s, m, _ in keys(aws.records())}
    assert landed == {(s, m) for s in symbols for m in minutes}  # every slot is a record
    assert open_slots(spool) == set()  # and none is left to refill
    next_minute = Counter(s for s, m, _ in quotes_served(sim) if m == tick["minute"])
    assert next_minute == dict.fromkeys(symbols, 1)  # asked once each, by the standby alone


async def test_after_a_sigterm_the_standby_delivers_the_spool_with_nothing_lost_or_doubled(
    make_config: ConfigFactory, aws: Aws, sim: Simulator, spawn: Callable[..., Any]
) -> None:
    symbols = ["AAPL", "MSFT", "BRK.B"]
    path = str(make_config(symbols, kinesis={"max_retries": 1}))
    await early_in_a_minute(40)
    with patched_kinesis(KinesisFaults(outage=True)) as faults:
        active = await spawn("run", "--config", path)
        done = await active.event("cycle.done", 40)
        assert done["spooled"] == len(symbols)  # Kinesis refused them: they are in the spool
        standby = await spawn("run", "--config", path)
        await standby.event("lock.standby", 30)
        active.signal(signal.SIGTERM)
        assert await active.wait(30) == 0, active
        assert active.named("app.stopped")[0]["spool_records"] == len(symbols)
        faults.outage = False  # Kinesis is back once the active process is gone
        await standby.event("lock.taken_over", 5)
        await standby.event("spool.drained", 30)
        standby.signal(signal.SIGTERM)
        assert await standby.wait(30) == 0, standby

    assert standby.named("app.ready")[0]["spool_records"] == len(symbols)
    polled = {(s, m) for s, m, _ in quotes_served(sim)}
    landed = keys(aws.records())
    assert set(landed) == {(s, m, "quote") for s, m in polled}  # nothing lost
    assert set(landed.values()) == {1}  # nothing doubled
    assert asked_twice(sim, symbols[0], checks=0) == {}  # the standby did not poll the minute again


async def test_after_a_sigterm_mid_cycle_the_standby_asks_only_for_what_was_not_asked_for(
    make_config: ConfigFactory, aws: Aws, sim: Simulator, spawn: Callable[..., Any], tmp_path: Path
) -> None:
    """A deploy's SIGTERM in the middle of a cycle: the stopped process delivers what it asked
    for and ledgers the rest; the standby polls just the rest, within the same minute."""
    spool = tmp_path / "spool"
    symbols = MID_CYCLE_SYMBOLS
    active, standby = await in_a_first_cycle(make_config, sim, spawn, quotes=4)
    assert not active.named("cycle.done")  # stopped in the middle of its first cycle
    active.signal(signal.SIGTERM)
    assert await active.wait(30) == 0, active
    stopped = active.named("cycle.done")[0]
    assert 0 < stopped["delivered"] < len(symbols)

    await standby.event("lock.taken_over", 5)
    catch_up = await standby.event("cycle.done", 30)
    assert catch_up["minute"] == stopped["minute"]
    assert catch_up["symbols"] == catch_up["delivered"] == len(symbols) - stopped["delivered"]
    standby.signal(signal.SIGTERM)
    assert await standby.wait(30) == 0, standby

    landed = keys(aws.records())
    assert set(landed) == {(s, stopped["minute"], "quote") for s in symbols}  # every slot
    assert set(landed.values()) == {1}  # none twice
    assert asked_twice(sim, symbols[0], checks=0) == {}  # no symbol asked twice in the minute
    assert open_slots(spool) == set()


CRASHING_DRAINER = """
import sys
from finnstream import drain
async def crash(self, stop):
    raise RuntimeError("injected: the spool drainer crashed")
drain.SpoolDrainer.run = crash
from finnstream.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("sigterm", 0),
        ("sigkill", -signal.SIGKILL),
        ("run --once", 0),
        ("background task crash", 1),
        ("missing stream", 3),
        ("token rejected", 3),
        ("bad config", 2),
        ("spool unusable", 2),
    ],
)
async def test_the_lock_is_released_on_every_exit(
    case: str,
    code: int,
    make_config: ConfigFactory,
    aws: Aws,
    sim: Simulator,
    spawn: Callable[..., Any],
    tmp_path: Path,
) -> None:
    spool = tmp_path / "spool"
    path = make_config(["AAPL", "MSFT"])
    env: dict[str, str] = {}
    python = ""
    if case == "missing stream":
        path = make_config(["AAPL", "MSFT"], kinesis={"stream_name": "no-such-stream"})
    elif case == "token rejected":  # refused after the lock was taken
        sim.settings.tokens = frozenset({"another-token"})
    elif case == "bad config":
        env["FINNSTREAM_FINNHUB__REQUESTS_PER_SECOND"] = "0"
    elif case == "spool unusable":  # found after the lock was taken
        spool.mkdir()
        (spool / "spool").write_text("a file where the spool's directory belongs")
    elif case == "background task crash":
        python = CRASHING_DRAINER
    args = ("run", "--once") if case == "run --once" else ("run",)
    if case == "run --once":
        await early_in_a_minute(50)
    proc = await spawn(*args, "--config", str(path), python=python, **env)
    if case in ("sigterm", "sigkill"):
        await proc.event("app.ready", 30)
        proc.signal(signal.SIGTERM if case == "sigterm" else signal.SIGKILL)
    assert await proc.wait(40) == code, proc
    assert lock_is_free(spool)
    if case == "background task crash":
        assert proc.named("app.task_crashed")[0]["task"] == "spool-drainer"
    if case in ("token rejected", "spool unusable"):
        assert proc.named("lock.released")  # it had the lock, and gave it back
    if code in (2, 3):
        one_line_without_traceback(proc.stderr)

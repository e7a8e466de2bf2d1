"""A real daemon through the faults of issue 8, on the real clock (about 19 minutes):

    sudo .venv/bin/python bench/chaos.py                # 2,000 symbols
    .venv/bin/python bench/chaos.py --symbols 500       # smaller; the spool may not fill

The deterministic simulation (tests/test_simulation.py) proves the slot invariant on a virtual
clock with in-process fakes. This run checks the same invariant with nothing virtual: real
`finnstream run` processes, the real scheduler and clock, the simulator over HTTP, moto over HTTP
behind a TCP proxy that refuses connections (a Kinesis outage), and the spool directory on a
small tmpfs that is filled up (a full disk; needs root to mount, else that phase is skipped).

Minutes are counted from M0, the minute the first process starts in:

    M0       start (P1)                     M9+30  SIGKILL P1 (with the disk still full)
    M2+20    SIGSTOP P1 (a pause)           M9+40  disk freed, Kinesis back
    M4+30    SIGCONT P1                     M10+50 start P2 (a late catch-up)
    M5+05    Kinesis refuses connections    M12+05 SIGTERM P2 mid-cycle, start P3 (a deploy)
             (the 1 MiB spool fills, then   M17+30 SIGTERM P3
             slots are shed to the ledger)
    M8+10    disk full (spool and ledger)

At the end, every (symbol, minute) from P1's first cycle to P3's last one must be a record in
the stream (`quote`, `candle` or `gap`), in the spool, or an open slot in the ledger. It also
checks that each quote is what the simulator served in that minute, each candle is the
simulator's bar, the SIGTERMs exit 0 within the 30 s stop grace, and no 429 came back. Prints
figures and exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from bench import REGION, SECRET_ID, TOKEN, Moto, child_env, workdir  # bench/bench.py
from finnstream.logs import configure_logging
from finnstream.simulator import Simulator, SimulatorSettings, candle_for
from finnstream.spool import Spool

sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from tests.conftest import Aws, open_slots  # the tests' helpers, from the repository root
from tests.faults import RefusingProxy

MINUTE = 60
SPOOL_BYTES = 1 << 20  # the smallest spool the config allows: it fills within minutes
DISK_BYTES = 64 << 20
PER_SECOND = 150  # 2,000 quotes in about 13 s, and room for candles in the rest of the minute
STOP_GRACE_S = 30.0


def write_config(
    path: Path, symbols: list[str], sim_url: str, stream: str, kinesis_url: str
) -> Path:
    doc = {  # JSON is YAML
        "symbols": symbols,
        "finnhub": {
            "base_url": sim_url,
            "token_secret_id": SECRET_ID,
            "requests_per_second": PER_SECOND,
            "requests_per_minute": PER_SECOND * MINUTE,
        },
        "kinesis": {"stream_name": stream, "region": REGION, "endpoint_url": kinesis_url},
        "spool": {"dir": str(path / "spool"), "max_bytes": SPOOL_BYTES},
        "backfill": {"every_minutes": 1},
        "health": {"port": 0},
        "log": {"level": "INFO", "format": "json"},
    }
    config = path / "finnstream.yaml"
    config.write_text(json.dumps(doc))
    return config


@contextlib.contextmanager
def small_disk(directory: Path) -> Iterator[bool]:
    """`directory` on its own tmpfs of DISK_BYTES, when this process may mount one."""
    directory.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(directory)],
        capture_output=True,
        check=False,
    )
    try:
        yield mounted.returncode == 0
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", "-l", str(directory)], check=False)


def fill(directory: Path) -> int:
    """Fill the file system under `directory`; returns the bytes written."""
    written = 0
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (1 << 20, 4096):  # then the last partial megabyte
            with contextlib.suppress(OSError):
                while True:
                    written += os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return written


class Daemon:
    """`finnstream run` with its JSON log in a file."""

    started: ClassVar[list[Daemon]] = []  # killed on the way out, whatever happened

    def __init__(self, name: str, config: Path, env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.log = logs / f"{name}.log"
        with self.log.open("wb") as out, (logs / f"{name}.err").open("wb") as err:
            argv = [sys.executable, "-m", "finnstream", "run", "--config", str(config)]
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=err)
        Daemon.started.append(self)
        self.err = logs / f"{name}.err"

    def send(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def stop(self, sig: signal.Signals) -> tuple[int, float]:
        """(exit code, seconds from the signal to the exit)."""
        sent = time.monotonic()
        self.send(sig)
        code = await asyncio.to_thread(self.proc.wait, 60)
        return code, time.monotonic() - sent

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out


async def until(minute0: int, minutes: int, second: float) -> None:
    await asyncio.sleep(max(0.0, minute0 + minutes * MINUTE + second - time.time()))


def say(text: str) -> None:
    print(f"{dt.datetime.now(dt.UTC):%H:%M:%S} {text}", flush=True)


def left_in_spool(spool_dir: Path) -> set[tuple[str, int]]:
    spool = Spool(spool_dir, SPOOL_BYTES)
    return {(r.symbol, r.minute) for batch in spool.batches() for r in batch.records}


async def run(args: argparse.Namespace, path: Path) -> int:
    symbols = [f"C{i:04d}" for i in range(args.symbols)]
    moto = Moto.start()
    aws = Aws(moto.url)  # the tests' reader of the stream, which checks the wire format too
    aws.create_stream()
    settings = SimulatorSettings(tokens=frozenset({TOKEN}), requests_per_second=PER_SECOND + 50)
    spool_dir = path / "spool"
    failures: list[str] = []
    stops: list[tuple[str, int, float]] = []
    async with (
        Simulator(settings) as sim,
        RefusingProxy("127.0.0.1", int(moto.url.rsplit(":", 1)[1])) as proxy,
    ):
        config = write_config(path, symbols, sim.url, aws.stream, proxy.url)
        env = child_env(moto)
        with small_disk(spool_dir) as on_tmpfs:
            if not on_tmpfs:
                say("cannot mount a tmpfs (not root?): the full-disk phase is skipped")
            now = time.time()
            if now % MINUTE > 5:
                await asyncio.sleep(MINUTE - now % MINUTE + 1)
            m0 = int(time.time()) // MINUTE * MINUTE
            p1 = Daemon("p1", config, env, path)
            say(f"M0 started P1 (pid {p1.proc.pid}), {len(symbols)} symbols")
            await until(m0, 2, 20)
            p1.send(signal.SIGSTOP)
            say("SIGSTOP P1")
            await until(m0, 4, 30)
            p1.send(signal.SIGCONT)
            say("SIGCONT P1")
            await until(m0, 5, 5)
            proxy.refuse(True)
            say("Kinesis refuses connections")
            filler = 0
            if on_tmpfs:
                await until(m0, 8, 10)
                filler = await asyncio.to_thread(fill, spool_dir)
                say(f"disk full ({filler / 2**20:.1f} MiB of filler)")
            await until(m0, 9, 30)
            code, _ = await p1.stop(signal.SIGKILL)
            stops.append(("P1 SIGKILL", code, 0.0))
            say(f"SIGKILL P1: exit {code}")
            await until(m0, 9, 40)
            if filler:
                (spool_dir / "filler").unlink()
            proxy.refuse(False)
            say("disk freed, Kinesis back")
            await until(m0, 10, 50)
            p2 = Daemon("p2", config, env, path)
            say(f"started P2 (pid {p2.proc.pid})")
            await until(m0, 12, 5)
            code, took = await p2.stop(signal.SIGTERM)
            stops.append(("P2 SIGTERM mid-cycle", code, took))
            p3 = Daemon("p3", config, env, path)
            say(f"SIGTERM P2: exit {code} in {took:.2f} s; started P3 (pid {p3.proc.pid})")
            await until(m0, 17, 30)
            code, took = await p3.stop(signal.SIGTERM)
            stops.append(("P3 SIGTERM", code, took))
            say(f"SIGTERM P3: exit {code} in {took:.2f} s")
            spooled, ledgered = left_in_spool(spool_dir), open_slots(spool_dir)
        served = {(s, m, body["c"]) for s, m, body in sim.stats.served}
        rate_limited = sim.stats.rate_limited
        candle_requests = sim.stats.candle_requests
    records = await asyncio.to_thread(aws.records)
    moto.stop()

    daemons = (p1, p2, p3)
    events = [e for d in daemons for e in d.events()]
    cycles = [e["minute"] for e in events if e["event"] == "cycle.done"]
    first, last = min(cycles), max(cycles)
    expected = {(s, m) for s in symbols for m in range(first, last + MINUTE, MINUTE)}
    landed = Counter((r["symbol"], r["minute"], r["source"]) for r in records)
    in_stream = {(s, m) for s, m, _ in landed}
    by_source = Counter(source for _, _, source in landed)
    missing = expected - in_stream - spooled - ledgered
    extra = in_stream - expected

    for name, code, took in stops:
        if name.endswith("SIGKILL"):
            continue
        if code != 0 or took >= STOP_GRACE_S:
            failures.append(f"{name}: exit {code} after {took:.2f} s")
    if missing:
        failures.append(f"{len(missing)} slots lost, e.g. {sorted(missing)[:5]}")
    if extra:
        failures.append(f"{len(extra)} records outside the run's minutes, e.g. {sorted(extra)[:5]}")
    wrong_quotes = [
        r
        for r in records
        if r["source"] == "quote" and (r["symbol"], r["minute"], r["price"]) not in served
    ]
    if wrong_quotes:
        failures.append(
            f"{len(wrong_quotes)} quotes not served in their minute: {wrong_quotes[:2]}"
        )
    wrong_candles = [
        r
        for r in records
        if r["source"] == "candle" and r["price"] != candle_for(r["symbol"], r["minute"])["c"]
    ]
    if wrong_candles:
        failures.append(f"{len(wrong_candles)} candles unlike the simulator's bars")
    if rate_limited:
        failures.append(f"{rate_limited} answers were 429")
    for d in daemons:
        err = d.err.read_text()
        if "Traceback" in err or TOKEN in err or TOKEN in d.log.read_text():
            failures.append(f"{d.name}: a traceback or the token in its output")

    notable = Counter(
        e["event"]
        for e in events
        if e["event"]
        in {
            "cycle.skipped",
            "ledger.downtime",
            "spool.full",
            "spool.write_failed",
            "slots.not_durable",
            "slots.durable_again",
            "slots.released_to_window",
            "cycle.send_abandoned",
            "lock.taken_over",
            "backfill.start",
        }
        or e.get("level") == "error"
    )
    gap_reasons = Counter(r.get("reason") for r in records if r["source"] == "gap")
    print()
    print(
        f"minutes {dt.datetime.fromtimestamp(first, dt.UTC):%H:%M} to "
        f"{dt.datetime.fromtimestamp(last, dt.UTC):%H:%M} UTC: {len(expected):,} expected slots"
    )
    print(
        f"in the stream: {len(in_stream & expected):,} slots, {len(records):,} records "
        f"({', '.join(f'{k} {v:,}' for k, v in sorted(by_source.items()))}); "
        f"{sum(n - 1 for n in landed.values()):,} duplicates (at-least-once)"
    )
    print(f"gap reasons: {dict(gap_reasons)}")
    print(
        f"left in the spool: {len(spooled & expected):,}; open in the ledger: "
        f"{len(ledgered & expected):,}; lost: {len(missing):,}"
    )
    print(
        f"quotes served {len(served):,}, candle requests {candle_requests:,}, 429s {rate_limited}"
    )
    print(
        "stops: "
        + "; ".join(f"{n}: exit {c}" + (f" in {t:.2f} s" if t else "") for n, c, t in stops)
    )
    print("events: " + ", ".join(f"{k} {v}" for k, v in sorted(notable.items())))
    for failure in failures:
        print(f"FAILED: {failure}")
    print("every slot accounted for" if not failures else f"{len(failures)} checks failed")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--symbols", type=int, default=2000)
    parser.add_argument("--keep", action="store_true", help="keep the logs and spool directory")
    args = parser.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID="chaos", AWS_SECRET_ACCESS_KEY="chaos")
    configure_logging("WARNING", "console")  # this process's own (reading the ledger): quiet
    with workdir() as path:
        try:
            code = asyncio.run(run(args, path))
        finally:
            for daemon in Daemon.started:
                if daemon.proc.poll() is None:
                    daemon.proc.kill()
        if args.keep:
            kept = Path(f"/tmp/finnstream-chaos-{int(time.time())}")
            subprocess.run(["cp", "-r", str(path), str(kept)], check=False)
            print(f"logs kept in {kept}")
        return code


if __name__ == "__main__":
    sys.exit(main())

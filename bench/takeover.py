"""How fast a standby takes over (issue 9): two `finnstream run` processes on one spool.dir.

    .venv/bin/python bench/takeover.py             # 5 runs of each scenario (~2 min)
    .venv/bin/python bench/takeover.py --runs 10

Each run starts an active daemon, lets its first (catch-up) cycle finish, starts a second daemon
on the same local spool directory (it logs `lock.standby`), then signals the active one:

- `sigterm idle` / `sigkill idle`: between cycles (a deploy's SIGTERM; a crash or OOM kill);
- `sigterm mid-cycle` / `sigkill mid-cycle`: 1 s into a cycle of 20 quotes paced at 5/s, so
  the stopped process first settles what it fetched, and a killed one leaves its minute to the
  standby's catch-up cycle.

Measured from the moment the signal is sent:

- lock: to the standby's `lock.taken_over` (the timestamp its own log line carries);
- ready: to its `app.ready` (spool and ledger open, token checked: from here it polls);
- first request: to the first request of the standby reaching the simulator (its token check),
  counted from the first request after its `lock.taken_over`;
- catch-up: for `sigkill mid-cycle`, to the first quote of the catch-up cycle for that minute.

It also counts the slots of the signalled minute that neither process asked for: a process
stopped mid-cycle ledgers the quotes it had not requested yet and settles the minute, and the
standby's catch-up cycle asks for just those (the count should be 0).

The simulator runs in this process and moto in a spawned one (bench/bench.py's), so the clocks
compare directly (CLOCK_MONOTONIC and the wall clock are system-wide). Prints figures; asserts
nothing about them.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench import REGION, SECRET_ID, TOKEN, Child, Moto, child_env, workdir  # bench/bench.py
from finnstream.cycle import STOPPED_REASON
from finnstream.ledger import GapLedger
from finnstream.lock import POLL_S
from finnstream.logs import configure_logging
from finnstream.simulator import Simulator, SimulatorSettings

SYMBOLS = [f"T{i:02d}" for i in range(20)]
MID_CYCLE_PER_S = 5  # a cycle of 20 quotes takes about 4 s
SCENARIOS = ("sigterm idle", "sigkill idle", "sigterm mid-cycle", "sigkill mid-cycle")
FIGURES = ("lock", "ready", "first request", "catch-up")


def write_config(path: Path, sim_url: str, stream: str, per_second: int) -> Path:
    doc = {  # JSON is YAML
        "symbols": SYMBOLS,
        "finnhub": {
            "base_url": sim_url,
            "token_secret_id": SECRET_ID,
            "requests_per_second": per_second,
            "requests_per_minute": 100_000,
        },
        "kinesis": {"stream_name": stream, "region": REGION},
        "spool": {"dir": str(path / "spool")},
        "health": {"port": 0},
        "log": {"level": "INFO", "format": "json"},
    }
    config = path / "finnstream.yaml"
    config.write_text(json.dumps(doc))
    return config


def wall(event: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(event["timestamp"]).timestamp()


async def room_in_the_minute(needed_s: float) -> None:
    """Keep a run away from a minute boundary (a tick would add a cycle to the measurement)."""
    second = time.time() % 60
    if second < 2 or second > 60 - needed_s:
        await asyncio.sleep((62 - second) % 60)


async def arrival_after(sim: Simulator, mono: float, nth: int = 1, within_s: float = 30) -> float:
    async with asyncio.timeout(within_s):
        while True:
            later = [a for a in sim.stats.arrivals if a > mono]
            if len(later) >= nth:
                return sorted(later)[nth - 1]
            await asyncio.sleep(0.005)


async def one_run(scenario: str, sim: Simulator, moto: Moto, n: int) -> dict[str, float]:
    mid_cycle = scenario.endswith("mid-cycle")
    with workdir() as path:
        stream = f"takeover-{os.getpid()}-{n}"
        await asyncio.to_thread(moto.create_stream, stream)
        config = write_config(path, sim.url, stream, MID_CYCLE_PER_S if mid_cycle else 1000)
        argv = [sys.executable, "-m", "finnstream", "run", "--config", str(config)]
        env = child_env(moto)
        await room_in_the_minute(20)
        active = Child(argv, env)
        standby: Child | None = None
        try:
            if mid_cycle:
                await active.next("app.ready")
            else:
                await active.next("cycle.done")  # the catch-up cycle for the minute under way
            standby = Child(argv, env)
            await standby.next("lock.standby")
            # The standby tries the lock every POLL_S from its `lock.standby` on: a random delay
            # samples where in that period the lock comes free (mid-cycle: the standby took
            # about 1.5 s to start, so the active process's 4 s cycle is still going).
            await asyncio.sleep((0.2 if mid_cycle else 0.5) + random.uniform(0, POLL_S))
            sig = signal.SIGKILL if scenario.startswith("sigkill") else signal.SIGTERM
            sent_wall, sent_mono = time.time(), time.monotonic()
            active.proc.send_signal(sig)
            taken = await standby.next("lock.taken_over", within_s=60)
            ready = await standby.next("app.ready", within_s=60)
            # Requests after the takeover are the standby's (a stopped process lets go of the
            # lock only once its cycle is settled; a request it sent before may arrive later).
            taken_mono = sent_mono + wall(taken) - sent_wall
            first = await arrival_after(sim, taken_mono)
            out = {
                "lock": wall(taken) - sent_wall,
                "ready": wall(ready) - sent_wall,
                "first request": first - sent_mono,
            }
            if scenario == "sigkill mid-cycle":
                out["catch-up"] = await arrival_after(sim, taken_mono, 2) - sent_mono
            if scenario.endswith("mid-cycle"):
                await standby.next("cycle.done", within_s=60)  # stopped only once it is done
            code, *_ = await active.wait()
            standby.proc.send_signal(signal.SIGTERM)
            await standby.wait()
            with GapLedger(path / "spool") as ledger:  # both processes are gone
                stopped = [g for g in ledger.open_gaps() if g.reason == STOPPED_REASON]
            out["not asked"] = float(len(stopped))
            expected = 0 if sig == signal.SIGTERM else -signal.SIGKILL
            if code != expected:
                raise RuntimeError(f"{scenario}: the active process exited {code}")
            return out
        finally:
            active.kill()
            if standby is not None:
                standby.kill()


async def main(args: argparse.Namespace) -> int:
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
    configure_logging("WARNING", "console")  # this process's own (reading the ledger): quiet
    print(f"finnstream takeover bench: {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
          f"{args.runs} runs per scenario, spool on local disk")  # fmt: skip
    moto = await asyncio.to_thread(Moto.start)
    results: dict[str, list[dict[str, float]]] = {s: [] for s in SCENARIOS}
    try:
        async with Simulator(SimulatorSettings(tokens=frozenset({TOKEN}))) as sim:
            n = 0
            for _ in range(args.runs):
                for scenario in SCENARIOS:
                    n += 1
                    run = await one_run(scenario, sim, moto, n)
                    results[scenario].append(run)
                    shown = ", ".join(
                        f"{k} {v * 1000:.0f} ms" for k, v in run.items() if k in FIGURES
                    )
                    print(f"  {scenario}: {shown}, not asked {run['not asked']:.0f}", flush=True)
    finally:
        await asyncio.to_thread(moto.stop)
    print("\nms from the signal, median / worst of", args.runs, "runs")
    print("| scenario | " + " | ".join(FIGURES) + " |")
    print("|---" * (len(FIGURES) + 1) + "|")
    for scenario, runs in results.items():
        cells = []
        for figure in FIGURES:
            values = [r[figure] * 1000 for r in runs if figure in r]
            cells.append(f"{statistics.median(values):.0f} / {max(values):.0f}" if values else "-")
        print(f"| {scenario} | " + " | ".join(cells) + " |")
    print(f"\nslots of the signalled minute that no process asked for (left to the gap ledger "
          f"as '{STOPPED_REASON}'), of {len(SYMBOLS)}, median / worst:")  # fmt: skip
    for scenario, runs in results.items():
        left = [r["not asked"] for r in runs]
        print(f"  {scenario}: {statistics.median(left):.0f} / {max(left):.0f}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per scenario")
    sys.exit(asyncio.run(main(parser.parse_args())))

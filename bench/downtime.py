"""The long-downtime scenario (issue 8): `finnstream run` starting three days after it last ran.

    .venv/bin/python bench/bench.py --downtime                          # three runs, ~11 min
    .venv/bin/python bench/bench.py --downtime --modes gaps --seconds 60

Each run prepares a spool directory whose gap ledger says the last minute accounted for was
three days ago (`GapLedger(dir).commit(LedgerWrite(watermark=...))`), writes a config of 1,800
symbols and starts the real daemon, `python -m finnstream run`, in its own process, against the
simulator (in this process) and moto (Kinesis and Secrets Manager, in a spawned process) on
loopback. On start-up the daemon puts the 4,319 missed minutes of each symbol in one window row
per symbol (7.8 million slots), runs the catch-up cycle and begins working the backlog off.

Three ways, one run each:

- candles: backfill on; the simulator answers /stock/candle, so slots become `candle` records;
- gaps: `backfill.enabled: false`; slots become `gap` records, built and published page by page;
- free: the simulator refuses candles (403, Finnhub's free plan, `finnstream simulate --free`);
  backfill turns itself off on the first refusal, then as `gaps`.

While each run lasts, a thread samples the daemon's VmRSS and VmHWM from /proc every 50 ms;
every few seconds its `/metrics` are read (the event-loop lag gauge, open gaps, candles and gap
records published) with the ledger file's size; its JSON log lines give the times of start-up
(`app.ready`), the downtime windows, every cycle and every backfill pass. Start-up is exec to
the end of the first (catch-up) cycle; the run is exec to SIGTERM. moto keeps only the last
record of each shard, so its memory stays flat through millions of puts (it is another process
anyway: none of it is finnstream's).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import re
import signal
import socket
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from bench import (
    HERE,
    TOKEN,
    Child,
    Moto,
    Scenario,
    child_env,
    own_cpu,
    proc_cpu,
    proc_status,
    workdir,
)
from bench import write_config as write_base_config
from finnstream.clock import minute_slot
from finnstream.ledger import FILENAME, GapLedger, LedgerWrite
from finnstream.simulator import Simulator, SimulatorSettings

DOWNTIME_S = 3 * 24 * 3600  # the ledger's watermark is this far back (MAX_LOOKBACK_S)
SYMBOLS = 1800
# 1,000 requests/s (Finnhub caps every plan at 30/s): 1,800 quotes take 1.8 s of each minute and
# candle requests are never the bound, so the backlog is worked off as fast as finnstream's own
# work allows (pages built, published, settled), the most pressure memory and the loop can get.
# The simulator enforces the same limit, so a 429 would show.
PER_SECOND = 1000
LATENCY_S = 0.020  # per answer, as in s1
SAMPLE_S = 0.05  # RSS sampling
METRICS_EVERY_S = 5.0
STALLS_SHOWN = 5  # `--stalls`: the longest ones, with their innermost frames
STALL_FRAMES = 6
STOP_WITHIN_S = 60.0  # after SIGTERM; then the process is killed
LOGGED = {
    "app.ready", "ledger.downtime", "cycle.done", "cycle.skipped", "backfill.start",
    "backfill.done", "backfill.disabled", "backfill.ledger_failed", "app.task_crashed",
}  # fmt: skip
METRICS = {
    "lag": "finnstream_event_loop_max_lag_seconds",
    "open": "finnstream_gaps_open",
    "candles": "finnstream_backfill_candles_total",
    "gaps": "finnstream_gaps_published_total",
}


@dataclass(frozen=True)
class Mode:
    name: str
    backfill: bool  # backfill.enabled in the config
    premium: bool  # the simulator answers /stock/candle (False: 403)
    what: str


MODES = {
    "candles": Mode("candles", True, True, "backfill on, candles answered"),
    "gaps": Mode("gaps", False, True, "backfill.enabled: false, gap records"),
    "free": Mode("free", True, False, "candles refused (403), then gap records"),
}


@dataclass
class Run:
    mode: Mode
    started_wall: float = 0.0
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (t, VmRSS, VmHWM) kB
    metrics: list[dict[str, float]] = field(default_factory=list)  # t, the gauges, ledger bytes
    events: list[tuple[float, dict[str, Any]]] = field(default_factory=list)  # (t, log line)
    ledger_bytes_before: int = 0
    exit_code: int | None = None
    cpu_s: float = 0.0  # finnstream's, up to SIGTERM
    moto_cpu_s: float = 0.0
    bench_cpu_s: float = 0.0  # this process: the simulator, sampling, metrics
    moto_rss_kb: int = 0
    rate_limited: int = 0
    candle_requests: int = 0
    stalls: list[tuple[float, float, str]] = field(default_factory=list)  # `--stalls`: ms, t, stack

    def first(self, name: str) -> tuple[float, dict[str, Any]] | None:
        return next(((t, e) for t, e in self.events if e.get("event") == name), None)

    def all(self, name: str) -> list[dict[str, Any]]:
        return [e for _, e in self.events if e.get("event") == name]

    def hwm_mb_until(self, t: float) -> float:
        before = [hwm for at, _, hwm in self.samples if at <= t]
        return max(before, default=0) / 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def prepare_spool(spool: Path, now: float) -> int:
    """A ledger whose watermark is three days back; returns the file's size in bytes."""
    with GapLedger(spool) as ledger:
        ledger.commit(LedgerWrite(watermark=minute_slot(now) - DOWNTIME_S))
    return (spool / FILENAME).stat().st_size


def write_config(tmp: Path, mode: Mode, sim_url: str, stream: str, port: int) -> Path:
    sc = Scenario(f"downtime-{mode.name}", SYMBOLS, LATENCY_S, PER_SECOND, 60, 0)
    path = write_base_config(tmp, sc, sim_url, stream)
    doc = json.loads(path.read_text())
    doc["health"] = {"host": "127.0.0.1", "port": port}
    doc["backfill"] = {"enabled": mode.backfill}
    path.write_text(json.dumps(doc))
    return path


def read_metrics(port: int) -> dict[str, float]:
    """The gauges and counters named in METRICS, from the daemon's `/metrics`."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    wanted = {name: key for key, name in METRICS.items()}
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            out[wanted[name]] = float(value)
    return out


def sample_rss(run: Run, pid: int, done: threading.Event) -> None:
    while not done.is_set():
        with contextlib.suppress(OSError, KeyError):
            stat = proc_status(pid)
            run.samples.append((time.time() - run.started_wall, stat["VmRSS"], stat["VmHWM"]))
        done.wait(SAMPLE_S)


async def collect_logs(run: Run, child: Child) -> None:
    """The daemon's log lines named in LOGGED, timed by their own timestamps."""
    while (event := await child.events.get()) is not None:
        if event.get("event") in LOGGED:
            wall = dt.datetime.fromisoformat(event["timestamp"]).timestamp()
            run.events.append((wall - run.started_wall, event))


async def poll_metrics(run: Run, port: int, ledger: Path, until_wall: float) -> None:
    while time.time() < until_wall:
        await asyncio.sleep(min(METRICS_EVERY_S, max(0.0, until_wall - time.time())))
        try:
            row = await asyncio.to_thread(read_metrics, port)
        except OSError:
            continue  # not serving yet
        row["t"] = time.time() - run.started_wall
        row["ledger_bytes"] = files_bytes(ledger)
        run.metrics.append(row)


def files_bytes(ledger: Path) -> int:
    """The ledger file and its journal, if one exists right now."""
    total = 0
    for path in ledger.parent.glob(f"{ledger.name}*"):
        with contextlib.suppress(OSError):  # the journal comes and goes
            total += path.stat().st_size
    return total


async def run_mode(mode: Mode, moto: Moto, seconds: float, stall_ms: float | None) -> Run:
    run = Run(mode)
    stream = f"bench-downtime-{mode.name}-{int(time.time())}"
    await asyncio.to_thread(moto.create_stream, stream)
    settings = SimulatorSettings(
        tokens=frozenset({TOKEN}),
        latency_s=LATENCY_S,
        requests_per_second=PER_SECOND,
        premium=mode.premium,
    )
    with workdir() as tmp:
        async with Simulator(settings) as sim:
            port = free_port()
            config = write_config(tmp, mode, sim.url, stream, port)
            run.ledger_bytes_before = prepare_spool(tmp / "spool", time.time())
            env = child_env(moto)
            argv = [sys.executable, "-m", "finnstream", "run", "--config", str(config)]
            if stall_ms is not None:  # where the loop stalls, from stacks (bench/stallwatch.py)
                argv[1:3] = [str(HERE / "stallwatch.py")]
                env["BENCH_STALL_MS"] = str(stall_ms)
            run.started_wall = time.time()
            cpu = (own_cpu(), proc_cpu(moto.process.pid))
            child = Child(argv, env)
            done = threading.Event()
            threading.Thread(target=sample_rss, args=(run, child.pid, done), daemon=True).start()
            logs = asyncio.create_task(collect_logs(run, child))
            try:
                ledger = tmp / "spool" / FILENAME
                await poll_metrics(run, port, ledger, run.started_wall + seconds)
                run.cpu_s = proc_cpu(child.pid)
                run.bench_cpu_s = own_cpu() - cpu[0]
                run.moto_cpu_s = proc_cpu(moto.process.pid) - cpu[1]
                child.proc.send_signal(signal.SIGTERM)
                deadline = asyncio.get_running_loop().call_later(STOP_WITHIN_S, child.kill)
                run.exit_code, *_ = await child.wait()
                deadline.cancel()
            finally:
                done.set()
                child.kill()
                await logs
            child.stderr.seek(0)
            run.stalls = stall_stacks(child.stderr.read(), run.started_wall)
            with contextlib.suppress(OSError, KeyError):
                run.moto_rss_kb = proc_status(moto.process.pid)["VmRSS"]
            run.rate_limited = sim.stats.rate_limited
            run.candle_requests = sim.stats.candle_requests
    return run


# -- figures ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    ready_s: float
    first_cycle_s: float
    startup_peak_mb: float
    run_peak_mb: float
    end_rss_mb: float
    max_lag_ms: float
    slots_per_min: float
    worked: int
    open_first: float
    open_last: float
    ledger_kb: tuple[float, float, float]  # prepared, largest seen, last
    cycles: int
    skipped: int
    worst_cycle_s: float
    passes: int


def figures(run: Run) -> Figures:
    ready = run.first("app.ready")
    first_cycle = run.first("cycle.done")
    started = run.first("backfill.start")
    last = run.metrics[-1] if run.metrics else {}
    worked = int(last.get("candles", 0) + last.get("gaps", 0))
    span = last.get("t", 0.0) - (started[0] if started else 0.0)
    cycles = run.all("cycle.done")
    sizes = [m["ledger_bytes"] for m in run.metrics] or [0.0]
    return Figures(
        ready_s=ready[0] if ready else float("nan"),
        first_cycle_s=first_cycle[0] if first_cycle else float("nan"),
        startup_peak_mb=run.hwm_mb_until(first_cycle[0]) if first_cycle else float("nan"),
        run_peak_mb=max((hwm for _, _, hwm in run.samples), default=0) / 1024,
        end_rss_mb=run.samples[-1][1] / 1024 if run.samples else float("nan"),
        max_lag_ms=last.get("lag", float("nan")) * 1000,
        slots_per_min=worked / span * 60 if started and span > 0 else 0.0,
        worked=worked,
        open_first=run.metrics[0].get("open", float("nan")) if run.metrics else float("nan"),
        open_last=last.get("open", float("nan")),
        ledger_kb=(run.ledger_bytes_before / 1024, max(sizes) / 1024, sizes[-1] / 1024),
        cycles=len(cycles),
        skipped=len(run.all("cycle.skipped")),
        worst_cycle_s=max((float(c["took_s"]) for c in cycles), default=float("nan")),
        passes=len(run.all("backfill.done")),
    )


def report(runs: list[Run], seconds: float) -> None:
    print(f"\ndowntime: {SYMBOLS} symbols, last accounted {DOWNTIME_S // 3600} h back, "
          f"{PER_SECOND}/s, {seconds:.0f} s per run; load after {load()}")  # fmt: skip
    print("| run | start-up peak RSS MB | run peak RSS MB | longest loop stall ms | first cycle s "
          "| slots worked off / min | gaps open, first read -> last | ledger KB prepared / "
          "max / last | cycles (skipped, worst s) | 429s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        f = figures(run)
        print(
            f"| {run.mode.name} | {f.startup_peak_mb:.0f} | {f.run_peak_mb:.0f} | "
            f"{f.max_lag_ms:.0f} | {f.first_cycle_s:.1f} | {f.slots_per_min:,.0f} | "
            f"{f.open_first:,.0f} -> {f.open_last:,.0f} | "
            f"{f.ledger_kb[0]:.0f} / {f.ledger_kb[1]:.0f} / {f.ledger_kb[2]:.0f} | "
            f"{f.cycles} ({f.skipped}, {f.worst_cycle_s:.1f}) | {run.rate_limited} |"
        )
    print()
    for run in runs:
        notes(run)
    print()
    for run in runs:
        timeline(run)


def notes(run: Run) -> None:
    f, name = figures(run), run.mode.name
    downtime = run.first("ledger.downtime")
    slots = downtime[1].get("slots", 0) if downtime else 0
    print(
        f"{name}: {run.mode.what}; ready {f.ready_s:.2f} s after exec; downtime windows "
        f"{slots:,} slots; first cycle done {f.first_cycle_s:.2f} s; RSS at the end "
        f"{f.end_rss_mb:.0f} MB; exit {run.exit_code}"
    )
    started, first_pass = run.first("backfill.start"), run.first("backfill.done")
    if started and first_pass:
        done = first_pass[1]
        print(
            f"{name}: first pass {started[0]:.1f} -> {first_pass[0]:.1f} s: {done['pages']} "
            f"pages, {done['candles']:,} candles, {done['gaps']:,} gap records; {f.passes} passes "
            f"in all, {f.worked:,} slots published, {run.candle_requests} candle requests"
        )
    if disabled := run.first("backfill.disabled"):
        print(f"{name}: backfill turned itself off at {disabled[0]:.1f} s (403)")
    print(
        f"{name}: CPU s: finnstream {run.cpu_s:.0f}, moto {run.moto_cpu_s:.0f}, simulator and "
        f"bench {run.bench_cpu_s:.0f}; moto's RSS {run.moto_rss_kb / 1024:.0f} MB (its own process)"
    )
    for ms, t, stack in sorted(run.stalls, reverse=True)[:STALLS_SHOWN]:
        print(f"{name}: at {t:.1f} s the loop stalled {ms:.0f} ms (or more) in:\n{stack}")
    for problem in ("backfill.ledger_failed", "app.task_crashed"):
        for event in run.all(problem):
            print(f"{name}: {problem}: {event}")


def timeline(run: Run) -> None:
    print(f"{run.mode.name}, over time:\n| t s | VmRSS MB | loop stall ms | gaps open | "
          "candles | gap records | ledger KB |\n|---|---|---|---|---|---|---|")  # fmt: skip
    step = max(1, len(run.metrics) // 8)
    rows = run.metrics[::step]
    for row in rows + [r for r in run.metrics[-1:] if r is not rows[-1]]:
        rss = next((r for t, r, _ in reversed(run.samples) if t <= row["t"]), 0)
        print(
            f"| {row['t']:.0f} | {rss / 1024:.0f} | {row.get('lag', 0) * 1000:.0f} | "
            f"{row.get('open', 0):,.0f} | {row.get('candles', 0):,.0f} | "
            f"{row.get('gaps', 0):,.0f} | {row['ledger_bytes'] / 1024:.0f} |"
        )
    print()


def stall_stacks(stderr: str, started_wall: float) -> list[tuple[float, float, str]]:
    """bench/stallwatch.py's `stall.stack` blocks: (ms, s after exec, the innermost frames)."""
    out = []
    pattern = r"stall\.stack ([0-9]+) ms at ([0-9.]+)\n(.*?)stall\.end"
    for ms, wall, stack in re.findall(pattern, stderr, re.S):
        frames = [line for line in stack.splitlines() if line.startswith('  File "')]
        out.append((float(ms), float(wall) - started_wall, "\n".join(frames[-STALL_FRAMES:])))
    return out


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


async def main(modes: list[str], seconds: float, stall_ms: float | None = None) -> int:
    print(f"downtime bench: machine load before {load()}")
    # The bench's own ledger writes (prepare_spool) would log at INFO here.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    moto = await asyncio.to_thread(Moto.start, False)
    try:
        runs = []
        for name in modes:
            mode = MODES[name]
            print(f"running {name}: {mode.what}, {seconds:.0f} s")
            runs.append(await run_mode(mode, moto, seconds, stall_ms))
    finally:
        await asyncio.to_thread(moto.stop)
    report(runs, seconds)
    return 0

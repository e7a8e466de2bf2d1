"""finnstream's benchmark: the real pipeline against the Finnhub simulator and moto, on loopback.

    .venv/bin/python bench/bench.py                  # every scenario, then the naive baseline
    .venv/bin/python bench/bench.py --quick          # fewer ticks: a smoke test (~1 min)
    .venv/bin/python bench/bench.py --scenario s3    # one scenario
    .venv/bin/python bench/bench.py --soak           # ten minutes of fast cycles: RSS and fds
    .venv/bin/python bench/bench.py --scenario s1 --profile /tmp/prof   # under py-spy, if present
    .venv/bin/python bench/bench.py --downtime       # issue 8: three days down, 1,800 symbols

finnstream runs in its own process (bench/driver.py: `App` ticked by the real `Ticker` every few
seconds), so its CPU and peak RSS come from os.wait4 and /proc, untouched by the stand-ins. The
simulator serves from this process; moto runs in a spawned process that counts PutRecords calls
and stamps the last one's monotonic time. CLOCK_MONOTONIC is system-wide, so times from all three
processes compare directly:

- lag: a tick's due second (converted by the driver to monotonic) to the first request of its
  cycle reaching the simulator; it includes APScheduler's wake-up.
- cycle: the tick's due second to the end of the last PutRecords call moto answered.
- The first tick of each scenario opens the connections; it is a warm-up and is not counted.
- `run --once`: the real CLI, once per scenario, cold: wall, CPU and peak RSS of the process.

It prints figures and never asserts timings: the exit status is 0 unless something broke.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import multiprocessing as mp
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped]

from finnstream.simulator import Simulator, SimulatorSettings

HERE = Path(__file__).resolve().parent
REGION = "us-east-1"
TOKEN = "bench-token-5e1f"
SECRET_ID = "finnstream/bench"
UNLIMITED_PER_S, UNLIMITED_PER_MIN = 100_000, 100_000
TICK_HZ = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Scenario:
    name: str
    symbols: int
    latency_s: float
    per_second: int | None  # enforced by the simulator and configured in finnstream; None: none
    every_s: int  # seconds between ticks (divides 60)
    ticks: int  # counted ticks, after one warm-up
    error_rate: float = 0.0


SCENARIOS = {
    "s1": Scenario("s1", 1000, 0.020, None, 3, 20),  # naive / finnstream >= 50x (aim 75x)
    "s2": Scenario("s2", 300, 0.020, 30, 12, 3),  # cycle <= 1.03 N/R + 1 s, zero 429s
    "s3": Scenario("s3", 5000, 0.050, None, 10, 4),  # cycle <= 5 s, peak RSS < 150 MB
}
SOAK = Scenario("soak", 300, 0.020, None, 5, 120, error_rate=0.02)  # RSS and fds stay flat


def symbols(n: int) -> list[str]:
    return [f"SYM{i:04d}" for i in range(n)]


def pct(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (with few samples, p99 is the worst one)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] if ordered else math.nan


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK_HZ


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (kB), threads and open file descriptors of a live process."""
    out = {"fds": len(os.listdir(f"/proc/{pid}/fd"))}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    return out


# -- moto, in its own process, counting PutRecords -----------------------------------------------


def _serve_moto(
    port: Any,
    calls: Synchronized[int],
    records: Synchronized[int],
    last: Synchronized[float],
    keep_records: bool,
) -> None:
    from moto.kinesis.models import Record, Shard  # noqa: PLC0415 - in the child only
    from moto.kinesis.responses import KinesisResponse  # noqa: PLC0415
    from moto.server import ThreadedMotoServer  # noqa: PLC0415

    # moto lists every key of the shard to find its last sequence number, so each put costs
    # O(records stored) and the stand-in slows down as a run goes on; this is the same, O(1).
    Shard.get_max_sequence_number = lambda self: next(reversed(self.records), 0)  # type: ignore[method-assign]
    if not keep_records:  # millions of puts: keep only each shard's last record (its sequence)
        put_record = Shard.put_record

        def forgetful(self: Shard, *args: Any) -> str:
            sequence: str = put_record(self, *args)
            while len(self.records) > 1:
                del self.records[next(iter(self.records))]
            Record.instances_tracked.clear()  # moto's BaseModel lists every instance ever made
            return sequence

        Shard.put_record = forgetful  # type: ignore[method-assign]

    original = KinesisResponse.put_records

    def counted(self: KinesisResponse) -> Any:
        answer = original(self)
        with calls.get_lock():
            calls.value += 1
            records.value += len(self._get_param("Records") or [])
            last.value = time.monotonic()
        return answer

    KinesisResponse.put_records = counted  # type: ignore[method-assign]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port.put(server.get_host_and_port()[1])
    threading.Event().wait()


@dataclass
class Moto:
    process: Any
    url: str
    calls: Synchronized[int]
    records: Synchronized[int]
    last_put: Synchronized[float]

    @classmethod
    def start(cls, keep_records: bool = True) -> Moto:
        ctx = mp.get_context("spawn")
        port = ctx.Queue()
        calls, records, last = ctx.Value("q", 0), ctx.Value("q", 0), ctx.Value("d", 0.0)
        args = (port, calls, records, last, keep_records)
        process = ctx.Process(target=_serve_moto, args=args, daemon=True)
        process.start()
        moto = cls(process, f"http://127.0.0.1:{port.get(timeout=60)}", calls, records, last)
        sm = boto3.client("secretsmanager", endpoint_url=moto.url, region_name=REGION)
        sm.create_secret(Name=SECRET_ID, SecretString=json.dumps({"token": TOKEN}))
        return moto

    def create_stream(self, name: str) -> None:
        kinesis = boto3.client("kinesis", endpoint_url=self.url, region_name=REGION)
        kinesis.create_stream(StreamName=name, ShardCount=1)

    def stop(self) -> None:
        self.process.terminate()
        self.process.join(10)


# -- the measured process -------------------------------------------------------------------------


class Child:
    """A subprocess whose JSON stdout lines arrive on a queue; `wait` reaps it with its rusage."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - lives as long as the child
        self.started, self.argv = time.monotonic(), argv
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=self.stderr)
        self.pid = self.proc.pid
        self.hwm_kb = 0
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._sample, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.loop.call_soon_threadsafe(self.events.put_nowait, json.loads(raw))
        self.loop.call_soon_threadsafe(self.events.put_nowait, None)

    def _sample(self) -> None:
        """VmHWM of the process, polled: wait4's ru_maxrss would include this process's RSS,
        which Linux carries into the child at fork and keeps across exec."""
        while self.proc.returncode is None:
            with contextlib.suppress(OSError, KeyError):
                self.hwm_kb = proc_status(self.pid)["VmHWM"]
            time.sleep(0.02)

    async def next(self, *names: str, within_s: float = 120.0) -> dict[str, Any]:
        async with asyncio.timeout(within_s):
            while (event := await self.events.get()) is not None:
                if event.get("event") in names:
                    return event
        self.stderr.seek(0)
        tail = self.stderr.read()[-2000:]
        raise RuntimeError(f"{self.argv[:3]} ended before {names}: {tail}")

    async def wait(self) -> tuple[int, float, float, float]:
        """(exit code, wall s, CPU s from os.wait4, peak RSS MB from VmHWM) of the process."""
        _, status, usage = await asyncio.to_thread(os.wait4, self.pid, 0)
        self.proc.returncode = code = os.waitstatus_to_exitcode(status)
        cpu = usage.ru_utime + usage.ru_stime
        return code, time.monotonic() - self.started, cpu, self.hwm_kb / 1024

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


def child_env(moto: Moto) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FINNSTREAM_", "FINNHUB_"))}
    env.update(AWS_ENDPOINT_URL=moto.url, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
    env.update(AWS_REGION=REGION, AWS_DEFAULT_REGION=REGION)
    return env


def write_config(path: Path, sc: Scenario, sim_url: str, stream: str) -> Path:
    limited = sc.per_second is not None
    doc = {  # JSON is YAML
        "symbols": symbols(sc.symbols),
        "finnhub": {
            "base_url": sim_url,
            "token_secret_id": SECRET_ID,
            "requests_per_second": sc.per_second if limited else UNLIMITED_PER_S,
            "requests_per_minute": UNLIMITED_PER_MIN,
        },
        "kinesis": {"stream_name": stream, "region": REGION},
        "spool": {"dir": str(path / "spool")},
        "health": {"port": 0},
        "log": {"level": "INFO", "format": "json"},
    }
    (path / "finnstream.yaml").write_text(json.dumps(doc))
    return path / "finnstream.yaml"


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="finnstream-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- scenarios -------------------------------------------------------------------------------------


@dataclass
class Result:
    sc: Scenario
    cycles: list[dict[str, float]] = field(default_factory=list)  # counted ticks, measured
    notes: list[str] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)  # soak: RSS and fds over time
    rate_limited: int = 0
    peak_rss_mb: float = 0.0

    def col(self, key: str) -> list[float]:
        return [c[key] for c in self.cycles]

    def p(self, key: str, q: float) -> float:
        return pct(self.col(key), q)

    def per_cycle(self, key: str) -> float:
        return sum(self.col(key)) / max(1, len(self.cycles))


def driver_argv(sc: Scenario, config: Path, ticks: int, profile: Path | None) -> list[str]:
    argv = [sys.executable, str(HERE / "driver.py"), "--config", str(config)]
    argv += ["--every", str(sc.every_s), "--ticks", str(ticks)]
    spy = Path(sys.executable).with_name("py-spy")
    if profile is None or not spy.exists():
        return argv
    profile.mkdir(parents=True, exist_ok=True)
    out = profile / f"{sc.name}.folded"
    return [str(spy), "record", "--native", "-r", "200", "-f", "raw", "-o", str(out), "--", *argv]


async def run_scenario(
    sc: Scenario, moto: Moto, ticks: int, profile: Path | None, soak_s: float = 0.0
) -> Result:
    result = Result(sc)
    stream = f"bench-{sc.name}-{int(time.time())}"
    await asyncio.to_thread(moto.create_stream, stream)
    settings = SimulatorSettings(
        tokens=frozenset({TOKEN}),
        latency_s=sc.latency_s,
        requests_per_second=sc.per_second,
        error_rate=sc.error_rate,
    )
    env = child_env(moto)
    with workdir() as tmp:
        async with Simulator(settings) as sim:
            config = write_config(tmp, sc, sim.url, stream)
            child = Child(driver_argv(sc, config, ticks + 1, profile), env)
            try:
                ready = await child.next("bench.ready")
                result.notes.append(
                    f"ready {ready['mono'] - child.started:.2f} s after exec, "
                    f"{ready['cpu_s']:.2f} CPU s, RSS {ready['hwm_kb'] / 1024:.0f} MB, "
                    f"{ready['gc_tracked'] / 1000:.0f}k objects tracked by gc"
                )
                await measure(result, sim, moto, child, ticks + 1, soak_s)
                code, _, _, result.peak_rss_mb = await child.wait()
                if code:
                    raise RuntimeError(f"driver exited {code}")
            finally:
                child.kill()
            result.rate_limited = sim.stats.rate_limited
            if soak_s == 0:
                result.notes.append(await run_once(config, env, tmp / "once-spool"))
    return result


async def measure(
    result: Result, sim: Simulator, moto: Moto, child: Child, ticks: int, soak_s: float
) -> None:
    seen, calls = len(sim.stats.arrivals), moto.calls.value
    cpu = (own_cpu(), proc_cpu(moto.process.pid))
    started = time.monotonic()
    for n in range(ticks):
        if soak_s and (n == 1 or n % max(1, ticks // 10) == 0 or n == ticks - 1):
            stat = proc_status(child.pid)
            result.samples.append(
                f"| {time.monotonic() - started:5.0f} s | {n} | {stat['VmRSS'] / 1024:.1f} | "
                f"{stat['VmHWM'] / 1024:.1f} | {stat['fds']} | {stat['Threads']} |"
            )
        cycle = await child.next("bench.cycle", within_s=600)
        arrivals, seen = sim.stats.arrivals[seen:], len(sim.stats.arrivals)
        tick = cycle.pop("tick_mono")
        row = cycle | {
            "lag_ms": (arrivals[0] - tick) * 1000 if arrivals else math.nan,
            "cycle_s": moto.last_put.value - tick,
            "rps": (len(arrivals) - 1) / max(1e-9, arrivals[-1] - arrivals[0]) if arrivals else 0,
            "puts": moto.calls.value - calls,
        }
        calls = moto.calls.value
        if n == 0:
            result.notes.append(
                f"warm-up tick (not counted): lag {row['lag_ms']:.0f} ms, cycle "
                f"{row['cycle_s']:.2f} s, {row['puts']} PutRecords calls"
            )
            cpu = (own_cpu(), proc_cpu(moto.process.pid))
        else:
            result.cycles.append(row)
    n = max(1, len(result.cycles))
    sim_cpu, moto_cpu = (own_cpu() - cpu[0]) / n, (proc_cpu(moto.process.pid) - cpu[1]) / n
    busy = sum(result.col("cpu_s")) / max(1e-9, sum(result.col("cycle_s")))
    result.notes += [
        f"lag p50 parts: APScheduler fired {result.p('fired_late_s', 50) * 1000:.1f} ms late; "
        f"cycle start {result.p('lag_s', 50) * 1000:.1f} ms after the tick (the app's lag_ms)",
        f"CPU s per cycle: finnstream {result.per_cycle('cpu_s'):.2f} ({busy:.0%} of the cycle; "
        f"gc {result.per_cycle('gc_s'):.2f} s, {result.per_cycle('gc_full'):.1f} full "
        f"collections), simulator {sim_cpu:.2f}, moto {moto_cpu:.2f}",
        f"per cycle: delivered min {min(result.col('delivered'), default=0):.0f}, failed "
        f"{result.per_cycle('failed'):.1f}, spooled {result.per_cycle('spooled'):.1f}, "
        f"ticks skipped (cycle overran) {sum(result.col('overran')):.0f}",
    ]


async def run_once(config: Path, env: dict[str, str], spool: Path) -> str:
    """`finnstream run --once`, cold: the figures of one whole process."""
    argv = [sys.executable, "-m", "finnstream", "run", "--once", "--config", str(config)]
    child = Child(argv, {**env, "FINNSTREAM_SPOOL__DIR": str(spool)})
    try:
        done = await child.next("cycle.done")
        code, wall, cpu, rss = await child.wait()
    finally:
        child.kill()
    return (
        f"`run --once`, a cold process: exit {code}, {done['delivered']} delivered, "
        f"wall {wall:.2f} s, CPU {cpu:.2f} s, peak RSS {rss:.0f} MB"
    )


async def run_naive(sc: Scenario, moto: Moto, n: int) -> float:
    """Seconds the sequential baseline takes for `n` symbols of `sc`'s setup."""
    stream = f"bench-naive-{int(time.time())}"
    await asyncio.to_thread(moto.create_stream, stream)
    settings = SimulatorSettings(tokens=frozenset({TOKEN}), latency_s=sc.latency_s)
    async with Simulator(settings) as sim:
        argv = [sys.executable, str(HERE / "naive.py"), "--base-url", sim.url, "--token", TOKEN]
        argv += ["--endpoint", moto.url, "--region", REGION, "--stream", stream, *symbols(n)]
        child = Child(argv, child_env(moto))
        try:
            done = await child.next("naive.done", within_s=600)
            await child.wait()
        finally:
            child.kill()
    took: float = done["took_s"]
    return took


# -- report --------------------------------------------------------------------------------------


def report(results: list[Result], naive: tuple[float, int] | None) -> None:
    print("\n| scenario | N | ticks | lag p50 / p99 ms | cycle p50 / p99 s | req/s (limit) | 429s "
          "| PutRecords/cycle (ceil N/500) | CPU s / 1k records | peak RSS MB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        n, limit = r.sc.symbols, r.sc.per_second or "none"
        cpu_1k = 1000 * sum(r.col("cpu_s")) / max(1, sum(r.col("delivered")))
        print(
            f"| {r.sc.name} | {n} | {len(r.cycles)} | {r.p('lag_ms', 50):.1f} / "
            f"{r.p('lag_ms', 99):.1f} | {r.p('cycle_s', 50):.2f} / {r.p('cycle_s', 99):.2f} | "
            f"{r.p('rps', 50):.0f} ({limit}) | {r.rate_limited} | {r.p('puts', 50):.0f} "
            f"({math.ceil(n / 500)}) | {cpu_1k:.2f} | {r.peak_rss_mb:.0f} |"
        )
    print()
    for r in results:
        print("\n".join(f"{r.sc.name}: {note}" for note in r.notes))
    print()
    verdicts(results, naive)


def verdicts(results: list[Result], naive: tuple[float, int] | None) -> None:
    by = {r.sc.name: r for r in results}
    if naive is not None and "s1" in by:
        took, n = naive
        full = took * by["s1"].sc.symbols / n
        ratio = full / by["s1"].p("cycle_s", 50)
        scaled = f" (measured on {n} symbols, scaled)" if n != by["s1"].sc.symbols else ""
        print(f"s1: naive sequential {full:.1f} s{scaled} vs finnstream cycle p50: {ratio:.0f}x")
        print(f"s1: target >= 50x (aim 75x): {'met' if ratio >= 50 else 'MISSED'}")
    if (r := by.get("s2")) is not None:
        bound = 1.03 * r.sc.symbols / (r.sc.per_second or 1) + 1
        ok = r.p("cycle_s", 99) <= bound and r.rate_limited == 0
        print(f"s2: target cycle <= {bound:.1f} s and zero 429s: {'met' if ok else 'MISSED'}")
    if (r := by.get("s3")) is not None:
        ok = r.p("cycle_s", 99) <= 5 and r.peak_rss_mb < 150
        print(f"s3: target cycle <= 5 s and peak RSS < 150 MB: {'met' if ok else 'MISSED'}")


async def main(args: argparse.Namespace) -> int:
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
    print(f"finnstream bench: {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    if args.downtime:
        import downtime  # noqa: PLC0415 - bench/downtime.py, the long-downtime scenario

        modes = args.modes.split(",") if args.modes else list(downtime.MODES)
        return await downtime.main(modes, args.seconds, args.stalls)
    moto = await asyncio.to_thread(Moto.start)
    try:
        if args.soak:
            minutes = 1 if args.quick else 10
            ticks = minutes * 60 // SOAK.every_s
            r = await run_scenario(SOAK, moto, ticks, None, soak_s=minutes * 60.0)
            print(f"\nsoak: {SOAK.symbols} symbols every {SOAK.every_s} s for {minutes} min, "
                  f"{SOAK.error_rate:.0%} simulated 5xx")  # fmt: skip
            print("| t | cycles | VmRSS MB | VmHWM MB | fds | threads |\n|---|---|---|---|---|---|")
            print("\n".join(r.samples))
            report([r], None)
            return 0
        names = args.scenario.split(",") if args.scenario else list(SCENARIOS)
        results, naive = [], None
        for name in names:
            sc = SCENARIOS[name]
            ticks = args.ticks or (min(sc.ticks, 3) if args.quick else sc.ticks)
            print(f"running {name}: {sc.symbols} symbols, {ticks} ticks every {sc.every_s} s")
            results.append(await run_scenario(sc, moto, ticks, args.profile))
            if name == "s1" and args.profile is None and not args.no_naive:
                n = 100 if args.quick else sc.symbols
                naive = (await run_naive(sc, moto, n), n)
        report(results, naive)
    finally:
        await asyncio.to_thread(moto.stop)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer ticks (a smoke test)")
    parser.add_argument("--soak", action="store_true", help="ten minutes of fast cycles")
    parser.add_argument(
        "--scenario", help=f"one or more of {', '.join(SCENARIOS)}, comma-separated"
    )
    parser.add_argument("--no-naive", action="store_true", help="skip the naive baseline")
    parser.add_argument("--ticks", type=int, help="counted ticks per scenario (overrides)")
    parser.add_argument("--profile", type=Path, help="record py-spy profiles into this directory")
    parser.add_argument(
        "--downtime",
        action="store_true",
        help="issue 8: `finnstream run` three days after it last ran, 1,800 symbols (RSS, loop)",
    )
    parser.add_argument("--modes", help="with --downtime: candles, gaps, free (comma-separated)")
    parser.add_argument(
        "--seconds", type=float, default=180.0, help="with --downtime: how long each run lasts"
    )
    parser.add_argument(
        "--stalls",
        type=float,
        metavar="MS",
        help="with --downtime: print where the daemon's loop stalled this long (stallwatch.py)",
    )
    sys.exit(asyncio.run(main(parser.parse_args())))

"""The `finnstream` command (CONTRACT section 1). Every failure is one paragraph and an exit code.

0 done; 1 not everything delivered (the rest is spooled) or a runtime failure; 2 bad command line
or config; 3 a dependency refused at startup (secret, token, stream, candles on a free plan).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence

import structlog
import yaml

from finnstream import __version__
from finnstream.config import Config, load_config, minute_capacity, shard_symbols
from finnstream.errors import EXIT_UNDELIVERED, ConfigError, FinnstreamError
from finnstream.limiter import CYCLE_START_WINDOW_S
from finnstream.logs import configure_logging, scrub

log = structlog.get_logger("finnstream.cli")


def parse_time(text: str) -> int:
    """ISO-8601 (naive means UTC) or epoch seconds."""
    value = text.strip()
    try:
        return int(float(value))
    except (ValueError, OverflowError):
        pass
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither ISO-8601 (2024-06-17T14:30:00Z) nor epoch seconds"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return int(parsed.timestamp())


def _date_arg(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from None


def _symbols_arg(text: str) -> list[str]:
    symbols = [s.strip() for s in text.split(",") if s.strip()]
    if not symbols:
        raise argparse.ArgumentTypeError("--symbols needs at least one ticker, comma-separated")
    return symbols


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be above zero")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finnstream", description="Per-minute Finnhub quotes into AWS Kinesis."
    )
    parser.add_argument("--version", action="version", version=f"finnstream {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--config",
            metavar="PATH",
            help="config file (default: $FINNSTREAM_CONFIG, else config/finnstream.yaml)",
        )
        return p

    run = with_config(sub.add_parser("run", help="the daemon: one cycle per schedule tick"))
    run.add_argument(
        "--once",
        action="store_true",
        help="drain the spool, one cycle for the current minute, flush, exit",
    )
    with_config(sub.add_parser("check-config", help="validate and print the resolved config"))
    bf = with_config(sub.add_parser("backfill", help="publish candle records for [start, end)"))
    bf.add_argument("--start", required=True, type=parse_time, help="ISO-8601 or epoch seconds")
    bf.add_argument("--end", required=True, type=parse_time, help="ISO-8601 or epoch seconds")
    bf.add_argument("--symbols", type=_symbols_arg, help="comma-separated (default: the config's)")
    tail = with_config(sub.add_parser("tail", help="print records from the stream as JSON lines"))
    tail.add_argument("--from-start", action="store_true", help="from the oldest record kept")
    tail.add_argument("--limit", type=_positive, help="stop after N records")
    sim = sub.add_parser("simulate", help="run the built-in Finnhub simulator")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8765)
    sim.add_argument("--requests-per-minute", type=_positive, default=None)
    sim.add_argument("--requests-per-second", type=_positive, default=None)
    sim.add_argument(
        "--token",
        action="append",
        default=None,
        help="accepted token (repeatable; default: any non-empty token)",
    )
    sim.add_argument("--latency-ms", type=float, default=0.0)
    sim.add_argument("--error-rate", type=float, default=0.0)
    sim.add_argument("--free", action="store_true", help="free plan: /stock/candle answers 403")
    sessions = sub.add_parser(
        "sessions", help="print the exchange's regular sessions in [start, end] as CSV"
    )
    sessions.add_argument("--start", required=True, type=_date_arg, help="first day, YYYY-MM-DD")
    sessions.add_argument("--end", required=True, type=_date_arg, help="last day, YYYY-MM-DD")
    demo = sub.add_parser("demo", help="the whole pipeline on local stand-ins")
    demo.add_argument("--symbols", type=_symbols_arg, default=None)
    demo.add_argument("--cycles", type=_positive, default=None, help="stop after N cycles")
    return parser


def _load(args: argparse.Namespace) -> Config:
    cfg, _ = load_config(args.config)
    configure_logging(cfg.log.level, log_format(cfg))
    return cfg


def log_format(cfg: Config) -> str:
    """`log.format` as set; when it is set nowhere: console on a terminal, JSON otherwise."""
    if "format" in cfg.log.model_fields_set:
        return cfg.log.format
    return "console" if sys.stdout.isatty() else "json"


def _with_signals(coro_fn: Callable[[Callable[[], None]], Awaitable[int]]) -> int:
    """Run the coroutine with SIGTERM/SIGINT wired to the stop callback it registers."""

    async def main() -> int:
        loop = asyncio.get_running_loop()
        stops: list[Callable[[], None]] = []

        def on_signal(name: str) -> None:
            log.info("signal.received", signal=name)
            for stop in stops:
                stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig.name)
        return await coro_fn(stops.append)  # type: ignore[arg-type]

    return asyncio.run(main())


def cmd_run(args: argparse.Namespace) -> int:
    from finnstream.app import RUN_ONCE_LOCK_WAIT_S, App  # noqa: PLC0415 - keeps --help light

    cfg = _load(args)

    async def go(register: Callable[[Callable[[], None]], None]) -> int:
        app = App(cfg, exit_watchdog=True, lock_wait_s=RUN_ONCE_LOCK_WAIT_S if args.once else None)
        register(app.request_stop)
        async with app:
            # Start-up objects live as long as the process: keep the collector from rescanning
            # them on every full collection (measured: 5-8% of CPU per cycle). No gc.collect()
            # first: that full pass over ~100k objects held the event loop 66-136 ms (the health
            # endpoint already serving) to find about 45 unreachable ones (bench --downtime).
            gc.freeze()
            return await (app.run_once() if args.once else app.run_forever())

    return _with_signals(go)  # type: ignore[arg-type]


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg, path = load_config(args.config)
    data = cfg.redacted()
    data["finnhub"]["base_url"] = scrub_url(data["finnhub"]["base_url"])
    if data["kinesis"]["endpoint_url"]:
        data["kinesis"]["endpoint_url"] = scrub_url(data["kinesis"]["endpoint_url"])
    mine = shard_symbols(cfg)
    capacity = minute_capacity(cfg.finnhub)
    print(f"# finnstream {__version__}: config {path} is valid (environment overrides applied)")
    token_from = (
        "FINNHUB_TOKEN (set, value redacted)"
        if os.environ.get("FINNHUB_TOKEN", "").strip()
        else f"Secrets Manager secret {cfg.finnhub.token_secret_id}"
    )
    print(f"# token: read at startup from {token_from}")
    print(yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip())
    print(
        f"# shard {cfg.shard.index} of {cfg.shard.count}: {len(mine)} of {len(cfg.symbols)} symbols"
    )
    fits = len(mine) <= capacity
    print(
        f"# pace: {capacity} symbols fit a minute at {cfg.finnhub.requests_per_second}/s and "
        f"{cfg.finnhub.requests_per_minute}/min (every request started within "
        f"{CYCLE_START_WINDOW_S:g} s of its tick, cycle after cycle): "
        f"{'fits' if fits else 'DOES NOT FIT'}"
    )
    if not fits:
        print(
            f"warning: {len(mine)} symbols do not fit: at most {capacity} can be requested every "
            f"minute at this pace without cycles starting later and later, and a quote that cannot "
            f"start within its minute is not requested (its minute becomes a gap); raise the "
            f"plan's limits or split the symbols across shards (shard.count)",
            file=sys.stderr,
        )
    return 0


def scrub_url(url: str) -> str:
    """A URL with any query string or user info removed (a token must never be printed)."""
    from urllib.parse import urlsplit, urlunsplit  # noqa: PLC0415

    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", ""))


def cmd_backfill(args: argparse.Namespace) -> int:
    from finnstream.app import RUN_ONCE_LOCK_WAIT_S, App  # noqa: PLC0415

    cfg = _load(args)
    if args.end <= args.start:
        raise ConfigError("backfill: --end must be after --start")

    async def go(register: Callable[[Callable[[], None]], None]) -> int:
        app = App(cfg, exit_watchdog=True, lock_wait_s=RUN_ONCE_LOCK_WAIT_S)
        register(app.request_stop)
        async with app:
            return await app.backfill_range(args.symbols or app.symbols, args.start, args.end)

    return _with_signals(go)  # type: ignore[arg-type]


def cmd_tail(args: argparse.Namespace) -> int:
    from finnstream.tail import tail  # noqa: PLC0415

    cfg = _load(args)

    async def go(register: Callable[[Callable[[], None]], None]) -> int:
        stop = asyncio.Event()
        register(stop.set)
        return await tail(cfg, from_start=args.from_start, limit=args.limit, stop=stop)

    return _with_signals(go)  # type: ignore[arg-type]


def cmd_simulate(args: argparse.Namespace) -> int:
    from finnstream.simulator import SimulatorSettings, serve  # noqa: PLC0415

    configure_logging("INFO", "console" if sys.stdout.isatty() else "json")
    if not 0.0 <= args.error_rate <= 1.0:
        raise ConfigError("simulate: --error-rate must be between 0 and 1")
    settings = SimulatorSettings(
        tokens=frozenset(args.token) if args.token else None,
        requests_per_minute=args.requests_per_minute,
        requests_per_second=args.requests_per_second,
        latency_s=args.latency_ms / 1000,
        error_rate=args.error_rate,
        premium=not args.free,
    )

    async def go(register: Callable[[Callable[[], None]], None]) -> int:
        stop = asyncio.Event()
        register(stop.set)
        await serve(settings, args.host, args.port, stop)
        return 0

    return _with_signals(go)  # type: ignore[arg-type]


def cmd_sessions(args: argparse.Namespace) -> int:
    """The calendar the daemon polls by, as the CSV Athena's gap report reads."""
    from finnstream.markets import MarketHours, MarketHoursError  # noqa: PLC0415 (pandas)

    # stdout is the CSV (`> sessions.csv`): log lines, warnings only, go to stderr.
    configure_logging("WARNING", "console" if sys.stderr.isatty() else "json", stream=sys.stderr)
    if args.end < args.start:
        raise ConfigError(f"sessions: --end {args.end} is before --start {args.start}")
    try:
        rows = MarketHours(years=1).sessions(args.start, args.end)
    except MarketHoursError as exc:
        raise ConfigError(f"sessions: {exc}") from exc
    lines = ["trading_day,open_minute,close_minute"]
    lines += [f"{row.trading_day.isoformat()},{row.open_minute},{row.close_minute}" for row in rows]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from finnstream.demo import demo  # noqa: PLC0415

    async def go(register: Callable[[Callable[[], None]], None]) -> int:
        stop = asyncio.Event()
        register(stop.set)
        return await demo(symbols=args.symbols, cycles=args.cycles, stop=stop)

    return _with_signals(go)  # type: ignore[arg-type]


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "check-config": cmd_check_config,
    "backfill": cmd_backfill,
    "tail": cmd_tail,
    "simulate": cmd_simulate,
    "sessions": cmd_sessions,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except FinnstreamError as exc:
        print(f"finnstream: {scrub(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_UNDELIVERED
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one paragraph, no traceback
        print(
            f"finnstream: unexpected failure ({type(exc).__name__}): {scrub(str(exc))}. "
            "This is a bug; please report it with the log above.",
            file=sys.stderr,
        )
        return EXIT_UNDELIVERED

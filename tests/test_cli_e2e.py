"""The `finnstream` command as a user runs it: a real process, its exit code, its output."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import pytest

from finnstream.simulator import Simulator

from .conftest import TOKEN, Aws, ConfigFactory, ShiftedClock, early_in_a_minute, subprocess_env


async def finnstream(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    if args[:2] == ("run", "--once"):
        await early_in_a_minute()  # a real process on the real clock
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "finnstream",
        *args,
        env=env or subprocess_env(**ENV),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


ENV: dict[str, str] = {}


@pytest.fixture(autouse=True)
def _aws_endpoint(moto_url: str) -> None:
    ENV["AWS_ENDPOINT_URL"] = moto_url


@pytest.fixture(autouse=True)
def _real_wall(wall: ShiftedClock) -> None:
    """These tests run finnstream as a real process, on the real clock: so does the simulator."""
    wall.offset = 0.0


def assert_clean(out: str, err: str) -> None:
    """No traceback and no token, anywhere a user could look."""
    for text in (out, err):
        assert "Traceback" not in text
        assert TOKEN not in text


async def test_run_once_exits_0_and_lands_records(
    make_config: ConfigFactory, aws: Aws, sim: Simulator
) -> None:
    code, out, err = await finnstream("run", "--once", "--config", str(make_config()))
    assert code == 0, err
    assert_clean(out, err)
    assert sorted(r["symbol"] for r in aws.records()) == ["AAPL", "AMZN", "MSFT"]
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    loaded = [e for e in events if e["event"] == "secret.loaded"]
    assert loaded and loaded[0]["source"].startswith("secretsmanager:")
    done = [e for e in events if e["event"] == "cycle.done"]
    assert done and done[0]["delivered"] == 3


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [
        ("symbols: [AAPL\n", "line"),
        ("symbols: []\n", "symbols"),
        ("symbols: [AAPL, AAPL]\n", "symbols"),
        ("symbols: [AAPL]\nfinnhub: {requests_per_second: 0}\n", "finnhub.requests_per_second"),
        ("symbols: [AAPL]\nfinnhub: {requests_per_minute: -5}\n", "finnhub.requests_per_minute"),
        ("symbols: [AAPL]\nschedule: {cron: '61 * * * *'}\n", "schedule.cron"),
        ("symbols: [AAPL]\nkinesis: {stream_nam: x}\n", "kinesis.stream_nam"),
        ("symbols: [AAPL]\nbogus: 1\n", "bogus"),
    ],
)
async def test_bad_config_exits_2_naming_the_field(
    tmp_path: Path, yaml_text: str, field: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    for command in (["check-config"], ["run", "--once"]):
        code, out, err = await finnstream(*command, "--config", str(path))
        assert code == 2, (command, out, err)
        assert_clean(out, err)
        assert field in err
        assert len(err.strip().splitlines()) == 1


async def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    code, out, err = await finnstream("run", "--once", "--config", str(tmp_path / "nope.yaml"))
    assert code == 2
    assert "does not exist" in err
    assert_clean(out, err)


async def test_missing_secret_exits_3(make_config: ConfigFactory, aws: Aws, sim: Simulator) -> None:
    path = make_config(finnhub={"token_secret_id": "finnstream/does-not-exist"})
    code, out, err = await finnstream("run", "--once", "--config", str(path))
    assert code == 3
    assert_clean(out, err)
    assert "finnstream/does-not-exist" in err and "does not exist" in err


@pytest.mark.parametrize(
    ("secret", "words"),
    [
        ('{"token": ""}', "empty token"),
        ('{"other": "x"}', "has no key 'token'"),
        ("not json at all", "is not JSON"),
    ],
)
async def test_unusable_secret_exits_3(
    make_config: ConfigFactory, aws: Aws, sim: Simulator, secret: str, words: str
) -> None:
    aws.put_secret(secret)
    code, out, err = await finnstream("run", "--once", "--config", str(make_config()))
    assert code == 3
    assert words in err
    assert_clean(out, err)


async def test_rejected_token_exits_3(make_config: ConfigFactory, aws: Aws, sim: Simulator) -> None:
    sim.settings.tokens = frozenset({"another-token"})
    code, out, err = await finnstream("run", "--once", "--config", str(make_config()))
    assert code == 3
    assert "rejected the API token" in err
    assert_clean(out, err)
    assert sim.stats.token_in_url == 0


async def test_missing_stream_exits_3(make_config: ConfigFactory, aws: Aws, sim: Simulator) -> None:
    path = make_config(kinesis={"stream_name": "no-such-stream"})
    code, out, err = await finnstream("run", "--once", "--config", str(path))
    assert code == 3
    assert "no-such-stream does not exist" in err
    assert_clean(out, err)


async def test_token_from_env_is_used_and_never_printed(
    make_config: ConfigFactory, aws: Aws, sim: Simulator
) -> None:
    env = subprocess_env(FINNHUB_TOKEN=TOKEN, **ENV)
    path = make_config(finnhub={"token_secret_id": "finnstream/not-needed"})
    code, out, err = await finnstream("run", "--once", "--config", str(path), env=env)
    assert code == 0, err
    assert_clean(out, err)
    assert '"source":"env:FINNHUB_TOKEN"' in out


async def test_sigterm_stops_the_daemon_with_exit_0(
    make_config: ConfigFactory, aws: Aws, sim: Simulator
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "finnstream",
        "run",
        "--config",
        str(make_config()),
        env=subprocess_env(**ENV),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    lines = []
    while True:  # wait until it is ready, reading its own log
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line, "the daemon exited before it was ready"
        lines.append(line)
        if '"event":"app.ready"' in line:
            break
    proc.send_signal(signal.SIGTERM)
    out, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0, err
    text = "".join(lines) + out.decode()
    assert_clean(text, err.decode())
    assert '"event":"app.stopped"' in text

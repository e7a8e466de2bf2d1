"""The image as ECS runs it: uid 10001, read-only root, the spool volume, health, SIGTERM.

Run by `make test-container` (scripts/container.sh), which builds the image first.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tarfile
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import Aws, wait_for_room_in_the_minute

from .conftest import (
    SPOOL,
    UID,
    daemon_env,
    engine,
    image,
    ok,
    quotes_by_symbol,
    run,
)

pytestmark = pytest.mark.container

HEALTH_PORT = 8080  # the image's HEALTHCHECK probes 127.0.0.1:8080
STOP_GRACE_S = 30  # compose stop_grace_period, ECS stopTimeout
VENV_LIMIT_MB = 200


def test_image_declares_user_health_stop_signal_and_spool_volume() -> None:
    [meta] = json.loads(ok(engine("image", "inspect", image())))
    config = meta["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["finnstream"] and config["Cmd"] == ["run"]
    assert config["StopSignal"] == "SIGTERM"
    assert SPOOL in config["Volumes"]
    # Built with --format docker: the OCI format would have dropped the HEALTHCHECK.
    assert meta["Healthcheck"]["Test"][:2] == ["CMD", "python"]


def test_help_and_check_config_run_as_uid_10001() -> None:
    assert ok(run("--help")).startswith("usage: finnstream")
    assert ok(run("check-config", env={"FINNSTREAM_SYMBOLS": "AAPL,BRK.B"})).startswith(
        "# finnstream 0.1.0: config /app/config/finnstream.yaml is valid"
    )
    ids = run("-c", "import os; print(os.getuid(), os.getgid())", options=["--entrypoint=python"])
    assert ok(ids).split() == [UID, UID]


def test_an_invalid_config_is_one_paragraph_and_exit_2() -> None:
    proc = run("check-config", env={"FINNSTREAM_KINESIS__STREAMNAME": "typo"})
    assert proc.returncode == 2, proc
    assert "Traceback" not in proc.stderr


def test_demo_in_the_image_says_how_to_install_its_extra() -> None:
    proc = run("demo")
    assert proc.returncode == 3, proc
    assert "pip install 'finnstream[demo]'" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0


# What the runtime virtualenv holds, checked by its own interpreter.
VENV_REPORT = r"""
import importlib.util, json, os, sys, sysconfig
site = sysconfig.get_path("purelib")
absent = [m for m in ("pip", "setuptools", "moto", "flask", "flask_cors", "werkzeug")
          if importlib.util.find_spec(m) is not None]
size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(sys.prefix) for f in fs
           if not os.path.islink(os.path.join(d, f)))
uncompiled = []
for d, _, fs in os.walk(site):
    for f in fs:
        if f.endswith(".py"):
            source = os.path.join(d, f)
            if not os.path.exists(importlib.util.cache_from_source(source)):
                uncompiled.append(source)
import botocore.session
services = botocore.session.get_session().get_available_services()
import exchange_calendars, pandas
xnys = exchange_calendars.get_calendar("XNYS")
day = pandas.Timestamp("2025-07-03")
print(json.dumps({
    "present": absent, "venv_bytes": size, "uncompiled": uncompiled[:5],
    "services": sorted(services), "early_close": str(xnys.session_close(day)),
    "holiday": xnys.is_session(pandas.Timestamp("2025-07-04")),
}))
"""


def test_runtime_venv_is_slim_compiled_and_still_works() -> None:
    report = json.loads(ok(run("-c", VENV_REPORT, options=["--entrypoint=python"])))
    assert report["present"] == []  # no pip, no setuptools, no demo extra
    assert report["venv_bytes"] < VENV_LIMIT_MB * 1_000_000, report["venv_bytes"]
    assert report["uncompiled"] == []  # bytecode compiled at build time, once
    assert {"kinesis", "secretsmanager", "sts"} <= set(report["services"])
    # pandas without its tests still answers the market calendar: early close, then a holiday.
    assert report["early_close"] == "2025-07-03 17:00:00+00:00"
    assert report["holiday"] is False


def test_run_once_lands_records_with_a_read_only_root(
    aws: Aws, sim_url: str, spool_volume: str
) -> None:
    volume = [f"--volume={spool_volume}:{SPOOL}"]
    env = daemon_env(aws, sim_url, FINNSTREAM_HEALTH__PORT="0")
    wait_for_room_in_the_minute()  # no quote is requested after second 58 of its minute
    before = int(time.time()) // 60 * 60
    proc = run("run", "--once", env=env, options=volume)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    by_symbol = quotes_by_symbol(aws.records())
    assert sorted(by_symbol) == ["AAPL", "BRK.B", "MSFT"]
    assert all(len(bodies) == 1 for bodies in by_symbol.values()), by_symbol
    assert {b[0]["minute"] for b in by_symbol.values()} <= {before, before + 60}

    # `tail` reads them back from inside the image.
    tail = ok(run("tail", "--from-start", "--limit", "3", env=env))
    assert sorted(json.loads(line)["symbol"] for line in tail.splitlines()) == sorted(by_symbol)

    # What run --once wrote went to the spool volume, as uid 10001.
    owners = ok(
        run(SPOOL, "-mindepth", "1", "-printf", r"%u %p\n", options=[*volume, "--entrypoint=find"])
    ).splitlines()
    assert owners, "run --once wrote nothing to the spool volume"
    assert all(line.split()[0] in {"finnstream", UID} for line in owners), owners


def test_nothing_but_the_spool_is_writable(spool_volume: str) -> None:
    script = f"for d in / /tmp /var/tmp /app /opt/venv {SPOOL}; do touch $d/.w && echo $d; done"
    proc = run("-c", script, options=[f"--volume={spool_volume}:{SPOOL}", "--entrypoint=sh"])
    assert proc.stdout.split() == [SPOOL], proc.stderr


def _healthcheck(name: str) -> subprocess.CompletedProcess[str]:
    return engine("healthcheck", "run", name, timeout=30)


def test_daemon_passes_its_healthcheck_and_exits_0_on_sigterm(
    aws: Aws, sim_url: str, spool_volume: str
) -> None:
    deadline = time.monotonic() + 30
    while port_taken(HEALTH_PORT):  # on the host network, another process may hold it a while
        if time.monotonic() > deadline:
            held = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True, check=False)
            pytest.fail(f"127.0.0.1:{HEALTH_PORT}, which the HEALTHCHECK probes, is taken\n{held}")
        time.sleep(0.5)
    name = f"finnstream-test-daemon-{uuid.uuid4().hex[:8]}"
    ok(
        engine(
            "run",
            "--detach",
            "--name",
            name,
            "--network=host",
            "--read-only",
            "--read-only-tmpfs=false",
            # Podman runs health checks from systemd timers, and this machine has no systemd:
            # keep the image's HEALTHCHECK, run it here (what the timer would do).
            "--health-interval=disable",
            f"--volume={spool_volume}:{SPOOL}",
            *[f"--env={k}={v}" for k, v in daemon_env(aws, sim_url).items()],
            image(),
        )
    )
    try:
        deadline = time.monotonic() + 60
        while (check := _healthcheck(name)).returncode != 0:
            state = engine("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            if state != "running" or time.monotonic() > deadline:
                logs = engine("logs", name).stderr
                pytest.fail(f"not healthy ({state}): {check.stdout}{check.stderr}\n{logs}")
            time.sleep(0.5)
        health = engine("inspect", "--format", "{{.State.Health.Status}}", name)
        assert ok(health).strip() == "healthy"
        # The startup cycle for the minute under way has landed.
        assert sorted(quotes_by_symbol(aws.records())) == ["AAPL", "BRK.B", "MSFT"]

        started = time.monotonic()
        ok(engine("stop", "--time", str(STOP_GRACE_S), name, timeout=STOP_GRACE_S + 30))
        took = time.monotonic() - started
        code = engine("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
        assert code == "0", engine("logs", name).stderr
        assert took < STOP_GRACE_S / 3, f"SIGTERM to exit took {took:.1f} s"
        print(f"\nSIGTERM to exit 0 in {took:.2f} s")
    finally:
        engine("rm", "--force", "--volumes", "--time", "0", name)


def port_taken(port: int) -> bool:
    """Whether a server could not listen there (TIME_WAIT leftovers do not count for aiohttp)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


# --- the build machine's CAs stay out of the image -----------------------------------------------


def _pem_blocks(text: str) -> set[tuple[str, ...]]:
    """Each certificate of a PEM bundle, as its base64 lines."""
    blocks: set[tuple[str, ...]] = set()
    current: list[str] = []
    for line in text.splitlines():
        if line.startswith("-----BEGIN CERTIFICATE"):
            current = []
        elif line.startswith("-----END CERTIFICATE"):
            blocks.add(tuple(current))
        else:
            current.append(line.strip())
    return blocks


def test_the_build_machines_own_cas_are_not_in_the_image(tmp_path: Path) -> None:
    """The CAs a site adds (Debian keeps them in /usr/local/share/ca-certificates, and they are in
    the bundle scripts/container.sh passes as the build secret) reach pip, not the image."""
    bundle = Path(os.environ.get("FINNSTREAM_BUILD_CA", "/etc/ssl/certs/ca-certificates.crt"))
    local = sorted(Path("/usr/local/share/ca-certificates").glob("**/*.crt"))
    if not bundle.is_file() or not local:
        pytest.skip("this build machine adds no CA of its own: nothing to look for")
    own = set().union(*(_pem_blocks(path.read_text()) for path in local))
    assert own <= _pem_blocks(bundle.read_text()), "the build secret lacks the site's CAs"
    # A line from the middle of each of them, searched for in every file of the image.
    needles = [block[len(block) // 2].encode() for block in own]
    name = f"finnstream-test-export-{uuid.uuid4().hex[:8]}"
    ok(engine("create", "--name", name, image()))
    try:
        exported = tmp_path / "image.tar"
        ok(engine("export", "--output", str(exported), name))
    finally:
        engine("rm", "--force", "--volumes", name)
    with tarfile.open(exported) as tar:
        for member in tar:
            if member.isfile() and member.size < 50_000_000:
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                for needle in needles:
                    assert needle not in data, f"a build-machine CA is in {member.name}"
    history = ok(engine("history", "--no-trunc", "--format", "{{.CreatedBy}}", image()))
    assert not any(needle.decode() in history for needle in needles)

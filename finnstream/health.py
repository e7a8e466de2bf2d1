"""Health and metrics over HTTP (aiohttp): `/healthz`, `/readyz`, `/metrics` (Prometheus text).

`/healthz` is 200 while the scheduler is alive and the last cycle started within two intervals
(and the token is accepted); `/readyz` is 200 once the secret is loaded and the stream checked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from finnstream.metrics import Metrics

log = structlog.get_logger("finnstream.health")

STUCK_AFTER_S = 120.0  # two minutes with a tick waiting and no cycle starting


def _never() -> float:
    return float("-inf")


@dataclass
class HealthState:
    ready: bool = False
    scheduler_alive: Callable[[], bool] = lambda: False
    scheduler_overdue: Callable[[], float] = _never  # seconds past due (> 0: the scheduler is late)
    ticks_waiting: Callable[[], int] = lambda: 0
    last_cycle_mono: float | None = None
    started_mono: float = 0.0
    token_valid: bool = True
    backfill_enabled: bool = True
    spool_full: bool = False
    held_records: int = 0  # settled only in memory: the disk refused writes
    standby: str | None = None  # why this process is a standby (another holds the spool lock)
    problems: list[str] = field(default_factory=list)

    def check(self, now_mono: float) -> tuple[bool, dict[str, Any]]:
        if self.standby is not None:  # alive and waiting: healthy, not ready
            return True, {"healthy": True, "reasons": [], "ready": False, "standby": self.standby}
        reasons = list(self.problems)
        if not self.scheduler_alive():
            reasons.append("scheduler is not running")
        elif (late := self.scheduler_overdue()) > 0:
            reasons.append(f"scheduler has not fired for {late:.0f} s past two intervals")
        since = self.last_cycle_mono if self.last_cycle_mono is not None else self.started_mono
        if self.ticks_waiting() and now_mono - since > STUCK_AFTER_S:
            reasons.append(f"a tick has waited while no cycle started for {now_mono - since:.0f} s")
        if not self.token_valid:
            reasons.append("Finnhub rejects the token: put a valid one in the secret")
        body = {
            "healthy": not reasons,
            "reasons": reasons,
            "ready": self.ready,
            "backfill_enabled": self.backfill_enabled,
            "spool_full": self.spool_full,
            "held_records": self.held_records,
            "seconds_since_last_cycle": None
            if self.last_cycle_mono is None
            else round(now_mono - self.last_cycle_mono, 1),
        }
        return not reasons, body


class HealthServer:
    def __init__(
        self, state: HealthState, metrics: Metrics, monotonic: Callable[[], float]
    ) -> None:
        self._state = state
        self._metrics = metrics
        self._monotonic = monotonic
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self, host: str, port: int) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics_handler)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else port
        log.info("health.listening", host=host, port=self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, _request: web.Request) -> web.Response:
        ok, body = self._state.check(self._monotonic())
        return web.json_response(body, status=200 if ok else 503)

    async def _readyz(self, _request: web.Request) -> web.Response:
        ready = self._state.ready
        body: dict[str, Any] = {"ready": ready}
        if not ready:
            body["reason"] = self._state.standby or "starting"
        return web.json_response(body, status=200 if ready else 503)

    async def _metrics_handler(self, _request: web.Request) -> web.Response:
        return web.Response(
            body=self._metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

"""One active process per `spool.dir`: an exclusive lock on `<dir>/finnstream.lock`.

`flock(LOCK_EX | LOCK_NB)`. On a local disk the kernel releases it the moment the holder's
process ends, however it ends (exit, SIGKILL, OOM kill). On NFS (EFS) Linux emulates flock with
an NFSv4 byte-range lock on the whole file: a holder whose process dies on a live client is
released at once as well (the client unlocks); a holder whose whole machine or task vanished
keeps it until the server's lease for that client expires (see the README for EFS's figure).

A process that finds the lock held is a standby: it polls for the lock every `POLL_S`, and
takes over the moment it is free. The holder writes who it is into the file (pid, host, time),
only for the standby's messages; the lock itself is the flock, never the file's content.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import fcntl
import os
import socket
from pathlib import Path

import structlog

from finnstream.clock import Clock, unless
from finnstream.errors import ConfigError

log = structlog.get_logger("finnstream.lock")

FILENAME = "finnstream.lock"
POLL_S = 0.25


class SpoolLock:
    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / FILENAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _open(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise ConfigError(
                f"spool.dir {self.path.parent} is not usable: {exc.strerror or exc}: "
                "point it at a writable directory"
            ) from None

    def try_acquire(self) -> bool:
        """Take the lock if it is free; True when this process now holds it."""
        if self._fd is not None:
            return True
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as exc:
            os.close(fd)
            raise ConfigError(
                f"spool.dir {self.path.parent}: the lock file {self.path} cannot be locked "
                f"({exc.strerror or exc}); on NFS, mount with locking enabled"
            ) from None
        self._fd = fd
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        who = f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, who, 0)
        except OSError as exc:  # only informational: the flock is what counts
            log.warning("lock.note_failed", error=str(exc))
        return True

    def note(self) -> str:
        """What the last process to take the lock wrote about itself; "" if nothing is there
        (not written yet, or being rewritten) or the file cannot be read."""
        try:
            return self.path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            return ""

    def holder(self) -> str:
        """Who holds the lock, as the holder wrote it (best effort)."""
        return self.note() or "another process"

    async def acquire(
        self, clock: Clock, stop: asyncio.Event, timeout_s: float | None = None
    ) -> bool:
        """Wait for the lock, polling every `POLL_S`, until `stop` or `timeout_s`; True if held."""
        deadline = None if timeout_s is None else clock.monotonic() + timeout_s
        while not stop.is_set():
            if await asyncio.to_thread(self.try_acquire):
                return True
            if deadline is not None and clock.monotonic() >= deadline:
                return False
            await unless(stop, clock.sleep(POLL_S))
        return False

    def release(self) -> None:
        """Give the lock up (idempotent). The kernel does the same if the process dies."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        log.info("lock.released", path=str(self.path))

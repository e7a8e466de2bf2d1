"""One error hierarchy. Each error knows its exit code and whether a retry could help.

The CLI turns a `FinnstreamError` into one clear paragraph and its exit code; nothing else
reaches the user as a traceback. Retry decisions look only at `retriable`.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_UNDELIVERED = 1
EXIT_USAGE = 2
EXIT_DEPENDENCY = 3


class FinnstreamError(Exception):
    """Base error: `str(err)` is a complete sentence for a user at 3 a.m."""

    exit_code: int = EXIT_UNDELIVERED
    retriable: bool = False


class ConfigError(FinnstreamError):
    """The command line or the config is wrong: fix it and run again."""

    exit_code = EXIT_USAGE


class DependencyError(FinnstreamError):
    """Something finnstream depends on refused at startup (secret, token, stream)."""

    exit_code = EXIT_DEPENDENCY


class SecretError(DependencyError):
    """The Finnhub token could not be read from its source."""


class TokenRejected(DependencyError):
    """Finnhub answered 401 to the token."""


class StreamMissing(DependencyError):
    """The Kinesis stream does not exist or cannot be described."""


class SpoolLocked(DependencyError):
    """Another finnstream process holds the spool directory's lock."""


class CandlesForbidden(DependencyError):
    """Finnhub answered 403 to /stock/candle: the plan has no access to candles."""


class FinnhubError(FinnstreamError):
    """A Finnhub request failed; `retriable` says whether trying again may help."""

    def __init__(
        self,
        message: str,
        *,
        retriable: bool,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.retriable = retriable
        self.status = status
        self.retry_after = retry_after


class DeadlinePassed(FinnhubError):
    """The limiter could start the request only at or after its deadline, so it was not made.

    Not retriable: the deadline (a quote's minute) is over. Never raised for a request that was
    sent: its own failure says why it has no answer.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, retriable=False)


class KinesisError(FinnstreamError):
    """A whole PutRecords call failed; `retriable` says whether trying again may help."""

    def __init__(self, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable

"""Structured logs (structlog): JSON lines for CloudWatch, the console renderer on a terminal.

`redact_secrets` runs last before rendering: any registered secret that reaches an event, in any
value, nested or inside an exception's text, comes out as `***`. Only values of at least
`MIN_SECRET_LEN` characters are redacted (see `register_secret`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import orjson
import structlog

REDACTED = "***"
# Finnhub's tokens are 20 characters. A shorter value is redacted from 8 characters on; below
# that, replacing it would mangle every line that happens to contain it ("a", "60", "AAPL").
MIN_SECRET_LEN = 8
_secrets: set[str] = set()

log = structlog.get_logger("finnstream.logs")


def register_secret(value: str) -> bool:
    """From now on, `value` never appears in a log line; True if it will be redacted.

    A value shorter than `MIN_SECRET_LEN` is not redacted (it cannot be a Finnhub token, and
    redacting it would mangle unrelated text); a warning says so, naming its length only. It is
    still never logged by finnstream itself: the token travels only in a request header, and no
    log event carries it. The empty string is ignored silently.
    """
    if len(value) >= MIN_SECRET_LEN:
        _secrets.add(value)
        return True
    if value:
        log.warning(
            "secret.too_short_to_redact",
            length=len(value),
            min_length=MIN_SECRET_LEN,
            hint="Finnhub tokens are 20 characters: check the secret's value",
        )
    return False


def scrub(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _scrub_value(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: _scrub_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_scrub_value(v) for v in value)
    if isinstance(value, int | float | bool) or value is None:
        return value
    return scrub(str(value))


def redact_secrets(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    if not _secrets:
        return event_dict
    for key, value in list(event_dict.items()):
        event_dict[key] = _scrub_value(value)
    return event_dict


def _dumps(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


def configure_logging(level: str = "INFO", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Set up structlog once per process. `fmt` "console" is for people; "json" for machines."""
    out = stream or sys.stdout
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,  # exceptions become text, so redaction sees them
        redact_secrets,
        renderer,
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level]),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    # Libraries logging through stdlib (botocore, apscheduler, aiohttp): stderr, warnings only.
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s"
    )
    for noisy in ("apscheduler", "botocore", "aiobotocore", "aiohttp.access", "werkzeug"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

"""Configuration: YAML validated once at load, with `FINNSTREAM_<SECTION>__<KEY>` env overrides.

Every model is frozen and forbids unknown keys, so a typo is an error, never a silent no-op.
`load_config` is the only entry point; it raises `ConfigError` with one message naming the field.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from finnstream.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("config/finnstream.yaml")
ENV_PREFIX = "FINNSTREAM_"
ENV_CONFIG = "FINNSTREAM_CONFIG"
ENV_SYMBOLS = "FINNSTREAM_SYMBOLS"
ENV_NESTED = "__"
MAX_SYMBOL_LEN = 256  # a symbol is the PartitionKey: Kinesis allows 1..256 characters

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class _Section(BaseModel):
    # A number where text is expected (a stream called 2024) is taken as text.
    model_config = ConfigDict(frozen=True, extra="forbid", coerce_numbers_to_str=True)


class FinnhubConfig(_Section):
    base_url: str = "https://finnhub.io/api/v1"
    token_secret_id: str = "finnstream/finnhub"
    token_secret_key: str | None = "token"
    requests_per_minute: PositiveInt = 60
    requests_per_second: PositiveInt = 30
    timeout_s: PositiveFloat = 5.0
    retries: Annotated[int, Field(ge=0, le=20)] = 3

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")


class ScheduleConfig(_Section):
    cron: str = "* * * * *"
    market_hours_only: bool = False

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        from finnstream.schedule import parse_cron  # noqa: PLC0415 - keeps APScheduler out of import time

        parse_cron(value)
        return value


class KinesisConfig(_Section):
    stream_name: Annotated[
        str, Field(min_length=1, max_length=128, pattern=r"^[a-zA-Z0-9_.-]+$")
    ] = "finnstream-quotes"
    region: str | None = None
    endpoint_url: str | None = None
    max_retries: Annotated[int, Field(ge=0, le=30)] = 8


class SpoolConfig(_Section):
    dir: Path = Path("/var/lib/finnstream/spool")
    max_bytes: Annotated[int, Field(ge=1024 * 1024)] = 268_435_456


class BackfillConfig(_Section):
    enabled: bool = True
    every_minutes: PositiveInt = 15
    max_attempts: PositiveInt = 3


class ShardConfig(_Section):
    index: Annotated[int, Field(ge=0)] = 0
    count: PositiveInt = 1

    @model_validator(mode="after")
    def _index_below_count(self) -> ShardConfig:
        if self.index >= self.count:
            raise ValueError(f"index {self.index} must be below count {self.count}")
        return self


class HealthConfig(_Section):
    host: str = "0.0.0.0"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080


class LogConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "console"] = "json"

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class Config(_Section):
    symbols: Annotated[list[str], Field(min_length=1)]
    finnhub: FinnhubConfig = FinnhubConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    kinesis: KinesisConfig = KinesisConfig()
    spool: SpoolConfig = SpoolConfig()
    backfill: BackfillConfig = BackfillConfig()
    shard: ShardConfig = ShardConfig()
    health: HealthConfig = HealthConfig()
    log: LogConfig = LogConfig()

    @field_validator("symbols")
    @classmethod
    def _valid_symbols(cls, symbols: list[str]) -> list[str]:
        seen: set[str] = set()
        for symbol in symbols:
            if not isinstance(symbol, str) or not symbol.strip() or symbol != symbol.strip():
                raise ValueError(f"{symbol!r} is not a ticker (empty or surrounded by spaces)")
            if len(symbol) > MAX_SYMBOL_LEN or any(
                c.isspace() or not c.isprintable() for c in symbol
            ):
                raise ValueError(
                    f"{symbol!r} is not a ticker (whitespace, control characters or too long)"
                )
            if symbol in seen:
                raise ValueError(f"{symbol!r} is listed twice")
            seen.add(symbol)
        return symbols

    def redacted(self) -> dict[str, Any]:
        """The resolved config as plain data, safe to print (it holds no token, only its source)."""
        return self.model_dump(mode="json")


def minute_capacity(cfg: FinnhubConfig) -> int:
    """How many symbols fit a minute: the largest N whose cycle, every minute, starts all its
    requests within `limiter.CYCLE_START_WINDOW_S` of the tick without drifting
    (`limiter.capacity`; at most requests_per_minute - 1). 0 when nothing fits."""
    from finnstream.limiter import capacity  # noqa: PLC0415

    return capacity(cfg.requests_per_second, cfg.requests_per_minute)


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Nested overrides from `FINNSTREAM_<SECTION>__<KEY>` and `FINNSTREAM_SYMBOLS`.

    Values are parsed as YAML scalars (`60`, `true`, `null`), so types match the file. An empty
    variable counts as unset (compose and ECS pass `VAR=` for "no value").
    """
    overrides: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG or not raw.strip():
            continue
        if name == ENV_SYMBOLS:
            overrides["symbols"] = [s.strip() for s in raw.split(",") if s.strip()]
            continue
        path = name[len(ENV_PREFIX) :].lower().split(ENV_NESTED)
        if len(path) != 2 or not all(path):
            raise ConfigError(
                f"environment variable {name} is not a config override: use "
                f"FINNSTREAM_<SECTION>__<KEY> (for example FINNSTREAM_KINESIS__STREAM_NAME) "
                f"or FINNSTREAM_SYMBOLS"
            )
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        section = overrides.setdefault(path[0], {})
        if not isinstance(section, dict):
            raise ConfigError(f"environment variable {name}: {path[0]} is not a section")
        section[path[1]] = value
    return overrides


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def resolve_path(cli_path: str | Path | None, environ: Mapping[str, str]) -> Path:
    """`--config`, else `$FINNSTREAM_CONFIG`, else `config/finnstream.yaml`."""
    if cli_path:
        return Path(cli_path)
    if environ.get(ENV_CONFIG):
        return Path(environ[ENV_CONFIG])
    return DEFAULT_CONFIG_PATH


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} does not exist: pass --config PATH or set FINNSTREAM_CONFIG"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must be a mapping of sections, not {type(data).__name__}"
        )
    return data


def _describe(exc: ValidationError, source: str) -> str:
    problems = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling against config/finnstream.yaml)"
        elif err["type"] == "missing":
            msg = "is required"
        problems.append(f"{field}: {msg.removeprefix('Value error, ')}")
    return f"invalid config ({source}): " + "; ".join(problems)


def load_config(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> tuple[Config, Path]:
    """Load, override from the environment, and validate. Raises `ConfigError`."""
    env = os.environ if environ is None else environ
    resolved = resolve_path(path, env)
    data = _merge(_read_yaml(resolved), env_overrides(env))
    try:
        return Config.model_validate(data), resolved
    except ValidationError as exc:
        raise ConfigError(_describe(exc, f"{resolved} with environment overrides")) from None


def shard_of(symbol: str, count: int) -> int:
    """The shard a symbol belongs to: a stable hash (BLAKE2b), the same in every process and run."""
    digest = hashlib.blake2b(symbol.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def shard_symbols(cfg: Config) -> list[str]:
    """This process's slice of the symbols, in configured order."""
    if cfg.shard.count == 1:
        return list(cfg.symbols)
    return [s for s in cfg.symbols if shard_of(s, cfg.shard.count) == cfg.shard.index]


def aws_region(cfg: Config, environ: Mapping[str, str]) -> str | None:
    """`kinesis.region`, else AWS_REGION, else AWS_DEFAULT_REGION (botocore reads only the last)."""
    return (
        cfg.kinesis.region or environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or None
    )


ENDPOINT_ENV = {
    "kinesis": "AWS_ENDPOINT_URL_KINESIS",
    "secretsmanager": "AWS_ENDPOINT_URL_SECRETS_MANAGER",
}


def aws_endpoint(cfg: Config, service: str, environ: Mapping[str, str]) -> str | None:
    """`kinesis.endpoint_url` for Kinesis, else the service's AWS_ENDPOINT_URL_<SERVICE>, else
    AWS_ENDPOINT_URL, else None (the AWS default)."""
    if service == "kinesis" and cfg.kinesis.endpoint_url:
        return cfg.kinesis.endpoint_url
    return environ.get(ENDPOINT_ENV[service]) or environ.get("AWS_ENDPOINT_URL") or None

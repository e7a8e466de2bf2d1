"""The Finnhub token: from `FINNHUB_TOKEN`, else from AWS Secrets Manager (read once at startup).

Errors name the secret and what to do, never the value. `register_secret` hands the token to the
log redactor so it cannot reach a log line even by accident.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from aiobotocore.session import AioSession
from botocore.exceptions import BotoCoreError, ClientError

from finnstream.config import FinnhubConfig
from finnstream.errors import SecretError
from finnstream.logs import register_secret

log = structlog.get_logger("finnstream.secret")

ENV_TOKEN = "FINNHUB_TOKEN"


@dataclass(frozen=True)
class Token:
    value: str
    source: str  # "env:FINNHUB_TOKEN" or "secretsmanager:<id>"

    def __repr__(self) -> str:
        return f"Token(source={self.source!r}, value=<redacted>)"


def extract_token(secret_string: str, key: str | None, secret_id: str) -> str:
    """The token inside a SecretString: the whole string, or `key` of a JSON object."""
    if key is None:
        token = secret_string.strip()
    else:
        try:
            doc: Any = json.loads(secret_string)
        except json.JSONDecodeError:
            raise SecretError(
                f"secret {secret_id} is not JSON, but finnhub.token_secret_key is {key!r}: store "
                f'{{"{key}": "<token>"}} or set token_secret_key to null to use the whole string'
            ) from None
        if not isinstance(doc, dict) or key not in doc:
            raise SecretError(f"secret {secret_id} has no key {key!r} (finnhub.token_secret_key)")
        value = doc[key]
        if not isinstance(value, str):
            raise SecretError(f"secret {secret_id}: key {key!r} is not a string")
        token = value.strip()
    if not token:
        raise SecretError(f"secret {secret_id} holds an empty token: set its value and start again")
    if any(c.isspace() for c in token):
        raise SecretError(
            f"secret {secret_id} holds a token with whitespace inside: check its value"
        )
    return token


def _describe_client_error(exc: ClientError, secret_id: str) -> str:
    code = exc.response.get("Error", {}).get("Code", "Unknown")
    hints = {
        "ResourceNotFoundException": "it does not exist in this account and region, or has no "
        "value yet (aws secretsmanager put-secret-value); create it or set "
        "finnhub.token_secret_id",
        "AccessDeniedException": "access denied: the task role needs secretsmanager:GetSecretValue "
        "on this secret",
        "DecryptionFailure": "its KMS key cannot decrypt it: grant kms:Decrypt to the task role",
        "InvalidRequestException": "it is scheduled for deletion or otherwise unusable",
    }
    hint = hints.get(code, f"AWS answered {code}")
    return f"cannot read the Finnhub token from secret {secret_id}: {hint}"


async def fetch_secret_token(
    cfg: FinnhubConfig, session: AioSession, *, region: str | None, endpoint_url: str | None
) -> str:
    """GetSecretValue once; raises `SecretError` with a one-paragraph message."""
    try:
        async with session.create_client(
            "secretsmanager", region_name=region, endpoint_url=endpoint_url
        ) as client:
            answer = await client.get_secret_value(SecretId=cfg.token_secret_id)
    except ClientError as exc:
        raise SecretError(_describe_client_error(exc, cfg.token_secret_id)) from None
    except BotoCoreError as exc:
        raise SecretError(
            f"cannot read the Finnhub token from secret {cfg.token_secret_id}: {exc}"
        ) from None
    secret_string = answer.get("SecretString")
    if secret_string is None:
        raise SecretError(
            f"secret {cfg.token_secret_id} has no SecretString (binary secrets are not supported)"
        )
    token = extract_token(secret_string, cfg.token_secret_key, cfg.token_secret_id)
    register_secret(token)
    return token


async def load_token(
    cfg: FinnhubConfig,
    session: AioSession,
    *,
    region: str | None,
    endpoint_url: str | None,
    environ: Mapping[str, str] | None = None,
) -> Token:
    env = os.environ if environ is None else environ
    from_env = env.get(ENV_TOKEN, "").strip()
    if from_env:
        register_secret(from_env)
        token = Token(from_env, f"env:{ENV_TOKEN}")
    else:
        value = await fetch_secret_token(cfg, session, region=region, endpoint_url=endpoint_url)
        token = Token(value, f"secretsmanager:{cfg.token_secret_id}")
    log.info("secret.loaded", source=token.source)
    return token

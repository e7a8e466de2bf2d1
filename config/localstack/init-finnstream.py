"""Create the AWS resources finnstream needs in LocalStack: its Kinesis stream and its secret.

One file, two ways to run it:

* LocalStack runs it as a READY hook (``/etc/localstack/init/ready.d``). LocalStack 4.x executes
  ``.py`` hooks with ``exec()`` inside its own interpreter, which ships boto3; ``__name__`` is then
  unset, a raised exception marks the hook ``ERROR`` in ``/_localstack/init/ready``.
* Anything else runs it as a script (``python init-finnstream.py``), e.g. ``scripts/localstack.sh``
  against a LocalStack started from PyPI; it exits non-zero on failure.

Idempotent: an existing stream or secret is left as it is, so re-runs succeed.
Environment: ``AWS_ENDPOINT_URL`` (default ``http://127.0.0.1:4566``), ``AWS_REGION`` /
``AWS_DEFAULT_REGION`` (default ``us-east-1``). Credentials are LocalStack's dummy ``test`` ones.
"""

import json
import os
import time

import boto3
from botocore.exceptions import ClientError

STREAM_NAME = "finnstream-quotes"
SHARD_COUNT = 1
SECRET_ID = "finnstream/finnhub"
SECRET_STRING = json.dumps({"token": "local-dev-token"})
ACTIVE_TIMEOUT_S = 60.0
POLL_INTERVAL_S = 0.2


def _client(service):
    env = os.environ
    return boto3.client(
        service,
        endpoint_url=env.get("AWS_ENDPOINT_URL") or "http://127.0.0.1:4566",
        region_name=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",  # noqa: S106 - LocalStack's dummy credentials
    )


def _log(event, **fields):
    print(json.dumps({"event": f"localstack_init.{event}", **fields}), flush=True)


def ensure_stream(kinesis):
    try:
        kinesis.create_stream(StreamName=STREAM_NAME, ShardCount=SHARD_COUNT)
        _log("stream.created", stream=STREAM_NAME, shards=SHARD_COUNT)
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "ResourceInUseException":
            raise
        _log("stream.exists", stream=STREAM_NAME)
    deadline = time.monotonic() + ACTIVE_TIMEOUT_S
    while True:
        summary = kinesis.describe_stream_summary(StreamName=STREAM_NAME)
        status = summary["StreamDescriptionSummary"]["StreamStatus"]
        if status == "ACTIVE":
            _log("stream.active", stream=STREAM_NAME)
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"stream {STREAM_NAME} still {status} after {ACTIVE_TIMEOUT_S}s")
        time.sleep(POLL_INTERVAL_S)


def ensure_secret(secrets):
    try:
        secrets.create_secret(Name=SECRET_ID, SecretString=SECRET_STRING)
        _log("secret.created", secret=SECRET_ID)
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "ResourceExistsException":
            raise
        _log("secret.exists", secret=SECRET_ID)


def main():
    started = time.monotonic()
    ensure_stream(_client("kinesis"))
    ensure_secret(_client("secretsmanager"))
    _log("done", took_s=round(time.monotonic() - started, 3))


# "__main__": run as a script. Unset: exec()'d by LocalStack's init-hook runner.
if globals().get("__name__") in ("__main__", None):
    main()

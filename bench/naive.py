"""The naive baseline bench.py compares finnstream with: the same job, one symbol at a time.

Per symbol: one GET /quote with the token header (urllib, a new connection each time), then one
Kinesis PutRecord (boto3). No concurrency, no batching. Prints one JSON line `naive.done`.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.parse
import urllib.request

import boto3  # type: ignore[import-untyped]

TOKEN_HEADER = "X-Finnhub-Token"
FIELDS = {"price": "c", "open": "o", "high": "h", "low": "l", "previous_close": "pc"}
FIELDS |= {"change": "d", "change_percent": "dp"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--region", required=True)
    parser.add_argument("--stream", required=True)
    parser.add_argument("symbols", nargs="+")
    args = parser.parse_args()
    kinesis = boto3.client("kinesis", endpoint_url=args.endpoint, region_name=args.region)
    minute = int(time.time() // 60 * 60)
    start = time.monotonic()
    for symbol in args.symbols:
        url = f"{args.base_url}/quote?{urllib.parse.urlencode({'symbol': symbol})}"
        request = urllib.request.Request(url, headers={TOKEN_HEADER: args.token})
        with urllib.request.urlopen(request, timeout=5) as resp:
            body = json.load(resp)
        record = {"schema": 1, "symbol": symbol, "minute": minute, "source": "quote"}
        record |= {field: body[key] for field, key in FIELDS.items()}
        record |= {"volume": None, "quote_time": body["t"], "fetched_at": round(time.time(), 3)}
        data = json.dumps(record).encode() + b"\n"
        kinesis.put_record(StreamName=args.stream, Data=data, PartitionKey=symbol)
    took = time.monotonic() - start
    print(json.dumps({"event": "naive.done", "symbols": len(args.symbols), "took_s": took}))


if __name__ == "__main__":
    main()

"""finnstream: per-minute Finnhub quotes into AWS Kinesis, on time, without gaps."""

__version__ = "0.1.0"

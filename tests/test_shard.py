"""Sharding: a stable hash, slices that partition the symbols exactly, and a fair split."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finnstream.config import Config, ShardConfig, shard_of, shard_symbols

# Computed once (BLAKE2b, 8 bytes, big-endian % count); any change here moves symbols between
# running processes, so it must be deliberate.
EXPECTED = {
    "AAPL": [0, 2, 0, 4],
    "MSFT": [0, 2, 2, 2],
    "AMZN": [1, 0, 3, 7],
    "BRK.B": [0, 2, 2, 6],
    "^GSPC": [1, 2, 1, 1],
    "BTC-USD": [0, 0, 0, 4],
}
COUNTS = [2, 3, 4, 8]

tickers = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.^-:", min_size=1, max_size=10
).filter(lambda s: s.strip() == s)


def cfg(symbols: list[str], index: int = 0, count: int = 1) -> Config:
    return Config(symbols=symbols, shard=ShardConfig(index=index, count=count))


@pytest.mark.parametrize("symbol", sorted(EXPECTED))
def test_shard_of_is_stable(symbol: str) -> None:
    assert [shard_of(symbol, count) for count in COUNTS] == EXPECTED[symbol]


def test_one_shard_takes_everything() -> None:
    symbols = list(EXPECTED)

    assert all(shard_of(s, 1) == 0 for s in symbols)
    assert shard_symbols(cfg(symbols)) == symbols


def test_slices_keep_the_configured_order() -> None:
    symbols = [f"SYM{i:04d}" for i in range(200)]

    for index in range(4):
        mine = shard_symbols(cfg(symbols, index, 4))
        assert mine == [s for s in symbols if s in set(mine)]


@settings(max_examples=150, deadline=None, database=None)
@given(symbols=st.lists(tickers, min_size=1, max_size=60, unique=True), count=st.integers(1, 8))
def test_slices_partition_the_symbols_exactly(symbols: list[str], count: int) -> None:
    slices = [shard_symbols(cfg(symbols, index, count)) for index in range(count)]

    taken = [s for part in slices for s in part]
    assert sorted(taken) == sorted(symbols)  # every symbol once: none lost, none twice
    assert len(taken) == len(set(taken))
    for index, part in enumerate(slices):
        assert all(shard_of(s, count) == index for s in part)


@pytest.mark.parametrize("count", range(2, 9))
def test_a_thousand_symbols_split_roughly_evenly(count: int) -> None:
    symbols = [f"SYM{i:04d}" for i in range(1000)]

    sizes = Counter(shard_of(s, count) for s in symbols)

    assert set(sizes) == set(range(count))
    fair = 1000 / count
    assert all(0.75 * fair <= size <= 1.25 * fair for size in sizes.values()), sizes

"""The durable spool: round trips, order, ack, full policy, torn lines, laziness."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from finnstream.records import Record, gap_record, quote_record
from finnstream.spool import FULL_POLICY, SHED_TO_LEDGER, Spool, SpoolBatch, SpoolError

T0 = 1_718_000_040  # a minute slot


def quote(i: int, symbol: str = "AAPL") -> Record:
    body = {
        "c": 100.0 + i,
        "o": 99.5,
        "h": 101.0,
        "l": 99.0,
        "pc": 98.0,
        "d": 2.0,
        "dp": 2.04,
        "t": T0 + 60 * i,
    }
    return quote_record(symbol, T0 + 60 * i, body, fetched_at=T0 + 60 * i + 0.25)


def quotes(n: int, start: int = 0) -> list[Record]:
    return [quote(i) for i in range(start, start + n)]


def segment_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "spool").glob("*.jsonl"))


def drain(spool: Spool, max_records: int = 500) -> list[Record]:
    """Read everything and ack it all as delivered."""
    out: list[Record] = []
    for batch in spool.batches(max_records):
        out.extend(batch.records)
        spool.ack(batch)
    return out


def read_all(spool: Spool, max_records: int = 500) -> list[Record]:
    return [r for batch in spool.batches(max_records) for r in batch.records]


def test_round_trip_is_equal_and_durable_across_reopen(tmp_path: Path) -> None:
    records = [*quotes(3), gap_record("BRK.B", T0, "candles: 403, zurück später", T0 + 0.5)]
    spool = Spool(tmp_path, max_bytes=1 << 20)

    result = spool.append(records)

    assert result.written == records
    assert result.rejected == []
    assert read_all(spool) == records
    assert read_all(Spool(tmp_path, max_bytes=1 << 20)) == records


def test_on_disk_line_format(tmp_path: Path) -> None:
    record = quote(0)
    Spool(tmp_path, max_bytes=1 << 20).append([record])

    [segment] = segment_files(tmp_path)
    assert segment.name == "00000000000000000001.jsonl"
    line = segment.read_bytes()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert orjson.loads(line) == {
        "s": "AAPL",
        "m": T0,
        "src": "quote",
        "d": record.data.decode().removesuffix("\n"),
    }


def test_depth_is_known_after_reopen(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.append(quotes(7))
    depth = (spool.depth_records, spool.depth_bytes)

    reopened = Spool(tmp_path, max_bytes=1 << 20)

    assert depth[0] == 7
    assert (reopened.depth_records, reopened.depth_bytes) == depth
    assert reopened.depth_bytes == sum(p.stat().st_size for p in segment_files(tmp_path))


def test_oldest_first_across_segments_one_segment_per_batch(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=2_000)
    for start in range(0, 40, 4):
        spool.append(quotes(4, start))

    batches = list(spool.batches(max_records=3))

    assert len(segment_files(tmp_path)) > 3
    assert [r for b in batches for r in b.records] == quotes(40)
    assert all(1 <= len(b.records) <= 3 for b in batches)
    segment_ids = [b.segment_id for b in batches]
    assert segment_ids == sorted(segment_ids)


def test_ack_all_empties_the_spool_and_deletes_segments(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=2_000)
    spool.append(quotes(20))

    assert drain(spool, max_records=4) == quotes(20)

    assert (spool.depth_records, spool.depth_bytes) == (0, 0)
    assert segment_files(tmp_path) == []
    assert read_all(spool) == []
    assert read_all(Spool(tmp_path, max_bytes=1 << 20)) == []


def test_ack_with_undelivered_loses_nothing_and_doubles_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.append(quotes(10))
    first, second = list(spool.batches(max_records=5))
    failed = [first.records[1], first.records[3]]

    spool.ack(first, undelivered=failed)
    spool.ack(second)

    assert spool.depth_records == 2
    assert read_all(spool) == failed
    assert read_all(Spool(tmp_path, max_bytes=1 << 20)) == failed  # after a restart too


def test_undelivered_are_not_reread_in_the_same_drain(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.append(quotes(6))

    seen = 0
    for batch in spool.batches(max_records=2):  # an outage: nothing is delivered
        seen += len(batch.records)
        spool.ack(batch, undelivered=batch.records)

    assert seen == 6
    assert spool.depth_records == 6
    assert sorted(read_all(spool), key=lambda r: r.minute) == quotes(6)


def test_unacked_batch_stays_and_acked_one_is_not_reread(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.append(quotes(6))
    first, _second, third = list(spool.batches(max_records=2))

    spool.ack(first)
    spool.ack(third)

    assert spool.depth_records == 2
    assert read_all(spool) == quotes(2, start=2)


def test_ack_twice_is_harmless(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.append(quotes(4))
    first, second = list(spool.batches(max_records=2))

    spool.ack(first)
    spool.ack(first)

    assert spool.depth_records == 2
    assert read_all(spool) == second.records


def test_append_during_drain_is_kept(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.append(quotes(2))
    batches = spool.batches()
    batch = next(batches)

    spool.append([quote(2)])
    spool.ack(batch)

    assert list(batches) == []  # the drain saw the segment as it was when it reached it
    assert read_all(spool) == [quote(2)]
    assert read_all(Spool(tmp_path, max_bytes=1 << 20)) == [quote(2)]


def test_full_rejects_what_does_not_fit_and_logs_once(tmp_path: Path) -> None:
    line = len(orjson.dumps({"s": "AAPL"})) + len(quote(0).data) + 40  # about one line
    spool = Spool(tmp_path, max_bytes=3 * line)
    records = quotes(5)

    with capture_logs() as logs:
        first = spool.append(records)
        second = spool.append(quotes(2, start=5))

    assert FULL_POLICY == SHED_TO_LEDGER == "shed-to-ledger"
    assert first.written == records[: len(first.written)]
    assert first.rejected == records[len(first.written) :]
    assert 1 <= len(first.written) < 5
    assert second.written == []
    assert spool.full
    assert spool.rejected_total == len(first.rejected) + 2
    assert spool.disk_bytes <= spool.max_bytes
    full_events = [e for e in logs if e["event"] == "spool.full"]
    assert len(full_events) == 1
    assert full_events[0]["max_bytes"] == 3 * line
    assert full_events[0]["depth_records"] == len(first.written)


def test_room_after_ack_ends_full(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1_000)
    spool.append(quotes(10))
    assert spool.full

    drain(spool)

    assert not spool.full
    result = spool.append([quote(20)])
    assert result.written == [quote(20)]


def test_torn_last_line_is_skipped_counted_and_appends_stay_clean(tmp_path: Path) -> None:
    Spool(tmp_path, max_bytes=1 << 20).append(quotes(3))
    [segment] = segment_files(tmp_path)
    with segment.open("ab") as f:
        f.write(b'{"s":"AAPL","m":1718000')  # the crash came mid-write

    with capture_logs() as logs:
        spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.append([quote(3)])

    assert spool.torn_lines == 1
    assert spool.depth_records == 4
    torn = [e for e in logs if e["event"] == "spool.torn_line"]
    assert [(e["file"], e["line"]) for e in torn] == [(str(segment), 4)]
    reopened = Spool(tmp_path, max_bytes=1 << 20)
    assert reopened.torn_lines == 0
    assert read_all(reopened) == quotes(4)


@pytest.mark.parametrize(
    "bad",
    [
        b"\xff\xfe not utf-8\n",
        b"[1, 2]\n",
        b'{"s": "AAPL", "m": "x", "src": "quote", "d": "{}"}\n',
        b"{not json\n",
    ],
)
def test_corrupt_line_mid_file_is_skipped_once(tmp_path: Path, bad: bytes) -> None:
    Spool(tmp_path, max_bytes=1 << 20).append(quotes(2))
    [segment] = segment_files(tmp_path)
    with segment.open("ab") as f:
        f.write(bad)
    Spool(tmp_path, max_bytes=1 << 20).append(quotes(2, start=2))

    spool = Spool(tmp_path, max_bytes=1 << 20)

    assert spool.torn_lines == 1
    assert spool.depth_records == 4
    assert drain(spool, max_records=2) == quotes(4)
    assert spool.torn_lines == 1
    assert segment_files(tmp_path) == []


def test_segment_of_only_bad_lines_is_cleaned_up(tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "00000000000000000001.jsonl").write_bytes(b"junk\nmore junk\n")

    spool = Spool(tmp_path, max_bytes=1 << 20)

    assert spool.torn_lines == 2
    assert spool.depth_records == 0
    assert read_all(spool) == []
    assert segment_files(tmp_path) == []
    spool.append([quote(0)])
    assert read_all(spool) == [quote(0)]


def test_batches_are_lazy_one_segment_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 24, segment_bytes=4_000)
    for start in range(0, 200, 10):
        spool.append(quotes(10, start))
    segments = segment_files(tmp_path)
    opened: list[Path] = []
    real_open = Path.open

    def tracking_open(self: Path, *args: Any, **kwargs: Any) -> Any:
        opened.append(self)
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", tracking_open)
    batches: Iterator[SpoolBatch] = spool.batches(max_records=5)
    assert opened == []  # nothing is read before the first batch is asked for

    first = next(batches)

    assert len(segments) > 10
    assert set(opened) == {segments[0]}
    assert first.records == quotes(5)


def test_batches_memory_is_bounded_by_a_batch(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 26, segment_bytes=1 << 20)
    chunk = quotes(1_000)
    for _ in range(12):
        spool.append(chunk)
    assert spool.depth_bytes > 3_000_000

    tracemalloc.start()
    try:
        count = sum(len(batch.records) for batch in spool.batches(max_records=100))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert count == 12_000
    assert peak < spool.depth_bytes // 5


def test_failed_write_raises_clearly_and_leaves_no_torn_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.append(quotes(2))

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    with monkeypatch.context() as m:
        m.setattr("finnstream.spool.os.fsync", broken_fsync)
        with pytest.raises(SpoolError, match="cannot be written"):
            spool.append(quotes(2, start=2))

    assert spool.depth_records == 2
    reopened = Spool(tmp_path, max_bytes=1 << 20)
    assert reopened.torn_lines == 0
    assert read_all(reopened) == quotes(2)


def test_one_batch_per_fresh_iterator_drains_everything_once(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=2_000)
    spool.append(quotes(12))
    delivered: list[Record] = []

    while (batch := next(iter(spool.batches(max_records=5)), None)) is not None:
        delivered.extend(batch.records)
        spool.ack(batch)

    assert delivered == quotes(12)
    assert spool.depth_records == 0
    assert segment_files(tmp_path) == []

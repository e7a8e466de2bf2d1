"""Pure batching for PutRecords: count, bytes (keys included), linger, and picking failures."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from finnstream.batcher import (
    MAX_BYTES_PER_PUT,
    MAX_BYTES_PER_RECORD,
    MAX_RECORDS_PER_PUT,
    Accumulator,
    RecordTooLarge,
    pick_failed,
    record_size,
    split_batches,
)
from finnstream.records import Record

MINUTE = 1_718_000_040


def rec(i: int, symbol: str = "AAPL", size: int | None = None) -> Record:
    data = b'{"i":%d}\n' % i if size is None else b"x" * (size - 1) + b"\n"
    return Record(symbol, MINUTE + 60 * i, "quote", data)


def ok(i: int) -> dict[str, Any]:
    return {"SequenceNumber": f"4960{i:020d}", "ShardId": "shardId-000000000000"}


def failed(code: str) -> dict[str, Any]:
    return {"ErrorCode": code, "ErrorMessage": f"{code} for this record"}


# --- split_batches ---------------------------------------------------------------------------


def test_1234_small_records_make_500_500_234_in_order() -> None:
    records = [rec(i) for i in range(1234)]

    batches = split_batches(records)

    assert [len(b) for b in batches] == [500, 500, 234]
    assert [r for b in batches for r in b.records] == records
    assert all(b.size == sum(record_size(r) for r in b.records) for b in batches)


def test_exactly_500_is_one_batch_and_nothing_is_none() -> None:
    assert [len(b) for b in split_batches([rec(i) for i in range(500)])] == [500]
    assert [len(b) for b in split_batches([rec(i) for i in range(501)])] == [500, 1]
    assert split_batches([]) == []


def test_batches_stay_under_5_mib_counting_partition_keys() -> None:
    # 12 of these fit in 5 MiB on data alone, but only 11 once the 4-byte keys count
    size = MAX_BYTES_PER_PUT // 12
    assert 12 * size <= MAX_BYTES_PER_PUT < 12 * (size + len("AAPL"))
    records = [rec(i, size=size) for i in range(30)]

    batches = split_batches(records)

    assert [len(b) for b in batches] == [11, 11, 8]
    assert [r for b in batches for r in b.records] == records
    for batch in batches:
        assert sum(len(r.data) + len(r.partition_key.encode()) for r in batch.records) <= (
            MAX_BYTES_PER_PUT
        )


def test_400_kib_records_fill_batches_near_the_byte_limit() -> None:
    records = [rec(i, size=400 * 1024) for i in range(40)]

    batches = split_batches(records)

    assert [len(b) for b in batches] == [12, 12, 12, 4]
    assert all(b.size <= MAX_BYTES_PER_PUT for b in batches)


def test_partition_key_bytes_are_utf8_bytes() -> None:
    record = rec(0, symbol="株式")

    assert record_size(record) == len(record.data) + 6


def test_a_record_of_exactly_1_mib_with_its_key_is_accepted() -> None:
    record = rec(0, size=MAX_BYTES_PER_RECORD - len("AAPL"))

    assert [len(b) for b in split_batches([record])] == [1]


def test_a_record_over_1_mib_raises() -> None:
    big = rec(1, size=MAX_BYTES_PER_RECORD - len("AAPL") + 1)

    with pytest.raises(RecordTooLarge, match="1 MiB"):
        split_batches([rec(0), big])


def test_a_partition_key_of_257_characters_raises() -> None:
    with pytest.raises(RecordTooLarge, match="257"):
        split_batches([rec(0, symbol="A" * 257)])
    assert len(split_batches([rec(0, symbol="A" * 256)])) == 1


def test_an_empty_partition_key_raises() -> None:
    with pytest.raises(RecordTooLarge):
        Accumulator().add(rec(0, symbol=""), 0.0)


# --- Accumulator -----------------------------------------------------------------------------


def test_accumulator_closes_on_count() -> None:
    acc = Accumulator(linger_s=1.0)
    closed = [b for i in range(MAX_RECORDS_PER_PUT + 3) if (b := acc.add(rec(i), 0.0))]

    assert [len(b) for b in closed] == [500]
    assert closed[0].records == [rec(i) for i in range(500)]
    assert len(acc) == 3


def test_accumulator_closes_on_bytes_and_keeps_the_record_that_did_not_fit() -> None:
    acc = Accumulator()
    size = 900 * 1024  # five fit in 5 MiB, six do not
    big = [rec(i, size=size) for i in range(6)]

    assert [acc.add(r, 0.0) for r in big[:5]] == [None] * 5
    closed = acc.add(big[5], 0.5)

    assert closed is not None
    assert closed.records == big[:5]
    assert len(acc) == 1
    rest = acc.drain()
    assert rest is not None
    assert rest.records == big[5:]
    assert rest.opened_at == 0.5


def test_accumulator_closes_on_linger() -> None:
    acc = Accumulator(linger_s=1.0)
    acc.add(rec(0), now=100.0)
    acc.add(rec(1), now=100.7)

    assert acc.due(100.99) is None
    batch = acc.due(101.0)

    assert batch is not None
    assert batch.records == [rec(0), rec(1)]
    assert len(acc) == 0
    assert acc.due(500.0) is None


def test_linger_counts_from_the_first_record_of_a_batch() -> None:
    acc = Accumulator(linger_s=2.0)
    acc.add(rec(0), now=10.0)
    acc.due(12.0)
    acc.add(rec(1), now=13.0)

    assert acc.due(14.9) is None
    assert acc.due(15.0) is not None


def test_drain_returns_what_is_open_then_none() -> None:
    acc = Accumulator()
    assert acc.drain() is None

    acc.add(rec(0), 0.0)
    batch = acc.drain()

    assert batch is not None
    assert batch.records == [rec(0)]
    assert acc.drain() is None
    assert len(acc) == 0


# --- pick_failed -----------------------------------------------------------------------------


def test_pick_failed_returns_exactly_the_failed_records_in_order() -> None:
    sent = [rec(i) for i in range(6)]
    answer = {
        "FailedRecordCount": 3,
        "Records": [
            ok(0),
            failed("ProvisionedThroughputExceededException"),
            ok(2),
            failed("InternalFailure"),
            failed("ProvisionedThroughputExceededException"),
            ok(5),
        ],
    }

    failed_records, codes = pick_failed(sent, answer)

    assert failed_records == [sent[1], sent[3], sent[4]]
    assert codes == Counter({"ProvisionedThroughputExceededException": 2, "InternalFailure": 1})


def test_pick_failed_with_every_record_accepted_is_empty() -> None:
    sent = [rec(i) for i in range(3)]

    failed_records, codes = pick_failed(
        sent, {"FailedRecordCount": 0, "Records": [ok(i) for i in range(3)]}
    )

    assert failed_records == []
    assert not codes


@pytest.mark.parametrize(
    "answer",
    [
        {"FailedRecordCount": 0, "Records": [ok(0), ok(1)]},
        {"FailedRecordCount": 0, "Records": [ok(i) for i in range(4)]},
        {"FailedRecordCount": 0},
        {"Records": None},
        {},
    ],
    ids=["short", "long", "missing", "null", "empty"],
)
def test_an_answer_of_the_wrong_length_fails_everything(answer: dict[str, Any]) -> None:
    sent = [rec(i) for i in range(3)]

    failed_records, codes = pick_failed(sent, answer)

    assert failed_records == sent
    assert sum(codes.values()) == 3


def test_an_entry_without_sequence_number_or_error_counts_as_failed() -> None:
    sent = [rec(i) for i in range(3)]

    failed_records, codes = pick_failed(sent, {"Records": [ok(0), {}, "junk"]})

    assert failed_records == [sent[1], sent[2]]
    assert sum(codes.values()) == 2

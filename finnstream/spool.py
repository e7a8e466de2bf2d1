"""The durable spool: every record Kinesis has not accepted waits here, on disk, until it has.

Layout: `<dir>/spool/00000000000000000001.jsonl`, ... Each line is one orjson object
`{"s": symbol, "m": minute, "src": source, "d": data}` where `d` is the record's encoded JSON
without its trailing newline. Appends go to the newest segment (rotated at `segment_bytes`) and
are flushed and fsynced before `append` returns; the directory is fsynced whenever a segment is
created or deleted.

Reading is lazy: `batches()` walks segments oldest first, one bounded batch at a time, and never
holds more than one batch in memory. `ack()` retires a batch: its delivered records are gone, its
undelivered ones are re-appended (fsynced) before the old range is retired, so a crash in between
duplicates records and never loses one. Retired byte ranges are kept in memory; a segment file is
deleted once every byte of it is retired. After a restart, whatever is still on disk is read
again, including the acked part of a segment whose drain did not finish (at-least-once; consumers
deduplicate on (symbol, minute, source)).

A torn tail (a crash mid-write) is counted in `torn_lines`, logged and truncated away on open, so
the next append starts on a clean line; other corrupt lines are skipped and counted once.

Full policy `SHED_TO_LEDGER`: when an append would take the spool past `max_bytes`, the records
that do not fit are not written and come back in `AppendResult.rejected`, for the caller to put
into the gap ledger. Re-appends of undelivered records in `ack()` are never rejected: they are
already counted, and the range they come from is retired right after.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import orjson
import structlog

from finnstream.errors import FinnstreamError
from finnstream.records import Record

log = structlog.get_logger(__name__)

FULL_POLICY = "shed-to-ledger"
SHED_TO_LEDGER = FULL_POLICY
SEGMENT_BYTES = 8 * 1024 * 1024
SUBDIR = "spool"
_SUFFIX = ".jsonl"
_ID_WIDTH = 20
_SKIP_CHUNK = 1024 * 1024


class SpoolError(FinnstreamError):
    """The spool directory cannot be read or written (permissions, disk full, I/O error)."""


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What `append` did: `written` are durable on disk, `rejected` did not fit (spool full)."""

    written: list[Record]
    rejected: list[Record]


@dataclass(frozen=True, slots=True)
class SpoolBatch:
    """Records read from one contiguous byte range `[start, end)` of one segment."""

    records: list[Record]
    segment_id: int
    start: int
    end: int


@dataclass(slots=True)
class _Segment:
    seg_id: int
    path: Path
    size: int = 0
    records: int = 0
    retired: list[tuple[int, int]] = field(default_factory=list)  # merged, sorted byte ranges
    retired_records: int = 0
    bad_offsets: set[int] = field(default_factory=set)

    @property
    def retired_bytes(self) -> int:
        return sum(end - start for start, end in self.retired)

    @property
    def fully_retired(self) -> bool:
        return self.retired == [(0, self.size)]

    def is_retired(self, start: int, end: int) -> bool:
        return any(a <= start and end <= b for a, b in self.retired)

    def retire(self, start: int, end: int) -> None:
        self.retired = _merge([*self.retired, (start, end)])

    def next_free(self, offset: int) -> tuple[int, int | None]:
        """First un-retired offset at or after `offset`; where the next retired range begins."""
        for a, b in self.retired:
            if a <= offset < b:
                offset = b
            elif offset < a:
                return offset, a
        return offset, None


@dataclass(slots=True)
class _Chunk:
    """What one read of a segment produced (records may be empty if only bad lines were read)."""

    records: list[Record]
    start: int
    end: int
    next_line: int


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def encode_line(record: Record) -> bytes:
    """One spool line for `record`: its data (which ends in a newline) stored without it."""
    data = record.data.removesuffix(b"\n").decode("utf-8")
    obj = {"s": record.symbol, "m": record.minute, "src": record.source, "d": data}
    return orjson.dumps(obj) + b"\n"


def decode_line(line: bytes) -> Record | None:
    """The record on a complete spool line, or None if the line is torn or not a spool line."""
    if not line.endswith(b"\n"):
        return None
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:  # also raised for invalid UTF-8
        return None
    if not isinstance(obj, dict):
        return None
    symbol, minute, source, data = obj.get("s"), obj.get("m"), obj.get("src"), obj.get("d")
    if not (isinstance(symbol, str) and isinstance(source, str) and isinstance(data, str)):
        return None
    if isinstance(minute, bool) or not isinstance(minute, int):
        return None
    return Record(symbol, minute, source, data.encode("utf-8") + b"\n")


def _segment_name(seg_id: int) -> str:
    return f"{seg_id:0{_ID_WIDTH}d}{_SUFFIX}"


def _segment_id(path: Path) -> int | None:
    stem = path.name.removesuffix(_SUFFIX)
    if path.name.endswith(_SUFFIX) and len(stem) == _ID_WIDTH and stem.isdigit():
        return int(stem)
    return None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _skip_lines(f: BinaryIO, nbytes: int) -> int:
    """Read past `nbytes` bytes of `f` in bounded chunks; return how many lines they held."""
    lines = 0
    while nbytes > 0:
        chunk = f.read(min(nbytes, _SKIP_CHUNK))
        if not chunk:
            break
        lines += chunk.count(b"\n")
        nbytes -= len(chunk)
    return lines


class Spool:
    """A bounded, append-only, segment-file spool of records not yet delivered.

    Opening raises `OSError` when the directory cannot be created or read (the caller turns it
    into a config error); later I/O failures raise `SpoolError`.
    """

    def __init__(
        self, directory: Path, max_bytes: int, *, segment_bytes: int = SEGMENT_BYTES
    ) -> None:
        if max_bytes <= 0 or segment_bytes <= 0:
            raise ValueError("max_bytes and segment_bytes must be positive")
        self.path = Path(directory) / SUBDIR
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.rejected_total = 0
        self._torn_lines = 0
        self._full = False
        self._lock = threading.Lock()
        self._segments: dict[int, _Segment] = {}
        self._active: _Segment | None = None
        self._next_id = 1
        self.path.mkdir(parents=True, exist_ok=True)  # OSError here: the caller names the config
        self._scan()
        log.info(
            "spool.opened",
            dir=str(self.path),
            records=self.depth_records,
            bytes=self.depth_bytes,
            segments=len(self._segments),
            torn_lines=self._torn_lines,
        )

    # -- state -----------------------------------------------------------------------------

    @property
    def depth_records(self) -> int:
        """Records in the spool not yet acked as delivered."""
        return sum(s.records - s.retired_records for s in list(self._segments.values()))

    @property
    def depth_bytes(self) -> int:
        """Bytes of spool lines not yet acked (what a fresh open of the spool would find)."""
        return sum(s.size - s.retired_bytes for s in list(self._segments.values()))

    @property
    def disk_bytes(self) -> int:
        """Bytes of segment files on disk: what `max_bytes` bounds."""
        return sum(s.size for s in list(self._segments.values()))

    @property
    def torn_lines(self) -> int:
        """Corrupt or torn lines skipped since open."""
        return self._torn_lines

    @property
    def full(self) -> bool:
        """True since an append was refused for lack of room, until room is made or one fits."""
        return self._full

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    # -- open ------------------------------------------------------------------------------

    def _scan(self) -> None:
        paths = sorted(
            (seg_id, p) for p in self.path.iterdir() if (seg_id := _segment_id(p)) is not None
        )
        for seg_id, p in paths:
            self._next_id = max(self._next_id, seg_id + 1)
            seg = self._scan_segment(seg_id, p)
            if seg.size == 0:
                p.unlink()
                _fsync_dir(self.path)
                continue
            self._segments[seg_id] = seg
        if self._segments:
            self._active = self._segments[max(self._segments)]

    def _scan_segment(self, seg_id: int, path: Path) -> _Segment:
        seg = _Segment(seg_id, path)
        offset = 0
        with path.open("r+b") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.endswith(b"\n"):
                    self._count_torn(path, line_no, "no newline at end of file")
                    f.truncate(offset)
                    f.flush()
                    os.fsync(f.fileno())
                    break
                if decode_line(line) is None:
                    self._count_torn(path, line_no, "not a spool record")
                    seg.bad_offsets.add(offset)
                else:
                    seg.records += 1
                offset += len(line)
        seg.size = offset
        return seg

    def _count_torn(self, path: Path, line_no: int, reason: str) -> None:
        self._torn_lines += 1
        log.warning("spool.torn_line", file=str(path), line=line_no, reason=reason)

    # -- append ----------------------------------------------------------------------------

    def append(self, records: Sequence[Record]) -> AppendResult:
        """Write `records` durably (fsynced), oldest first; those that do not fit are rejected."""
        lines = [encode_line(r) for r in records]
        with self._lock:
            room = self.max_bytes - self.disk_bytes
            n_fit = 0
            for line in lines:
                if len(line) > room:
                    break
                room -= len(line)
                n_fit += 1
            self._write(lines[:n_fit])
            written, rejected = list(records[:n_fit]), list(records[n_fit:])
            self._note_rejected(len(rejected))
        return AppendResult(written, rejected)

    def _note_rejected(self, n: int) -> None:
        if n == 0:
            self._full = False
            return
        self.rejected_total += n
        if not self._full:
            self._full = True
            log.warning(
                "spool.full",
                policy=FULL_POLICY,
                depth_records=self.depth_records,
                depth_bytes=self.depth_bytes,
                disk_bytes=self.disk_bytes,
                max_bytes=self.max_bytes,
                rejected=n,
            )

    def _write(self, lines: list[bytes]) -> None:
        """Append lines to the newest segment, rotating as needed; fsync before returning."""
        i = 0
        while i < len(lines):
            seg = self._writable_segment(len(lines[i]))
            group_bytes, j = 0, i
            while j < len(lines) and (
                j == i or seg.size + group_bytes + len(lines[j]) <= self.segment_bytes
            ):
                group_bytes += len(lines[j])
                j += 1
            self._write_group(seg, b"".join(lines[i:j]), j - i)
            i = j

    def _writable_segment(self, first_line: int) -> _Segment:
        seg = self._active
        if seg is None or (seg.size > 0 and seg.size + first_line > self.segment_bytes):
            seg = _Segment(self._next_id, self.path / _segment_name(self._next_id))
            self._next_id += 1
            try:
                seg.path.touch(exist_ok=False)
                _fsync_dir(self.path)
            except OSError as exc:
                raise SpoolError(
                    f"The spool segment {seg.path} cannot be created ({exc})."
                ) from exc
            self._segments[seg.seg_id] = seg
            self._active = seg
            log.debug("spool.segment_created", file=str(seg.path))
        return seg

    def _write_group(self, seg: _Segment, blob: bytes, n_records: int) -> None:
        try:
            with seg.path.open("ab") as f:
                try:
                    f.write(blob)
                    f.flush()
                    os.fsync(f.fileno())
                except OSError:
                    f.truncate(seg.size)  # never leave a torn tail for the next append
                    raise
        except OSError as exc:
            raise SpoolError(f"The spool segment {seg.path} cannot be written ({exc}).") from exc
        seg.size += len(blob)
        seg.records += n_records

    # -- read ------------------------------------------------------------------------------

    def batches(self, max_records: int = 500) -> Iterator[SpoolBatch]:
        """Un-acked records, oldest first, in batches of at most `max_records` from one segment.

        Lazy: one batch is read per step. Reaching the newest segment seals it: later appends
        (and re-appended undelivered records) go to a new segment, left for the next call.
        """
        if max_records < 1:
            raise ValueError("max_records must be at least 1")
        with self._lock:
            seg_ids = sorted(self._segments)
        for seg_id in seg_ids:
            yield from self._segment_batches(seg_id, max_records)

    def _segment_batches(self, seg_id: int, max_records: int) -> Iterator[SpoolBatch]:
        offset, line_no, limit = 0, 1, None
        while True:
            with self._lock:
                seg = self._segments.get(seg_id)
                if seg is None:
                    return
                if limit is None:  # first visit: seal it, so it can be retired as a whole
                    limit = seg.size
                    if self._active is seg:
                        self._active = None
                chunk = self._read_chunk(seg, offset, line_no, limit, max_records)
                if chunk is None:
                    return
                if not chunk.records:  # only bad lines: nothing to deliver, retire the range
                    self._retire(seg, chunk.start, chunk.end, 0)
            offset, line_no = chunk.end, chunk.next_line
            if chunk.records:
                yield SpoolBatch(chunk.records, seg_id, chunk.start, chunk.end)

    def _read_chunk(
        self, seg: _Segment, offset: int, line_no: int, limit: int, max_records: int
    ) -> _Chunk | None:
        start, retired_at = seg.next_free(offset)
        stop = limit if retired_at is None else min(limit, retired_at)
        if start >= stop:
            return None
        records: list[Record] = []
        try:
            with seg.path.open("rb") as f:
                f.seek(offset)
                line_no += _skip_lines(f, start - offset)
                pos = start
                while pos < stop and (line := f.readline()):
                    record = decode_line(line)
                    if record is not None and len(records) == max_records:
                        break
                    if record is None:
                        self._note_bad_line(seg, pos, line_no)
                    else:
                        records.append(record)
                    pos += len(line)
                    line_no += 1
        except OSError as exc:
            raise SpoolError(f"The spool segment {seg.path} cannot be read ({exc}).") from exc
        if pos == start:  # the file is shorter than we knew: nothing more to read
            return None
        return _Chunk(records, start, pos, line_no)

    def _note_bad_line(self, seg: _Segment, offset: int, line_no: int) -> None:
        if offset not in seg.bad_offsets:
            seg.bad_offsets.add(offset)
            self._count_torn(seg.path, line_no, "not a spool record")

    # -- ack -------------------------------------------------------------------------------

    def ack(self, batch: SpoolBatch, undelivered: Sequence[Record] = ()) -> None:
        """Retire `batch`: delivered records are gone; `undelivered` are re-appended first."""
        with self._lock:
            seg = self._segments.get(batch.segment_id)
            if seg is None or seg.is_retired(batch.start, batch.end):
                log.debug("spool.ack_ignored", segment=batch.segment_id, start=batch.start)
                return
            if undelivered:
                self._write([encode_line(r) for r in undelivered])
            self._retire(seg, batch.start, batch.end, len(batch.records))

    def _retire(self, seg: _Segment, start: int, end: int, n_records: int) -> None:
        seg.retire(start, end)
        seg.retired_records += n_records
        if not seg.fully_retired:
            return
        try:
            seg.path.unlink(missing_ok=True)
            _fsync_dir(self.path)
        except OSError as exc:
            raise SpoolError(f"The spool segment {seg.path} cannot be deleted ({exc}).") from exc
        del self._segments[seg.seg_id]
        if self._active is seg:
            self._active = None
        self._full = False
        log.debug("spool.segment_deleted", file=str(seg.path))

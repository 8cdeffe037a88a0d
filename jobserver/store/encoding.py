"""The bytes the sqlite store keeps: a segment of job records, and a list of finished records.

A segment is the records of one group commit in one msgpack array, each record an array of
the StoredJob fields in order:

    [record_id, function, unique, priority, run_at, reducer, payload]

(integers as msgpack ints, byte strings as msgpack bin). msgpack is a format with a published
specification and readers in every language, so an operator can inspect or salvage a database
without this code; it is also packed in C, which is what lets one commit write hundreds of
records for little more than the cost of writing one (issue 4, group commit throughput).

A finished list is the ids of a segment's records that are done, each 8 bytes little-endian,
appended to as jobs finish, so a finished job costs 8 bytes written and no rewrite.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import msgpack

from ..engine.journal import StoredJob

MAX_PRIORITY = 2  # 0 HIGH, 1 NORMAL, 2 LOW, as gearmand's queues number them (§5)

RECORD_ID = struct.Struct("<q")


class DamagedSegment(ValueError):
    """The bytes are not a segment this store wrote; the message says what is wrong."""


def pack_segment(jobs: Sequence[StoredJob]) -> bytes:
    return msgpack.packb(jobs, use_bin_type=True)


def unpack_segment(blob: bytes) -> list[StoredJob]:
    """The records of a segment, checked field by field: a record that cannot be a job is
    refused (DamagedSegment), never guessed at."""
    try:
        records = msgpack.unpackb(blob, use_list=False, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise DamagedSegment(f"not a msgpack segment ({error})") from None
    if type(records) is not tuple or not records:
        raise DamagedSegment("a segment must be a non-empty array of records")
    return [check_record(record) for record in records]


def check_record(record: object) -> StoredJob:
    """The record as a StoredJob if each field is what a job needs; else DamagedSegment."""
    if type(record) is not tuple or len(record) != len(StoredJob._fields):
        raise DamagedSegment(f"a record must be an array of {len(StoredJob._fields)} fields")
    record_id, function, unique, priority, run_at, reducer, payload = record
    if type(record_id) is not int or record_id < 1:
        raise DamagedSegment(f"record id {record_id!r} (must be a positive integer)")
    for name, value in (
        ("function", function),
        ("unique", unique),
        ("reducer", reducer),
        ("payload", payload),
    ):
        if type(value) is not bytes:
            raise DamagedSegment(f"record {record_id} has a {name} that is not bytes")
    if type(priority) is not int or not 0 <= priority <= MAX_PRIORITY:
        raise DamagedSegment(f"record {record_id} has priority {priority!r} (must be 0, 1 or 2)")
    if type(run_at) is not int:
        raise DamagedSegment(
            f"record {record_id} has run_at {run_at!r} (must be an integer unix time)"
        )
    return StoredJob(record_id, function, unique, priority, run_at, reducer, payload)


def pack_record_ids(record_ids: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(record_ids)}q", *record_ids)


def unpack_record_ids(blob: bytes) -> set[int]:
    if len(blob) % RECORD_ID.size:
        raise DamagedSegment(f"a finished list of {len(blob)} bytes (not whole 8-byte ids)")
    return {record_id for (record_id,) in RECORD_ID.iter_unpack(blob)}

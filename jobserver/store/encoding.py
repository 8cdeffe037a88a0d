"""The bytes the sqlite store keeps: a segment of job records, a list of finished records, and
a dead job (at the end of this file).

A segment is the records of one group commit in one msgpack array, each record an array of
the StoredJob fields in order:

    [record_id, function, unique, priority, run_at, reducer, payload]

or, for a job waiting for another attempt after failing, three more fields:

    [..., payload, attempts, first_failed_ms, last_error]

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

from ..engine.journal import DeadJob, StoredJob

MAX_PRIORITY = 2  # 0 HIGH, 1 NORMAL, 2 LOW, as gearmand's queues number them (§5)

RECORD_ID = struct.Struct("<q")


class DamagedSegment(ValueError):
    """The bytes are not a segment this store wrote; the message says what is wrong."""


BASE_FIELDS = 7
"""Fields of a job that has never failed; the three about failures are left out of its record."""


def pack_segment(jobs: Sequence[StoredJob]) -> bytes:
    return msgpack.packb(
        [job if job[BASE_FIELDS] else job[:BASE_FIELDS] for job in jobs], use_bin_type=True
    )


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
    if type(record) is not tuple or len(record) not in (BASE_FIELDS, len(StoredJob._fields)):
        raise DamagedSegment(
            f"a record must be an array of {BASE_FIELDS} or {len(StoredJob._fields)} fields"
        )
    record_id, function, unique, priority, run_at, reducer, payload = record[:BASE_FIELDS]
    attempts, first_failed_ms, last_error = record[BASE_FIELDS:] or (0, 0, b"")
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
    if type(attempts) is not int or attempts < 0 or type(first_failed_ms) is not int:
        raise DamagedSegment(f"record {record_id} has a malformed count of failed attempts")
    if type(last_error) is not bytes:
        raise DamagedSegment(f"record {record_id} has a last error that is not bytes")
    return StoredJob(
        record_id,
        function,
        unique,
        priority,
        run_at,
        reducer,
        payload,
        attempts,
        first_failed_ms,
        last_error,
    )


def pack_record_ids(record_ids: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(record_ids)}q", *record_ids)


def unpack_record_ids(blob: bytes) -> set[int]:
    if len(blob) % RECORD_ID.size:
        raise DamagedSegment(f"a finished list of {len(blob)} bytes (not whole 8-byte ids)")
    return {record_id for (record_id,) in RECORD_ID.iter_unpack(blob)}


# --- the dead set ---------------------------------------------------------------------------
# A dead job (engine/journal.py DeadJob) is one row of the `dead` table, keyed by its dead id;
# the row's record is the job's other fields in order, as one msgpack array:
#
#     [handle, function, unique, priority, reducer, payload, attempts, first_failed_ms,
#      last_failed_ms, error]


class DamagedDeadJob(ValueError):
    """The bytes are not a dead job this store wrote; the message says what is wrong."""


DEAD_FIELDS = len(DeadJob._fields) - 1
"""Fields in a dead job's record: all of DeadJob's but its id, which is the row's key."""


def pack_dead(dead: DeadJob) -> bytes:
    record: bytes = msgpack.packb(dead[1:], use_bin_type=True)
    return record


def unpack_dead(dead_id: int, blob: bytes) -> DeadJob:
    """The dead job `dead_id` from its record, checked field by field as check_record checks
    a job's: a record that cannot be a dead job is refused (DamagedDeadJob), never guessed at."""
    try:
        record = msgpack.unpackb(blob, use_list=False, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise DamagedDeadJob(f"not a msgpack record ({error})") from None
    if type(record) is not tuple or len(record) != DEAD_FIELDS:
        raise DamagedDeadJob(f"a record must be an array of {DEAD_FIELDS} fields")
    (
        handle,
        function,
        unique,
        priority,
        reducer,
        payload,
        attempts,
        first_failed_ms,
        last_failed_ms,
        failure,
    ) = record
    for name, value in (
        ("handle", handle),
        ("function", function),
        ("unique", unique),
        ("reducer", reducer),
        ("payload", payload),
        ("error", failure),
    ):
        if type(value) is not bytes:
            raise DamagedDeadJob(f"its {name} is not bytes")
    if type(priority) is not int or not 0 <= priority <= MAX_PRIORITY:
        raise DamagedDeadJob(f"priority {priority!r} (must be 0, 1 or 2)")
    if type(attempts) is not int or attempts < 0:
        raise DamagedDeadJob(f"attempts {attempts!r} (must be a count)")
    for name, value in (("first", first_failed_ms), ("last", last_failed_ms)):
        if type(value) is not int:
            raise DamagedDeadJob(f"its {name} failure time {value!r} is not unix milliseconds")
    return DeadJob(dead_id, *record)

"""PostgreSQL's binary COPY format for job rows, built with struct instead of row by row.

psycopg's `Copy.write_row` adapts each of a row's eleven fields in turn; for the 200-job
batches of a busy server that was ~2.9 µs of CPU per job in the store thread, under the GIL
the event loop needs. Packing the fixed-size fields of a row with four precompiled Structs and
joining once per batch costs ~0.5 µs per job (1.4 µs with the COPY itself: measured with
100-byte payloads, 200-row batches). The format: a signature, flags and an empty header
extension; per row, the field count, then each field as a 4-byte length and its bytes
(integers big-endian at their column's width); a -1 field count ends the data.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from ..engine.journal import StoredJob

SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)  # no OIDs, no extension
TRAILER = struct.pack(">h", -1)

JOB_FIELDS = 11
"""owner, then StoredJob's ten fields, in the order of pg_schema.COPY_JOBS's column list."""

_ID_FUNCTION = struct.Struct(">iqi")  # 8, record_id (int8), len(function)
_LENGTH = struct.Struct(">i")
_PRIORITY_RUN_AT_REDUCER = struct.Struct(">ihiqi")  # 2, priority (int2), 8, run_at, len(reducer)
_FAILURES = struct.Struct(">iiiqi")  # 4, attempts (int4), 8, first_failed_ms, len(last_error)


def job_rows(owner: str, jobs: Iterable[StoredJob]) -> bytes:
    """The whole COPY data (signature to trailer) of `jobs`, owned by `owner`."""
    owner_bytes = owner.encode()
    row_head = struct.pack(">hi", JOB_FIELDS, len(owner_bytes)) + owner_bytes
    pack_id, pack_length = _ID_FUNCTION.pack, _LENGTH.pack
    pack_middle, pack_failures = _PRIORITY_RUN_AT_REDUCER.pack, _FAILURES.pack
    parts = [SIGNATURE]
    add = parts.extend
    for (
        record_id,
        function,
        unique,
        priority,
        run_at,
        reducer,
        payload,
        attempts,
        first,
        error,
    ) in jobs:
        add(
            (
                row_head,
                pack_id(8, record_id, len(function)),
                function,
                pack_length(len(unique)),
                unique,
                pack_middle(2, priority, 8, run_at, len(reducer)),
                reducer,
                pack_length(len(payload)),
                payload,
                pack_failures(4, attempts, 8, first, len(error)),
                error,
            )
        )
    parts.append(TRAILER)
    return b"".join(parts)

"""The sqlite store's dead set and retry policies (issue 13): what `apply` writes with a batch,
what a restart reads back, and what survives a deleted file, a full disk and damage.

A background job that failed every attempt its policy allowed leaves the queue for the dead
set: its record's remove and its dead row's insert are one transaction, so a crash never
loses the job nor keeps it twice. Policies set by the `retries` admin command are kept the
same way. A database written before the dead set existed opens with an empty one.

Like test_store_segments.py, every test runs a real SqliteStore on a file in tmp_path and reads
what a restart would read.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import msgpack
import pytest
from test_store_safety import replace_with_another_database, small_disk  # noqa: F401 (a fixture)
from test_store_segments import (
    REFUSE_SEGMENT_7,
    database,
    execute,
    finished_rows,
    job,
    jobs,
    opened,
    record_ids,
    rows,
    segment_blob,
    segment_rows,
    started,
    tables,
)

from jobserver.engine.journal import DeadJob, RetryPolicy, StoredJob, StoreExtras
from jobserver.store import StoreError
from jobserver.store.files import rewrite_path

FILL_PAYLOAD = 64 * 1024
"""Jobs that fill test_store_safety's small tmpfs in about a hundred commits."""

# --- helpers -------------------------------------------------------------------------------


def dead(dead_id: int, function: bytes = b"fn") -> DeadJob:
    """A dead job whose fields all name it, with bytes a careless encoding would mangle."""
    return DeadJob(
        dead_id,
        b"H:host:%d" % dead_id,
        function,
        b"unique %d" % dead_id,
        2,
        b"",
        b"payload\0of dead %d" % dead_id,
        4,
        1_700_000_000_000 + dead_id,
        1_700_000_060_000 + dead_id,
        b"exception data\0\xff",
    )


def extras(
    dead_adds: list[DeadJob] | None = None,
    dead_removes: list[int] | None = None,
    policies: list[tuple[bytes, RetryPolicy | None]] | None = None,
) -> StoreExtras:
    return StoreExtras(dead_adds or [], dead_removes or [], policies or [])


def restart_state(
    data_dir: Path,
) -> tuple[list[int], list[DeadJob], list[tuple[bytes, RetryPolicy]]]:
    """What a restarted server gets: its jobs' record ids, the dead set, the policies."""
    with opened(data_dir) as store:
        return record_ids(store.load()), store.load_dead(), store.load_policies()


EXPONENTIAL = RetryPolicy(5, 1.5)
NONE = RetryPolicy(0, 0.0)

# --- round trips ---------------------------------------------------------------------------


def test_dead_jobs_and_policies_survive_a_restart_every_field_intact(tmp_path):
    with started(tmp_path) as store:
        store.apply([], [], extras([dead(1), dead(2, b"other")], [], [(b"fn", EXPONENTIAL)]))
        store.apply([], [], extras([dead(3)], [], [(b"\0bin", NONE)]))
        assert store.load_dead() == [dead(1), dead(2, b"other"), dead(3)]
    assert restart_state(tmp_path) == (
        [],
        [dead(1), dead(2, b"other"), dead(3)],
        [(b"\0bin", NONE), (b"fn", EXPONENTIAL)],
    )


def test_the_dead_set_comes_back_oldest_first_whatever_order_it_was_written_in(tmp_path):
    with started(tmp_path) as store:
        store.apply([], [], extras([dead(7)]))
        store.apply([], [], extras([dead(3), dead(5)]))
    assert [d.dead_id for d in restart_state(tmp_path)[1]] == [3, 5, 7]


def test_a_job_waiting_for_a_retry_keeps_its_failures_across_a_restart(tmp_path):
    """A job that never failed keeps the 7-field record; one that failed has 10 (encoding.py)."""
    retried = StoredJob(2, b"fn", b"u", 0, 1_700_000_030, b"", b"p", 2, 1_700_000_000_000, b"x\0")
    with started(tmp_path) as store:
        store.apply([job(1), retried], [])
    assert [len(record) for record in msgpack.unpackb(segment_blob(database(tmp_path), 1))] == [
        7,
        10,
    ]
    with opened(tmp_path) as store:
        assert store.load() == [job(1), retried]


# --- one transaction -------------------------------------------------------------------------

REFUSE_DEAD = "CREATE TRIGGER refuse BEFORE INSERT ON dead BEGIN SELECT RAISE(ABORT, 'no'); END"
"""A commit that fails on its dead row, after its segment and its finishes."""


@pytest.mark.parametrize("refused", [REFUSE_SEGMENT_7, REFUSE_DEAD], ids=["segment", "dead-row"])
def test_a_job_moves_to_the_dead_set_with_its_batch_or_not_at_all(tmp_path, refused):
    """The record's remove, the dead row and the batch's other changes are one transaction:
    a failed commit leaves the job queued and the dead set as it was, and the same batch
    (as the engine retries it) then lands whole."""
    path = database(tmp_path)
    batch = ([job(7)], [2], extras([dead(1)], [], [(b"fn", EXPONENTIAL)]))
    with started(tmp_path) as store:
        store.apply(jobs(1, 3), [])
        execute(path, refused)
        with pytest.raises(StoreError) as failed:
            store.apply(*batch)
        assert str(path) in str(failed.value)
        assert segment_rows(path) == [(1, 4)]
        assert finished_rows(path) == []
        assert rows(path, "SELECT * FROM dead") == rows(path, "SELECT * FROM policies") == []

        execute(path, "DROP TRIGGER refuse")
        store.apply(*batch)
    assert restart_state(tmp_path) == ([1, 3, 7], [dead(1)], [(b"fn", EXPONENTIAL)])


# --- removes and clears ----------------------------------------------------------------------


def test_dead_jobs_removed_and_policies_cleared_are_gone_after_a_restart(tmp_path):
    with started(tmp_path) as store:
        store.apply([], [], extras([dead(1), dead(2), dead(3)], [], [(b"fn", EXPONENTIAL)]))
        store.apply([], [], extras([], [2], [(b"other", NONE)]))
        # An id or function never stored is ignored, as a record id is.
        store.apply([], [], extras([], [2, 99], [(b"fn", None), (b"never set", None)]))
    assert restart_state(tmp_path) == ([], [dead(1), dead(3)], [(b"other", NONE)])


def test_changes_within_one_batch_apply_in_order(tmp_path):
    """A dead job added and dropped (for room) in one batch ends dropped; the last policy set
    for a function wins, a clear included."""
    with started(tmp_path) as store:
        store.apply(
            [],
            [],
            extras(
                [dead(1), dead(2)],
                [1],
                [(b"fn", NONE), (b"fn", EXPONENTIAL), (b"gone", NONE), (b"gone", None)],
            ),
        )
    assert restart_state(tmp_path) == ([], [dead(2)], [(b"fn", EXPONENTIAL)])


def test_dead_set_changes_written_twice_are_harmless(tmp_path):
    """The engine retries a failed commit's dead-set and policy changes: written again, they
    must not fail every batch they ride in."""
    change = extras([dead(1)], [], [(b"fn", EXPONENTIAL)])
    with started(tmp_path) as store:
        store.apply([], [], change)
        store.apply([job(1)], [], change)
        store.apply([], [], extras([], [1]))
        store.apply([], [], extras([], [1]))
    assert restart_state(tmp_path) == ([1], [], [(b"fn", EXPONENTIAL)])


# --- a deleted file --------------------------------------------------------------------------


@pytest.mark.parametrize("change", ["deleted", "replaced"])
def test_a_rewrite_after_the_file_went_keeps_the_dead_set_and_the_policies(tmp_path, change):
    """The batch committed into the file that went is rewritten with everything else, its
    dead-set and policy changes included."""
    path = database(tmp_path)
    with started(tmp_path) as store:
        store.apply(jobs(1, 3), [], extras([dead(1), dead(2)], [], [(b"fn", EXPONENTIAL)]))
        if change == "deleted":
            path.unlink()
        else:
            replace_with_another_database(path)
        store.apply([job(4)], [1], extras([dead(3)], [1], [(b"new", NONE)]))
        assert path.exists()
    assert restart_state(tmp_path) == (
        [2, 3, 4],
        [dead(2), dead(3)],
        [(b"fn", EXPONENTIAL), (b"new", NONE)],
    )


def test_an_idle_rewrite_keeps_the_dead_set_and_the_policies(tmp_path):
    path = database(tmp_path)
    with started(tmp_path) as store:
        store.apply([job(1)], [], extras([dead(1)], [], [(b"fn", NONE)]))
        path.unlink()
        store.check()
        assert path.exists()
    assert restart_state(tmp_path) == ([1], [dead(1)], [(b"fn", NONE)])


def test_dead_set_changes_after_a_failed_rewrite_go_into_the_next_new_file(tmp_path):
    """The file goes and its new file cannot be written: that batch's changes stay in the old
    file (written, like its removes), and the next batch's are made on the jobs read back
    from it, in the new file."""
    path = database(tmp_path)
    with started(tmp_path) as store:
        store.apply([job(1)], [], extras([dead(1), dead(2)], [], [(b"fn", NONE)]))
        path.unlink()
        (rewrite_path(path) / "blocked").mkdir(parents=True)
        with pytest.raises(StoreError) as refused:
            store.apply([], [], extras([dead(3)], [1], [(b"fn", EXPONENTIAL)]))
        assert refused.value.removes_written

        (rewrite_path(path) / "blocked").rmdir()
        rewrite_path(path).rmdir()
        store.apply([job(2)], [], extras([dead(4)], [2], [(b"other", NONE)]))
        assert path.exists()
    assert restart_state(tmp_path) == (
        [1, 2],
        [dead(3), dead(4)],
        [(b"fn", EXPONENTIAL), (b"other", NONE)],
    )


# --- a full disk -----------------------------------------------------------------------------


def test_on_a_full_disk_dead_adds_are_refused_and_everything_that_frees_space_is_written(
    small_disk,  # noqa: F811 (the fixture imported above)
):
    """Dead jobs hold payloads: like submits they are refused while the reserve is spent.
    Removes, dead-set removes and policy changes go on (they free space, or take next to
    none), in a transaction of their own (StoreError.removes_written)."""
    with started(small_disk) as store:
        store.apply([job(1)], [], extras([dead(1), dead(2)], [], [(b"fn", NONE)]))
        payload = b"x" * FILL_PAYLOAD
        for record_id in range(2, 1000):
            try:
                store.apply([job(record_id, payload=payload)], [])
            except StoreError as error:
                assert error.low_space, error
                break
        else:
            pytest.fail("the small disk never filled")

        with pytest.raises(StoreError, match="failed jobs for the dead set") as refused:
            store.apply([], [1], extras([dead(3)], [1], [(b"fn", None), (b"new", EXPONENTIAL)]))
        assert refused.value.low_space and refused.value.removes_written
        with pytest.raises(StoreError) as refused:
            store.apply([], [], extras([dead(4)]))  # nothing else: nothing written
        assert refused.value.low_space and not refused.value.removes_written
        store.apply([], [], extras([], [2]))  # dead removes alone, as removes alone
    with opened(small_disk) as store:
        assert 1 not in record_ids(store.load())
        assert store.load_dead() == []
        assert store.load_policies() == [(b"new", EXPONENTIAL)]


# --- earlier databases and damage --------------------------------------------------------------

PREVIOUS_LAYOUT = (
    "CREATE TABLE segments (first_record_id INTEGER PRIMARY KEY, "
    "end_record_id INTEGER NOT NULL, records BLOB NOT NULL)",
    "CREATE TABLE finished (first_record_id INTEGER PRIMARY KEY, record_ids BLOB NOT NULL)",
)
"""The tables of the store before the dead set: segments of 7-field records."""


def test_a_database_from_before_the_dead_set_opens_with_none_and_takes_one(tmp_path):
    path = database(tmp_path)
    old = [job(1, b"a", priority=0, run_at=2**40), job(2)]
    with closing(sqlite3.connect(path)) as db:
        for statement in PREVIOUS_LAYOUT:
            db.execute(statement)
        records = msgpack.packb([list(record)[:7] for record in old], use_bin_type=True)
        db.execute("INSERT INTO segments VALUES (1, 3, ?)", (records,))
        db.commit()
    with opened(tmp_path) as store:
        assert store.load() == old
        assert store.load_dead() == [] and store.load_policies() == []
        assert {"dead", "policies"} <= set(tables(path))
        store.apply([], [2], extras([dead(1)], [], [(b"fn", EXPONENTIAL)]))
    assert restart_state(tmp_path) == ([1], [dead(1)], [(b"fn", EXPONENTIAL)])


def packed(*fields: object) -> bytes:
    return msgpack.packb(list(fields), use_bin_type=True)


GOOD = list(dead(5))[1:]


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (b"\xc1", "not a msgpack record"),
        (packed(*GOOD[:9]), "10 fields"),
        (packed(*GOOD[:3], 7, *GOOD[4:]), "priority 7"),
        (packed(*GOOD[:5], "text", *GOOD[6:]), "payload is not bytes"),
        (packed(*GOOD[:6], -1, *GOOD[7:]), "attempts -1"),
        (packed(*GOOD[:8], 1.5, *GOOD[9:]), "last failure time 1.5"),
    ],
    ids=["not-msgpack", "nine-fields", "priority-7", "text-payload", "attempts", "time"],
)
def test_a_damaged_dead_row_is_refused_naming_the_file_and_the_dead_id(tmp_path, record, reason):
    path = database(tmp_path)
    with opened(tmp_path):
        pass  # the schema
    execute(path, "INSERT INTO dead VALUES (5, ?)", record)
    with opened(tmp_path) as store, pytest.raises(StoreError) as refused:
        store.load_dead()
    message = str(refused.value)
    assert str(path) in message
    assert "damaged: dead job 5:" in message
    assert reason in message


@pytest.mark.parametrize(
    ("retries", "base_delay"), [("many", 1.0), (-1, 1.0), (3, "soon"), (3, -2.0)]
)
def test_a_damaged_policy_row_is_refused_naming_the_file_and_the_function(
    tmp_path, retries, base_delay
):
    path = database(tmp_path)
    with opened(tmp_path):
        pass
    execute(path, "INSERT INTO policies VALUES (?, ?, ?)", b"fn", retries, base_delay)
    with opened(tmp_path) as store, pytest.raises(StoreError) as refused:
        store.load_policies()
    message = str(refused.value)
    assert str(path) in message and "damaged" in message
    assert "retry policy of function b'fn'" in message


def test_the_dead_set_on_disk_is_plain_msgpack_an_operator_can_read(tmp_path):
    """The layout is public (encoding.py): the id is the row's key, the rest one array."""
    with started(tmp_path) as store:
        store.apply([], [], extras([dead(9)]))
    ((dead_id, record),) = rows(database(tmp_path), "SELECT dead_id, record FROM dead")
    assert (dead_id, *msgpack.unpackb(record)) == tuple(dead(9))

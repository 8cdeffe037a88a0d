"""The shared store's tables, their versions, and the statements postgresql.py runs.

The schema is created on first use and versioned: `jobserver_schema` holds the version, and
each later change is a new entry of MIGRATIONS, applied in order under an advisory lock (several
servers of a cluster may start at once).

Tables:
- `jobserver_nodes`: one row per server (node id): its `term`, bumped each time it joins and
  each time a peer takes its jobs over (the fencing token), and when its lease expires, by the
  database's clock. NULL lease: nothing to take over (taken over, or never joined).
- `jobserver_jobs`: durable background jobs, keyed by (owner, record id). The owner's server
  chose the record id (its journal's, positive); a taken-over job gets -seq, which no other job
  of its new owner can have. `seq` orders jobs as they were first recorded, across takeovers.
"""

from __future__ import annotations

SCHEMA_LOCK = 0x6A6F6273  # "jobs": the advisory lock taken while creating or migrating

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE jobserver_nodes (
            node_id text PRIMARY KEY,
            term bigint NOT NULL,
            lease_expires timestamptz,
            joined_at timestamptz NOT NULL DEFAULT now(),
            renewed_at timestamptz,
            taken_over_by text,
            taken_over_at timestamptz
        );
        CREATE TABLE jobserver_jobs (
            owner text NOT NULL,
            record_id bigint NOT NULL,
            seq bigserial NOT NULL,
            function bytea NOT NULL,
            unique_key bytea NOT NULL,
            priority smallint NOT NULL,
            run_at bigint NOT NULL,
            reducer bytea NOT NULL,
            payload bytea NOT NULL,
            PRIMARY KEY (owner, record_id)
        );
        """,
    ),
    (
        2,
        """
        ALTER TABLE jobserver_jobs
            ADD COLUMN attempts integer NOT NULL DEFAULT 0,
            ADD COLUMN first_failed_ms bigint NOT NULL DEFAULT 0,
            ADD COLUMN last_error bytea NOT NULL DEFAULT '';
        CREATE TABLE jobserver_dead (
            owner text NOT NULL,
            dead_id bigint NOT NULL,
            seq bigserial NOT NULL,
            handle bytea NOT NULL,
            function bytea NOT NULL,
            unique_key bytea NOT NULL,
            priority smallint NOT NULL,
            reducer bytea NOT NULL,
            payload bytea NOT NULL,
            attempts integer NOT NULL,
            first_failed_ms bigint NOT NULL,
            last_failed_ms bigint NOT NULL,
            error bytea NOT NULL,
            PRIMARY KEY (owner, dead_id)
        );
        CREATE TABLE jobserver_policies (
            function bytea PRIMARY KEY,
            retries integer NOT NULL,
            base_delay double precision NOT NULL
        );
        """,
    ),
]

SCHEMA_VERSION = MIGRATIONS[-1][0]

CREATE_VERSION_TABLE = "CREATE TABLE IF NOT EXISTS jobserver_schema (version integer NOT NULL)"
READ_VERSION = "SELECT max(version) FROM jobserver_schema"
WRITE_VERSION = "INSERT INTO jobserver_schema (version) VALUES (%s)"

JOIN = """
    INSERT INTO jobserver_nodes AS node (node_id, term, lease_expires, renewed_at)
    VALUES (%(node)s, 1, now() + make_interval(secs => %(lease)s), now())
    ON CONFLICT (node_id) DO UPDATE SET
        term = node.term + 1,
        lease_expires = EXCLUDED.lease_expires,
        joined_at = now(),
        renewed_at = now(),
        taken_over_by = NULL,
        taken_over_at = NULL
    RETURNING term
"""

_JOB_COLUMNS = (
    "record_id, function, unique_key, priority, run_at, reducer, payload,"
    " attempts, first_failed_ms, last_error"
)
_DEAD_COLUMNS = (
    "dead_id, handle, function, unique_key, priority, reducer, payload,"
    " attempts, first_failed_ms, last_failed_ms, error"
)

LOAD = f"SELECT {_JOB_COLUMNS} FROM jobserver_jobs WHERE owner = %s ORDER BY seq"

_RENEW = """
    UPDATE jobserver_nodes
    SET lease_expires = now() + make_interval(secs => %(lease)s), renewed_at = now()
    WHERE node_id = %(node)s AND term = %(term)s
    RETURNING 1
"""

RENEW = _RENEW

APPLY = f"""
    WITH lease AS ({_RENEW}),
    added AS (
        INSERT INTO jobserver_jobs (owner, {_JOB_COLUMNS})
        SELECT %(node)s, a.* FROM unnest(
            %(ids)s::bigint[], %(functions)s::bytea[], %(uniques)s::bytea[],
            %(priorities)s::smallint[], %(run_ats)s::bigint[], %(reducers)s::bytea[],
            %(payloads)s::bytea[], %(attempts)s::integer[], %(first_failed)s::bigint[],
            %(errors)s::bytea[]
        ) AS a
        WHERE EXISTS (SELECT FROM lease)
    ),
    removed AS (
        DELETE FROM jobserver_jobs
        WHERE owner = %(node)s AND record_id = ANY(%(removes)s::bigint[])
            AND EXISTS (SELECT FROM lease)
    )
    SELECT count(*) FROM lease
"""
"""One statement, so one round trip and one commit per batch: the lease is renewed under the
server's term, and only if that matched (the server still owns its jobs) are the adds inserted
and the removes deleted; the answer is 1, or 0 when fenced. (PostgreSQL runs a data-modifying
WITH whether or not the query reads it; returning nothing from it saved 6% of its time.) A peer
that took the jobs over bumped the term first, in the same transaction that moved them, so a
fenced server writes nothing."""

TAKE_OVER_NODES = """
    UPDATE jobserver_nodes
    SET term = term + 1, lease_expires = NULL, taken_over_by = %(node)s, taken_over_at = now()
    WHERE node_id <> %(node)s AND lease_expires < now()
    RETURNING node_id, term
"""
"""Nodes whose lease the database says has expired. Two peers racing for one node serialise on
its row; the second re-checks `lease_expires < now()` after the first committed and finds NULL.
A node that renewed meanwhile no longer matches either."""

TAKE_OVER_JOBS = f"""
    UPDATE jobserver_jobs AS job SET owner = %(node)s, record_id = -job.seq
    FROM (
        SELECT owner AS old_owner, record_id AS old_id FROM jobserver_jobs
        WHERE owner = ANY(%(dead)s::text[])
    ) AS old
    WHERE job.owner = old.old_owner AND job.record_id = old.old_id
    RETURNING job.seq, old.old_owner, {", ".join("job." + c for c in _JOB_COLUMNS.split(", "))}
"""
"""Every job of the dead nodes, now this node's, with the node each came from (for the log)."""

READ_NODE = "SELECT term, taken_over_by FROM jobserver_nodes WHERE node_id = %s FOR UPDATE"

LOAD_DEAD = f"SELECT {_DEAD_COLUMNS} FROM jobserver_dead WHERE owner = %s ORDER BY seq"
ADD_DEAD = (
    f"INSERT INTO jobserver_dead (owner, {_DEAD_COLUMNS}) VALUES (%s{', %s' * 11})"
    " ON CONFLICT (owner, dead_id) DO NOTHING"
)
"""A dead job written twice (a batch retried after a full disk refused it) is written once."""
REMOVE_DEAD = "DELETE FROM jobserver_dead WHERE owner = %(node)s AND dead_id = ANY(%(ids)s)"
TAKE_OVER_DEAD = f"""
    UPDATE jobserver_dead SET owner = %(node)s, dead_id = -seq
    WHERE owner = ANY(%(dead)s::text[])
    RETURNING seq, {_DEAD_COLUMNS}
"""
"""The dead set moves with the jobs: a failed job stays visible and re-runnable."""

LOAD_POLICIES = "SELECT function, retries, base_delay FROM jobserver_policies"
SET_POLICY = """
    INSERT INTO jobserver_policies (function, retries, base_delay) VALUES (%s, %s, %s)
    ON CONFLICT (function) DO UPDATE SET retries = EXCLUDED.retries,
        base_delay = EXCLUDED.base_delay
"""
CLEAR_POLICY = "DELETE FROM jobserver_policies WHERE function = %s"
"""Retry policies (`retries` admin command) are the cluster's, not one server's: the SDK sets
them on every server, and each server reads them all when it starts."""

RELEASE = """
    UPDATE jobserver_nodes SET lease_expires = now()
    WHERE node_id = %(node)s AND term = %(term)s
"""
"""At a clean stop: the lease ends now, so a peer takes the jobs over at its next check
instead of a lease later (a server stopped for good strands nothing)."""

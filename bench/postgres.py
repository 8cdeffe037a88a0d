"""The PostgreSQL store under test (`--postgresql`): a private cluster for the whole run.

The cluster comes from tests/pg_cluster.py (a temp dir, a free 127.0.0.1 port, fsync and
synchronous_commit on, stopped by its PID); this module adds only what the benchmark needs:

- counters of what a server's store did in its database: commits (pg_stat_database's
  xact_commit) and statements, i.e. round trips (pg_stat_statements, preloaded by one restart
  of the fresh cluster), so a scenario can report jobs per commit and statements per commit.
- a fresh database for every server start, named after the server's port.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from .servers import HOST, ServerSpec

STATS_SETTLE_S = 2.5
"""PostgreSQL 15 publishes a session's transaction counts when it goes idle, at most once a
second (else 10 s later); the store's lease renewal (at least once a second) makes it go idle
again soon. So xact_commit is read this long after the work to count (which also covers the
store holding finished jobs' removes back, up to 50 ms). pg_stat_statements, updated as each
statement ends, needs no wait; it is read at the same moment, so both cover the same span."""


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries here, or the cluster would not start."""


class BenchPostgres:
    """One PostgreSQL cluster for a benchmark run; `stop()` ends it and deletes its files."""

    def __init__(self) -> None:
        # Imported here: a run without --postgresql needs neither psycopg nor tests/.
        from tests.pg_cluster import PgCluster, PgClusterError

        self.base_dir = Path(tempfile.mkdtemp(prefix="bench-postgresql-"))
        try:
            self.cluster = PgCluster.start(self.base_dir)
        except PgClusterError as error:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            raise PostgresUnavailable(str(error).splitlines()[0]) from None
        try:
            self.cluster.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
            self.cluster.restart()
            self.cluster.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            self.version = self.cluster.query("SHOW server_version")[0][0]
        except Exception:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.cluster.pid

    def create_database(self, name: str) -> str:
        """A new empty database; returns its postgresql:// URI (with the password)."""
        return self.cluster.create_database(name)

    def drop_database(self, name: str) -> None:
        self.cluster.drop_database(name)

    def counters(self, database: str) -> dict[str, int]:
        """Transactions committed in `database` and statements run there, so far (our own
        queries run in the `postgres` database); waits STATS_SETTLE_S first."""
        time.sleep(STATS_SETTLE_S)
        rows = self.cluster.query(
            "SELECT d.xact_commit, (SELECT coalesce(sum(s.calls), 0) FROM pg_stat_statements s"
            " WHERE s.dbid = d.datid) FROM pg_stat_database d WHERE d.datname = %s",
            (database,),
        )
        commits, statements = rows[0]
        return {"commits": int(commits), "statements": int(statements)}

    def jobserver_spec(self) -> ServerSpec:
        """The `jobserver-postgresql` column: a new database for every server start."""

        def argv(port: int, _workdir: Path) -> list[str]:
            return jobserver_argv(port, self.create_database(database_for(port)))

        return ServerSpec(
            "jobserver-postgresql",
            argv,
            database_counters=lambda port: self.counters(database_for(port)),
        )

    def stop(self) -> None:
        """Stop the cluster (by its PID) and delete its files."""
        cluster = getattr(self, "cluster", None)
        if cluster is not None:
            cluster.remove_files()
        shutil.rmtree(self.base_dir, ignore_errors=True)


def database_for(port: int) -> str:
    return f"bench_{port}"


def jobserver_argv(port: int, uri: str, *extra: str) -> list[str]:
    """A jobserver on HOST:port keeping its background jobs in the database at `uri`."""
    return [sys.executable, "-m", "jobserver", "-L", HOST, "-p", str(port), "--store", uri, *extra]

"""Fixtures that run real servers on free 127.0.0.1 ports, and the CI no-skip rule.

- `jobserver` / `gearmand`: a running server (function scope), stopped by PID at teardown.
- `start_jobserver(*args)` / `start_gearmand(*args)`: factories for servers with options.
- `any_server`: runs the test once against jobserver and once against gearmand, so a test
  written against gearmand's behaviour proves jobserver behaves the same.
- `anyio_backend`: the SDK tests (modules marked `pytest.mark.anyio`) run once on trio and
  once on asyncio, since the SDKs promise both. Every other async test is a trio test
  (pytest-trio's trio_mode), as the server is trio only.
- `pg_cluster` / `pg_database`: a private PostgreSQL cluster for the session
  (tests/pg_cluster.py) and the URI of a new database for one test.

With the environment variable CI set, a skipped test fails the run, and missing gearman
binaries are a failure rather than a skip: CI must prove interop, not silently skip it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import psycopg
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import servers
from pg_cluster import MAX_NAME_BYTES, PgCluster, PgClusterError, PostgresNotInstalled

IN_CI = bool(os.environ.get("CI"))

SDK_BACKENDS = ("trio", "asyncio")
"""The event loops the SDKs support: each anyio-marked test runs on both."""


@pytest.fixture(params=SDK_BACKENDS)
def anyio_backend(request) -> str:
    return request.param


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """pytest-trio's trio_mode marks every async test `trio`; a test marked `anyio` is run by
    anyio's plugin on the backend its `anyio_backend` parameter names, so pytest-trio must
    leave it alone (it would run it under trio.run a second way, asyncio never)."""
    for item in items:
        if item.get_closest_marker("anyio") is not None:
            item.own_markers[:] = [mark for mark in item.own_markers if mark.name != "trio"]


def require_gearman_binaries() -> None:
    """Skip (locally) or fail (in CI) when Debian's gearman packages are not installed."""
    missing = servers.missing_gearman_binaries()
    if not missing:
        return
    reason = (
        f"missing {', '.join(missing)}: install the Debian packages gearman-job-server and "
        "gearman-tools (scripts/test does this)"
    )
    if IN_CI:
        pytest.fail(f"CI requires gearman interop tools; {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def gearman_tools() -> None:
    """Depend on this in tests that run /usr/bin/gearman or /usr/bin/gearadmin."""
    require_gearman_binaries()


NODE_DIR = Path(__file__).resolve().parent / "node"
"""package.json and package-lock.json of the node worker libraries run as interop peers."""

NPM_CI_TIMEOUT = 300.0


def require_node_packages() -> Path:
    """tests/node/node_modules, installed by `npm ci` from the committed package-lock.json
    when missing or made from another lock file. Skip (locally) or fail (in CI) when node or
    npm is missing or the install fails."""

    def unavailable(reason: str) -> NoReturn:
        if IN_CI:
            pytest.fail(f"CI requires the node interop workers; {reason}", pytrace=False)
        pytest.skip(reason)

    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        unavailable(
            f"missing {', '.join(missing)}: install the Debian packages nodejs and npm "
            "(scripts/test does this)"
        )
    modules = NODE_DIR / "node_modules"
    stamp = modules / ".jobserver-lock-sha256"
    lock_hash = hashlib.sha256((NODE_DIR / "package-lock.json").read_bytes()).hexdigest()
    if stamp.is_file() and stamp.read_text().strip() == lock_hash:
        return modules
    argv = ["npm", "ci", "--no-audit", "--no-fund", "--prefix", str(NODE_DIR)]
    try:
        result = subprocess.run(argv, capture_output=True, timeout=NPM_CI_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as error:
        unavailable(f"`{' '.join(argv)}` failed: {error}")
    if result.returncode != 0:
        output = (result.stdout + result.stderr).decode(errors="replace")[-2000:]
        unavailable(f"`{' '.join(argv)}` exited with {result.returncode}:\n{output}")
    stamp.write_text(lock_hash + "\n")
    return modules


@pytest.fixture(scope="session")
def node_packages() -> Path:
    """Depend on this in tests that run the node workers in tests/node."""
    return require_node_packages()


def _server_factory(start: Callable[..., servers.Server]):
    started: list[servers.Server] = []

    def factory(*args: str, port: int | None = None, **options) -> servers.Server:
        server = start(*args, port=port, **options)
        started.append(server)
        return server

    return factory, started


def _stop_all(started: list[servers.Server]) -> None:
    for server in started:
        server.stop()
        server.remove_workdir()


@pytest.fixture
def start_jobserver() -> Iterator[Callable[..., servers.Server]]:
    factory, started = _server_factory(servers.start_jobserver)
    yield factory
    _stop_all(started)


@pytest.fixture
def start_gearmand() -> Iterator[Callable[..., servers.Server]]:
    require_gearman_binaries()
    factory, started = _server_factory(servers.start_gearmand)
    yield factory
    _stop_all(started)


@pytest.fixture
def jobserver(start_jobserver) -> servers.Server:
    return start_jobserver()


@pytest.fixture
def gearmand(start_gearmand) -> servers.Server:
    return start_gearmand()


@pytest.fixture(params=["jobserver", "gearmand"])
def any_server(request) -> servers.Server:
    """The same test against both servers: jobserver must behave as gearmand 1.1.20."""
    return request.getfixturevalue(request.param)


# --- CI: a skipped test is a failed run -------------------------------------------------------

_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(f"{report.nodeid}: {_skip_reason(report)}")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped:
        _skipped.append(f"{report.nodeid}: {_skip_reason(report)}")


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not (IN_CI and _skipped):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    title = f"CI is set: {len(_skipped)} skipped test(s) fail the run"
    lines = [f"SKIPPED {entry}" for entry in _skipped]
    if reporter is None:
        print("\n".join([title, *lines]), file=sys.stderr)
    else:
        reporter.line("")
        reporter.write_sep("=", title, red=True)
        for line in lines:
            reporter.write_line(line, red=True)
    if session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# --- PostgreSQL: a private cluster for the session, a fresh database per test ----------------


@pytest.fixture(scope="session")
def pg_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgCluster]:
    """One PostgreSQL cluster (tests/pg_cluster.py) for the whole session, stopped by PID at
    the end. Missing PostgreSQL binaries fail the test, locally too: the store's tests are
    required and a skip would hide them (scripts/test installs Debian's `postgresql`)."""
    try:
        cluster = PgCluster.start(tmp_path_factory.mktemp("pg_cluster"))
    except PostgresNotInstalled as error:
        pytest.fail(str(error), pytrace=False)
    yield cluster
    cluster.remove_files()


def pg_database_name(nodeid: str, test_name: str) -> str:
    """A valid, unique database name for one test: its name in lower-case letters, digits
    and underscores, cut short, plus a hash of its node id (the same test name recurs across
    modules and parameters)."""
    readable = re.sub(r"[^a-z0-9_]+", "_", test_name.lower()).strip("_")
    digest = hashlib.sha256(nodeid.encode()).hexdigest()[:10]
    return f"{readable[: MAX_NAME_BYTES - len(digest) - 1]}_{digest}"


@pytest.fixture
def pg_database(pg_cluster: PgCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """The postgresql:// URI of a new empty database of this test's own, dropped afterwards.
    A test may stop or kill the session's cluster: the next one finds it started again."""
    if not pg_cluster.running:
        pg_cluster.start_again()
    name = pg_database_name(request.node.nodeid, request.node.name)
    uri = pg_cluster.create_database(name)
    yield uri
    # A test that left the cluster down or broken must not fail after the fact; the name is
    # this test's own, and create_database drops a leftover on the next run.
    with contextlib.suppress(PgClusterError, psycopg.Error):
        if pg_cluster.running:
            pg_cluster.drop_database(name)

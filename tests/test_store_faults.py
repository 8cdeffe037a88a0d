"""Storage faults of a real `jobserver` (issue 4, "Faults").

At start, a store it cannot use (read-only directory, a directory it cannot create, a corrupt
database file) makes `jobserver` exit non-zero with one message naming the file or directory and
the problem, and no traceback, in the foreground and with `-d` alike. While running, a submit
whose record cannot be written (full disk, file size limit) gets ERROR QUEUE_ERROR in its place
among the replies, is not acknowledged and does not exist, and the server keeps serving.

Mechanisms (the tests run as root, which ignores permission bits, so none uses chmod):
- read-only: a tmpfs mounted read-only (EROFS), a tmpfs with a database remounted read-only,
  and a directory with the immutable attribute (`chattr +i`: EPERM even for root);
- full disk: a 1 MiB tmpfs mounted on the data directory, and RLIMIT_FSIZE on the server
  process (SIGXFSZ ignored, so writes past the limit fail with EFBIG instead of killing it).
Mounting needs root (CAP_SYS_ADMIN); every mount is undone at teardown.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import servers
from servers import HOST, free_port, jobserver_argv, port_accepts
from test_store_support import Packets, ServerSet, drain, queued, split_args, status

from jobserver.protocol import PacketType as T

COMMAND_TIMEOUT = 30.0
READ_ONLY_PROBLEM = re.compile(r"read-only|permission|not permitted", re.IGNORECASE)
"""What a message about an unwritable store must say: why it cannot be written."""


def database(data_dir: Path, port: int) -> Path:
    return data_dir / f"jobserver-{port}.sqlite3"


def run_jobserver(port: int, *args: str, data_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    """Run `jobserver` to completion (it must exit by itself: it cannot start)."""
    argv = jobserver_argv(port, *args, data_dir=data_dir)
    try:
        return subprocess.run(
            argv, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=COMMAND_TIMEOUT,
        )  # fmt: skip
    except subprocess.TimeoutExpired as expired:
        raise AssertionError(f"jobserver kept running with a bad store: {argv}") from expired


def assert_refused(result: subprocess.CompletedProcess, names: Path, problem: re.Pattern) -> str:
    """Non-zero exit, one plain message naming the path and the problem, no traceback."""
    stderr = result.stderr
    assert result.returncode != 0, f"started anyway; stderr: {stderr}"
    assert "Traceback" not in stderr, stderr
    message = [line for line in stderr.splitlines() if line.startswith("jobserver: ")]
    assert len(message) == 1, f"expected one 'jobserver: ...' line, got: {stderr!r}"
    assert str(names) in message[0], f"the message does not name {names}: {message[0]!r}"
    assert problem.search(message[0]), f"the message does not say {problem.pattern!r}: {message[0]}"
    return message[0]


# --- mounts (root only) --------------------------------------------------------------------


class Mounts:
    def __init__(self) -> None:
        self.points: list[Path] = []

    def tmpfs(self, point: Path, *options: str) -> Path:
        point.mkdir(parents=True, exist_ok=True)
        opts = ",".join(("size=1m", *options))
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)],
            capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
        )  # fmt: skip
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
        self.points.append(point)
        return point

    def remount(self, point: Path, *options: str) -> None:
        subprocess.run(
            ["mount", "-o", ",".join(("remount", *options)), str(point)],
            check=True, timeout=COMMAND_TIMEOUT,
        )  # fmt: skip

    def unmount_all(self) -> None:
        for point in reversed(self.points):
            result = subprocess.run(["umount", str(point)], capture_output=True)
            if result.returncode != 0:  # still busy: detach it, the kernel frees it later
                subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.fixture
def mounts():
    made = Mounts()
    yield made
    made.unmount_all()


@pytest.fixture
def server_set():
    started = ServerSet()
    yield started
    started.stop_all()


@pytest.fixture
def immutable(tmp_path):
    """`immutable(dir)` sets `chattr +i` on it; cleared at teardown so tmp_path can go."""
    marked: list[Path] = []

    def mark(directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["chattr", "+i", str(directory)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"chattr +i does not work here: {result.stderr.strip()}")
        marked.append(directory)
        return directory

    yield mark
    for directory in marked:
        subprocess.run(["chattr", "-i", str(directory)], capture_output=True)


# --- at start: the store cannot be used ------------------------------------------------------


def test_read_only_data_directory_is_refused_at_start(mounts, tmp_path):
    data_dir = mounts.tmpfs(tmp_path / "ro", "ro")
    port = free_port()
    result = run_jobserver(port, data_dir=data_dir, cwd=tmp_path)
    assert_refused(result, data_dir, READ_ONLY_PROBLEM)
    assert not port_accepts(HOST, port)


def test_immutable_data_directory_is_refused_at_start(immutable, tmp_path):
    data_dir = immutable(tmp_path / "immutable")
    result = run_jobserver(free_port(), data_dir=data_dir, cwd=tmp_path)
    assert_refused(result, data_dir, READ_ONLY_PROBLEM)


def test_data_directory_that_cannot_be_created_is_refused_at_start(tmp_path):
    not_a_directory = tmp_path / "a-file"
    not_a_directory.write_text("I am a file")
    data_dir = not_a_directory / "data"
    result = run_jobserver(free_port(), data_dir=data_dir, cwd=tmp_path)
    assert_refused(result, data_dir, re.compile("not a directory", re.IGNORECASE))


def test_database_on_a_file_system_turned_read_only_is_refused_and_kept(
    mounts, server_set, tmp_path
):
    data_dir = mounts.tmpfs(tmp_path / "data")
    server = server_set.start(data_dir=data_dir)
    with Packets(server.port) as client:
        client.submit(T.SUBMIT_JOB_BG, b"kept", b"k1", b"payload")
    assert server_set.terminate(server) == 0
    mounts.remount(data_dir, "ro")

    result = run_jobserver(server.port, data_dir=data_dir, cwd=tmp_path)
    try:
        assert_refused(result, database(data_dir, server.port), READ_ONLY_PROBLEM)
    finally:
        # Writable again: the job is still there, the refused start damaged nothing.
        mounts.remount(data_dir, "rw")
        restarted = server_set.restart(server, data_dir=data_dir)
        assert [args[2:] for args in drain(restarted, b"kept")] == [[b"k1", b"payload"]]


@pytest.mark.parametrize("damage", ["garbage", "text", "damaged-pages", "truncated"])
def test_corrupt_database_is_refused_at_start(server_set, tmp_path, damage):
    data_dir = tmp_path / "data"
    port = free_port()
    db = database(data_dir, port)
    if damage in ("garbage", "text"):
        data_dir.mkdir()
        db.write_bytes(os.urandom(8192) if damage == "garbage" else b"not sqlite\n" * 1000)
    else:
        # A real database with jobs in it, then damaged.
        server = server_set.start(data_dir=data_dir, port=port)
        with Packets(server.port) as client:
            for i in range(300):
                client.submit(T.SUBMIT_JOB_BG, b"f", b"u%d" % i, os.urandom(500))
        assert server_set.terminate(server) == 0
        data = bytearray(db.read_bytes())
        assert len(data) > 4096 * 8
        if damage == "damaged-pages":
            data[4096 * 3 : 4096 * 5] = os.urandom(8192)
        else:
            del data[4096 * 2 + 100 :]
        db.write_bytes(bytes(data))
    before = db.read_bytes()

    result = run_jobserver(port, data_dir=data_dir, cwd=tmp_path)
    assert_refused(
        result, db, re.compile("not a database|malformed|damaged|corrupt", re.IGNORECASE)
    )
    assert db.read_bytes() == before  # left as it was, for the operator to look at
    assert not port_accepts(HOST, port)


@pytest.mark.parametrize("fault", ["corrupt", "read-only"])
def test_daemon_with_an_unusable_store_exits_non_zero_with_the_message(mounts, tmp_path, fault):
    port = free_port()
    pid_file = tmp_path / "jobserver.pid"
    if fault == "corrupt":
        data_dir = tmp_path / "data"
        data_dir.mkdir()
        database(data_dir, port).write_bytes(b"\x00garbage" * 2048)
        problem = re.compile("not a database", re.IGNORECASE)
    else:
        data_dir = mounts.tmpfs(tmp_path / "ro", "ro")
        problem = READ_ONLY_PROBLEM
    result = run_jobserver(port, "-d", "--pid-file", str(pid_file), data_dir=data_dir, cwd=tmp_path)
    if result.returncode == 0 and pid_file.exists():  # it started anyway: do not leave it
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert_refused(result, data_dir, problem)
    assert not pid_file.exists()
    assert not port_accepts(HOST, port)


# --- while running: a record that cannot be written -----------------------------------------

FSIZE_LIMIT = 256 * 1024
"""RLIMIT_FSIZE of the server in the rlimit variant: every file it writes stays below this."""

_RLIMIT_WRAPPER = (
    "import os, resource, signal, sys\n"
    "limit = int(sys.argv[1])\n"
    "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))\n"
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n"
)


def start_with_file_size_limit(server_set: ServerSet, data_dir: Path) -> servers.Server:
    """A jobserver whose process may not write any file past FSIZE_LIMIT bytes (the exec
    keeps the pid, so stopping it by pid stops the server itself)."""

    def argv(port: int, _workdir: Path) -> list[str]:
        command = jobserver_argv(port, data_dir=data_dir)
        assert command[0] == sys.executable
        return [sys.executable, "-c", _RLIMIT_WRAPPER, str(FSIZE_LIMIT), *command[1:]]

    server = servers._start("jobserver", argv, None)
    server_set.started.append(server)
    limits = Path(f"/proc/{server.pid}/limits").read_text()
    assert re.search(rf"Max file size\s+{FSIZE_LIMIT}\s", limits), limits
    return server


@pytest.mark.parametrize("mechanism", ["tmpfs-1MiB", "rlimit-fsize"])
def test_submit_that_cannot_be_stored_gets_queue_error_and_the_server_keeps_serving(
    mounts, server_set, tmp_path, mechanism
):
    if mechanism == "tmpfs-1MiB":
        data_dir = mounts.tmpfs(tmp_path / "data", "size=1m")
        server = server_set.start(data_dir=data_dir)
    else:
        data_dir = tmp_path / "data"
        server = start_with_file_size_limit(server_set, data_dir)
    too_big = b"\xee" * (1536 * 1024)  # more than either limit allows

    with Packets(server.port) as client, Packets(server.port) as other:
        client.submit(T.SUBMIT_JOB_BG, b"disk", b"before", b"small")

        # In the middle of a pipeline: the ERROR takes the submit's place among the replies.
        client.send_raw(
            servers.pack_request(T.ECHO_REQ, b"one")
            + servers.pack_request(T.SUBMIT_JOB_BG, b"disk", b"too-big", too_big)
            + servers.pack_request(T.ECHO_REQ, b"two")
        )
        assert client.expect(T.ECHO_RES) == [b"one"]
        code, text = client.expect(T.ERROR)
        assert code == b"QUEUE_ERROR"
        assert text.startswith(b"Job could not be stored"), text
        assert str(database(data_dir, server.port)).encode() in text, text
        assert client.expect(T.ECHO_RES) == [b"two"]

        # Not acknowledged, and it does not exist.
        known = client.request(T.GET_STATUS_UNIQUE, b"too-big", expect=T.STATUS_RES_UNIQUE)
        assert known[1] == b"0", known
        assert queued(server, "disk") == 1

        # Other connections are served: ECHO, and a foreground job end to end.
        other.echo(b"still here")
        other.send(T.SUBMIT_JOB, b"fg", b"", b"foreground")
        (handle,) = other.expect(T.JOB_CREATED)
        with Packets(server.port) as worker:
            worker.send(T.CAN_DO, b"fg")
            assigned = worker.request(T.GRAB_JOB_UNIQ, expect=T.JOB_ASSIGN_UNIQ)
            assert assigned[0] == handle and assigned[3] == b"foreground"
            worker.send(T.WORK_COMPLETE, handle, b"result")
            assert other.expect(T.WORK_COMPLETE) == [handle, b"result"]

        # Records that fit are stored again.
        client.submit(T.SUBMIT_JOB_BG, b"disk", b"after", b"small again")
        client.submit(T.SUBMIT_JOB_LOW_BG, b"disk", b"", b"anonymous")
        # A retry of the refused job is refused again, and the server still answers.
        client.send(T.SUBMIT_JOB_BG, b"disk", b"too-big", too_big)
        assert client.expect(T.ERROR)[0] == b"QUEUE_ERROR"
        client.echo()
    assert server.proc.poll() is None
    server_set.kill(server)

    # The acknowledged jobs survived; the refused one never existed.
    restarted = server_set.restart(server, data_dir=data_dir)
    ran = [(args[2], args[3]) for args in drain(restarted, b"disk")]
    assert ran == [(b"before", b"small"), (b"after", b"small again"), (b"", b"anonymous")]


def pipeline_with_unstorable_submits(server, uniques, big):
    """Pipeline a background submit per unique (those in `big` too large to store); returns
    (acknowledged, refused) uniques, checking that each submit got exactly one reply, in
    order, JOB_CREATED or ERROR QUEUE_ERROR."""
    with Packets(server.port) as client:
        client.send_raw(
            b"".join(
                servers.pack_request(
                    T.SUBMIT_JOB_BG, b"mix", u, b"\xaa" * (1536 * 1024) if u in big else u
                )
                for u in uniques
            )
        )
        acknowledged, refused = [], []
        for unique in uniques:
            packet_type, payload = client.recv()
            if packet_type == T.JOB_CREATED:
                acknowledged.append(unique)
            else:
                assert packet_type == T.ERROR, (packet_type, payload)
                assert split_args(T.ERROR, payload)[0] == b"QUEUE_ERROR"
                refused.append(unique)
        client.echo()  # nothing more than one reply per submit
        for unique in refused:
            known = client.request(T.GET_STATUS_UNIQUE, unique, expect=T.STATUS_RES_UNIQUE)
            assert known[1] == b"0", f"refused {unique!r} exists: {known}"
    return acknowledged, refused


def test_pipelined_submits_around_unstorable_ones_get_one_reply_each_and_keep_their_word(
    mounts, server_set, tmp_path
):
    """Submits that share a commit batch with an unstorable one may be refused with it (the
    batch is one transaction); each gets exactly one reply, in order, and whatever was
    acknowledged survives a crash while nothing refused exists."""
    data_dir = mounts.tmpfs(tmp_path / "data", "size=1m")
    server = server_set.start(data_dir=data_dir)
    uniques = [b"u%03d" % i for i in range(200)]
    big = {uniques[50], uniques[150]}
    acknowledged, refused = pipeline_with_unstorable_submits(server, uniques, big)
    print(f"\n{len(acknowledged)} acknowledged, {len(refused)} refused")
    assert big <= set(refused)
    assert queued(server, "mix") == len(acknowledged)
    server_set.kill(server)

    restarted = server_set.restart(server, data_dir=data_dir)
    assert [args[2] for args in drain(restarted, b"mix")] == acknowledged


def test_an_unstorable_submit_does_not_take_the_rest_of_its_batch_with_it(
    mounts, server_set, tmp_path
):
    """Issue 4: ERROR QUEUE_ERROR goes to "the submit that could not be stored". Small
    submits that happen to share a group commit with an oversized one could be stored, so
    they must be (e.g. by retrying the failed batch's records one by one)."""
    data_dir = mounts.tmpfs(tmp_path / "data", "size=1m")
    server = server_set.start(data_dir=data_dir)
    uniques = [b"u%03d" % i for i in range(200)]
    big = {uniques[50], uniques[150]}
    _, refused = pipeline_with_unstorable_submits(server, uniques, big)
    # They were storable: submitted again one by one, every small one is acknowledged.
    with Packets(server.port) as client:
        for unique in refused:
            if unique not in big:
                client.submit(T.SUBMIT_JOB_BG, b"mix", unique, unique)
    assert set(refused) == big, (
        f"{len(refused)} refused for 2 unstorable submits, e.g. {sorted(set(refused) - big)[:5]}"
    )


def test_a_database_locked_past_the_busy_timeout_refuses_that_batch_once_and_serving_goes_on(
    server_set, tmp_path
):
    """Another process (a backup, an operator's sqlite3 shell) holds the write lock longer
    than the store waits for it (5 s). The waiting batch's submits get QUEUE_ERROR together,
    after one wait, not one wait per submit (20 submits one by one would take 100 s); other
    connections are served meanwhile; a job finished meanwhile is still forgotten on disk
    once the lock is gone; new submits are acknowledged again."""
    data_dir = tmp_path / "data"
    server = server_set.start(data_dir=data_dir)
    uniques = [b"locked-%d" % i for i in range(20)]
    with Packets(server.port) as client, Packets(server.port) as worker:
        client.submit(T.SUBMIT_JOB_BG, b"lock", b"finished", b"")
        worker.send(T.CAN_DO, b"lock")
        handle = worker.request(T.GRAB_JOB_UNIQ, expect=T.JOB_ASSIGN_UNIQ)[0]
        lock = sqlite3.connect(database(data_dir, server.port), isolation_level=None)
        try:
            lock.execute("BEGIN IMMEDIATE")
            worker.send(T.WORK_COMPLETE, handle, b"done")
            client.send_raw(
                b"".join(servers.pack_request(T.SUBMIT_JOB_BG, b"lock", u, b"") for u in uniques)
            )
            worker.echo()  # served while the commit waits for the lock
            for unique in uniques:
                packet_type, payload = client.recv(timeout=20.0)
                assert (packet_type, split_args(T.ERROR, payload)[0]) == (
                    T.ERROR,
                    b"QUEUE_ERROR",
                ), (unique, packet_type, payload)
                assert b"locked" in payload, payload
        finally:
            lock.close()
        client.echo()  # one reply per submit, nothing more
        client.submit(T.SUBMIT_JOB_BG, b"lock", b"after", b"")  # the lock is gone: stored
        for unique in uniques:
            known = client.request(T.GET_STATUS_UNIQUE, unique, expect=T.STATUS_RES_UNIQUE)
            assert known[1] == b"0", f"refused {unique!r} exists: {known}"
    server_set.kill(server)
    restarted = server_set.restart(server, data_dir=data_dir)
    assert [args[2] for args in drain(restarted, b"lock")] == [b"after"]


# --- at start: a database whose contents are not ours ---------------------------------------

JOBS_TABLE = (
    "CREATE TABLE jobs (record_id INTEGER PRIMARY KEY, function BLOB NOT NULL, "
    "unique_id BLOB NOT NULL, priority INTEGER NOT NULL, run_at INTEGER NOT NULL, "
    "reducer BLOB NOT NULL, payload BLOB NOT NULL)"
)


def write_database(path: Path, *statements: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    try:
        for statement in statements:
            db.execute(statement)
        db.commit()
    finally:
        db.close()


def test_database_with_a_foreign_jobs_table_is_refused_at_start(tmp_path):
    port = free_port()
    db = database(tmp_path / "data", port)
    write_database(
        db,
        "CREATE TABLE jobs (record_id INTEGER PRIMARY KEY, function BLOB)",
        "INSERT INTO jobs VALUES (1, x'66')",
    )
    result = run_jobserver(port, data_dir=db.parent, cwd=tmp_path)
    assert_refused(result, db, re.compile("no such column|schema|column", re.IGNORECASE))


def test_database_with_an_impossible_priority_is_refused_at_start_without_a_traceback(tmp_path):
    """A record no server could have written (priority 7): a damaged database, reported as
    such, not a crash."""
    port = free_port()
    db = database(tmp_path / "data", port)
    write_database(db, JOBS_TABLE, "INSERT INTO jobs VALUES (1, x'66', x'75', 7, 0, x'', x'')")
    result = run_jobserver(port, data_dir=db.parent, cwd=tmp_path)
    assert_refused(result, db, re.compile("priority|damaged|invalid|corrupt", re.IGNORECASE))


def test_records_written_as_text_by_another_tool_are_loaded_as_bytes_or_refused(
    server_set, tmp_path
):
    """SQLite keeps whatever type was inserted: a record an operator's script wrote with TEXT
    values must either load (and run as those bytes) or be refused at start, never reach the
    engine as str and break the connections that look at it."""
    port = free_port()
    data_dir = tmp_path / "data"
    write_database(
        database(data_dir, port),
        JOBS_TABLE,
        "INSERT INTO jobs VALUES (1, 'text-fn', 'text-u', 1, 0, '', 'text payload')",
    )
    try:
        server = server_set.start(data_dir=data_dir, port=port)
    except servers.ServerStartError as refused:
        assert "Traceback" not in str(refused), refused
        assert str(database(data_dir, port)) in str(refused)
        return
    assert status(server).get("text-fn", (0, 0, 0))[0] == 1
    ran = drain(server, b"text-fn")
    assert [args[1:] for args in ran] == [[b"text-fn", b"text-u", b"text payload"]]

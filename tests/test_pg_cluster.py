"""The ground the PostgreSQL store's tests stand on: a real private cluster
(tests/pg_cluster.py, the `pg_cluster` and `pg_database` fixtures) and a real network cut
(tests/tcp_proxy.py). No mocks: every test talks to PostgreSQL over TCP with the password.
"""

from __future__ import annotations

import signal
import socket
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import psycopg
import pytest
from pg_cluster import PASSWORD, PgCluster, child_pids, process_gone
from tcp_proxy import TcpProxy

CONNECT_TIMEOUT = 5  # libpq's connect_timeout (whole seconds): only a hang reaches it
RESULT_TIMEOUT = 10.0  # seconds to wait for a query that should complete: far beyond need
FROZEN_WATCH = 0.5  # seconds a query through a frozen proxy is watched not to complete
PROXIED_CONNECTIONS = 20  # connections held open through one proxy at the same time
IO_TIMEOUT = 5.0  # seconds for any plain socket operation in the proxy tests


def connect(uri: str) -> psycopg.Connection:
    return psycopg.connect(uri, autocommit=True, connect_timeout=CONNECT_TIMEOUT)


def database_of(uri: str) -> str:
    return uri.rsplit("/", 1)[1]


def test_a_new_database_is_reachable_over_tcp_with_the_password(pg_cluster, pg_database):
    assert pg_database.startswith(f"postgresql://postgres:{PASSWORD}@127.0.0.1:")
    with connect(pg_database) as connection:
        connection.execute("CREATE TABLE jobs (handle text PRIMARY KEY)")
        connection.execute("INSERT INTO jobs VALUES ('H:1')")
        assert connection.execute("SELECT handle FROM jobs").fetchall() == [("H:1",)]
        assert connection.execute("SELECT current_database()").fetchone() == (
            database_of(pg_database),
        )
        assert connection.info.port == pg_cluster.port
        # Durability is what the store's tests check; the cluster must not fake it.
        assert connection.execute("SHOW fsync").fetchone() == ("on",)
        assert connection.execute("SHOW synchronous_commit").fetchone() == ("on",)


def test_a_wrong_password_is_refused(pg_cluster, pg_database):
    wrong = pg_cluster.uri(database_of(pg_database), password="not-" + PASSWORD)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(wrong)


def test_a_restart_keeps_the_data_and_the_port_and_ends_older_connections(pg_cluster, pg_database):
    with connect(pg_database) as connection:
        connection.execute("CREATE TABLE jobs AS SELECT 'H:1' AS handle")
    port, pid = pg_cluster.port, pg_cluster.pid
    with connect(pg_database) as before_restart:
        pg_cluster.restart()
        assert (pg_cluster.port, pg_cluster.running) == (port, True)
        assert pg_cluster.pid != pid
        assert process_gone(pid)
        with pytest.raises(psycopg.OperationalError):
            before_restart.execute("SELECT 1")
    with connect(pg_database) as after_restart:
        assert after_restart.execute("SELECT handle FROM jobs").fetchall() == [("H:1",)]


def test_a_killed_cluster_starts_again_with_every_committed_row(pg_cluster, pg_database):
    with connect(pg_database) as connection:
        connection.execute(
            "CREATE TABLE jobs AS SELECT 'H:' || n AS handle FROM generate_series(1, 100) n"
        )
    pid = pg_cluster.pid
    backends = child_pids(pid)
    pg_cluster.kill()
    assert not pg_cluster.running
    assert all(process_gone(gone) for gone in [pid, *backends])
    pg_cluster.start_again()
    with connect(pg_database) as connection:
        assert connection.execute("SELECT count(*) FROM jobs").fetchone() == (100,)


def test_terminate_backends_disconnects_every_other_session_of_that_database(
    pg_cluster, pg_database
):
    sessions = [connect(pg_database) for _ in range(2)]
    try:
        assert pg_cluster.terminate_backends(database_of(pg_database)) == 2
        for session in sessions:
            with pytest.raises(psycopg.OperationalError):
                session.execute("SELECT 1")
    finally:
        for session in sessions:
            session.close()
    with connect(pg_database) as connection:
        assert connection.execute("SELECT 1").fetchone() == (1,)
    assert pg_cluster.terminate_backends(database_of(pg_database)) == 0


def test_stop_ends_the_server_by_pid_and_may_be_repeated(tmp_path):
    with PgCluster.start(tmp_path) as cluster:  # its own: the session's cluster stays up
        pid = cluster.pid
        helpers = child_pids(pid)
        assert helpers, "a running postmaster has its checkpointer, walwriter, ..."
        cluster.stop()
        cluster.stop()
        assert not cluster.running
        assert all(process_gone(gone) for gone in [pid, *helpers])
        with pytest.raises(psycopg.OperationalError):
            connect(cluster.uri())
    assert not (tmp_path / "postgresql").exists(), "leaving the block deletes its data"
    assert "database system is shut down" in (tmp_path / "postgres.log").read_text()


def test_queries_pass_through_the_proxy_and_wait_while_it_is_frozen(pg_cluster, pg_database):
    with ThreadPoolExecutor(max_workers=2) as pool, TcpProxy.start(pg_cluster.port) as proxy:
        # (The proxy is stopped first on the way out, so nothing in the pool can hang.)
        proxied = pg_cluster.uri(database_of(pg_database), port=proxy.port)
        with connect(proxied) as open_before:
            assert open_before.execute("SELECT 1").fetchone() == (1,)
            proxy.freeze()
            on_open_connection = pool.submit(lambda: open_before.execute("SELECT 2").fetchone())

            def on_new_connection():
                with connect(proxied) as connection:
                    return connection.execute("SELECT 3").fetchone()

            new_connection = pool.submit(on_new_connection)
            done, _ = wait([on_open_connection, new_connection], timeout=FROZEN_WATCH)
            assert not done, "nothing may get through a frozen proxy"
            proxy.thaw()
            assert on_open_connection.result(RESULT_TIMEOUT) == (2,)
            assert new_connection.result(RESULT_TIMEOUT) == (3,)


def test_a_frozen_proxy_stops_on_sigterm_and_its_connections_end(pg_cluster, pg_database):
    with TcpProxy.start(pg_cluster.port) as proxy:
        connection = connect(pg_cluster.uri(database_of(pg_database), port=proxy.port))
        proxy.freeze()
        proxy.stop()
        assert proxy.process.returncode == -signal.SIGTERM
        with pytest.raises(psycopg.OperationalError):
            connection.execute("SELECT 1")
        connection.close()


def reply_after_eof(listener: socket.socket, connections: int) -> None:
    """Serve `connections` clients at once: read each to EOF, then send it back reversed and
    close: a reply only a half-close (not a full close) lets the client receive."""

    def answer(peer: socket.socket) -> None:
        with peer:
            peer.settimeout(IO_TIMEOUT)
            received = b""
            while chunk := peer.recv(4096):
                received += chunk
            peer.sendall(received[::-1])

    for _ in range(connections):
        peer, _ = listener.accept()
        threading.Thread(target=answer, args=(peer,), daemon=True).start()


def test_the_proxy_carries_many_connections_at_once_and_passes_half_closes_on():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(IO_TIMEOUT)
        server = threading.Thread(
            target=reply_after_eof, args=(listener, PROXIED_CONNECTIONS), daemon=True
        )
        server.start()
        with TcpProxy.start(listener.getsockname()[1]) as proxy:
            clients = [
                socket.create_connection(("127.0.0.1", proxy.port), timeout=IO_TIMEOUT)
                for _ in range(PROXIED_CONNECTIONS)
            ]
            try:
                for number, client in enumerate(clients):
                    client.sendall(f"request {number}".encode())
                    client.shutdown(socket.SHUT_WR)
                for number, client in enumerate(clients):
                    reply = b""
                    while chunk := client.recv(4096):
                        reply += chunk
                    assert reply == f"request {number}".encode()[::-1]
            finally:
                for client in clients:
                    client.close()
        server.join(IO_TIMEOUT)
        assert not server.is_alive()

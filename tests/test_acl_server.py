"""`--acl` on a live server (issue 15; jobserver/access.py and the admin protocol's checks): who
may submit, register and administer, what listings and status lookups show each identity, the
[anonymous] table, `--loopback-identity`, and the log of denials.

Identities are client certificates' CNs over mutual TLS (tests/tls_certs.py); plaintext peers
are anonymous. One server serves the whole module, so every test uses function names of its own
and checks listings by what they must and must not hold, never by their whole content.
"""

from __future__ import annotations

import fnmatch
import socket
import time
from collections.abc import Callable, Iterator

import pytest
import tls_certs
import wire
from servers import HOST, IO_TIMEOUT, free_port, wait_until
from test_http_status import HttpServer
from tls_certs import Pki, TlsServer, start_tls_jobserver
from wire import Wire

from jobserver.protocol import PacketType as T
from jobserver.protocol import encode_request

# Fixtures: the certificates, TLS Wires and plaintext Wires, all closed at teardown.
tls_pki = tls_certs.tls_pki
tls_connect = tls_certs.tls_connect
connect = wire.connect

ACL = """
[identity."webapp"]
invoke = ["resize*"]

[identity."worker-a"]
register = ["resize*"]

[identity."ops"]
invoke = ["*"]
register = ["*"]
admin = true

[identity."globs"]
invoke = ["job?", "[ab]_task"]

[identity."auditor"]
invoke = ["resize*"]
admin = true

[identity."local-tools"]
invoke = ["local_*"]

[anonymous]
invoke = ["public_*"]
register = ["public_*"]
"""

DENIED_ADMIN = b"ERR PERMISSION_DENIED this+identity+may+not+change+the+server\r\n"

EPOCH_AHEAD = 3600
"""Seconds ahead an epoch job is scheduled: it never comes due during the test."""

VISIBLE_TO = {"webapp": ["resize*"], "worker-a": ["resize*"], "globs": ["job?", "[ab]_task"]}
"""Globs of the functions `status` may show each non-admin identity of ACL."""

UNKNOWN_JOB = b"OK unknown 0 0 0\n"
"""`show job` of a job that does not exist, or that this identity may not see."""


@pytest.fixture(scope="module")
def acl_file(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("acl") / "acl.toml"
    path.write_text(ACL)
    return path


@pytest.fixture(scope="module")
def acl_server(tls_pki: Pki, acl_file) -> Iterator[TlsServer]:
    """mTLS on its TLS port (a CN is an identity), plaintext anonymous; failed background jobs
    go straight to the dead set (--bg-retries 0)."""
    server = start_tls_jobserver(
        tls_pki, "--tls-ca", str(tls_pki.ca_pem), "--acl", str(acl_file), "--bg-retries", "0"
    )
    yield server
    server.stop()


@pytest.fixture
def as_identity(acl_server, tls_pki, tls_connect, connect) -> Callable[[str | None], Wire]:
    """`as_identity(cn)`: a connection to the ACL server with that CN's certificate; None: a
    plaintext (anonymous) one."""

    def open_as(common_name: str | None) -> Wire:
        if common_name is None:
            return connect(acl_server.server)
        return tls_connect(acl_server.tls, tls_pki.client_context(common_name))

    return open_as


def denial(identity: str, action: str, function: bytes) -> bytes:
    """The text of the ERROR PERMISSION_DENIED a denied request gets."""
    who = "anonymous" if identity == "anonymous" else f"'{identity}'"
    return f"identity {who} may not {action} {function.decode()!r}".encode()


def submit_args(kind: T, function: bytes, unique: bytes) -> tuple[bytes, ...]:
    """The arguments of a submit packet of `kind` (protocol reference §2)."""
    if kind == T.SUBMIT_JOB_EPOCH:
        return (function, unique, b"%d" % (time.time() + EPOCH_AHEAD), b"data")
    if kind in (T.SUBMIT_REDUCE_JOB, T.SUBMIT_REDUCE_JOB_BACKGROUND):
        return (function, unique, b"reducer", b"", b"data")
    if kind == T.SUBMIT_JOB_SCHED:
        return (function, unique, b"0", b"0", b"1", b"1", b"0", b"data")
    return (function, unique, b"data")


def listed_functions(reply: bytes) -> list[bytes]:
    """The function names of a `status` or `prioritystatus` reply."""
    assert reply.endswith(b".\n"), reply
    return [line.split(b"\t", 1)[0] for line in reply.splitlines()[:-1]]


# --- invoke ------------------------------------------------------------------------------------

SUBMIT_KINDS = [
    T.SUBMIT_JOB,
    T.SUBMIT_JOB_BG,
    T.SUBMIT_JOB_HIGH,
    T.SUBMIT_JOB_HIGH_BG,
    T.SUBMIT_JOB_LOW,
    T.SUBMIT_JOB_LOW_BG,
    T.SUBMIT_JOB_EPOCH,
    T.SUBMIT_REDUCE_JOB,
    T.SUBMIT_REDUCE_JOB_BACKGROUND,
]


@pytest.mark.parametrize("kind", SUBMIT_KINDS, ids=lambda kind: kind.name)
def test_every_kind_of_submit_needs_invoke_rights_on_the_function(kind, as_identity):
    webapp, ops = as_identity("webapp"), as_identity("ops")
    allowed = b"resize_%s" % kind.name.encode()
    denied = b"secret_%s" % kind.name.encode()
    unique = b"u-%s" % kind.name.encode()

    webapp.send(kind, *submit_args(kind, allowed, unique))
    webapp.expect(T.JOB_CREATED)
    webapp.send(kind, *submit_args(kind, denied, unique + b"-denied"))
    webapp.expect_error(b"PERMISSION_DENIED", denial("webapp", "submit jobs of", denied))

    # The engine never saw the denied submit: no function, no job.
    assert allowed in listed_functions(ops.admin("status"))
    assert denied not in listed_functions(ops.admin("status"))
    assert unique + b"-denied\n" not in ops.admin("show unique jobs")


def test_submit_job_sched_is_denied_without_invoke_rights_and_unsupported_with_them(as_identity):
    webapp = as_identity("webapp")

    webapp.send(T.SUBMIT_JOB_SCHED, *submit_args(T.SUBMIT_JOB_SCHED, b"secret_sched", b""))
    webapp.expect_error(b"PERMISSION_DENIED")
    webapp.send(T.SUBMIT_JOB_SCHED, *submit_args(T.SUBMIT_JOB_SCHED, b"resize_sched", b""))
    code, _text = webapp.expect(T.ERROR)
    assert code == b"INVALID_COMMAND"  # as without an ACL: gearmand never implemented it


def test_a_denied_request_is_answered_in_its_place_among_pipelined_ones(as_identity):
    webapp = as_identity("webapp")
    webapp.send_raw(
        encode_request(T.SUBMIT_JOB_BG, b"resize_pipe", b"", b"1")
        + encode_request(T.SUBMIT_JOB_BG, b"secret_pipe", b"", b"2")
        + encode_request(T.CAN_DO, b"resize_pipe")
        + encode_request(T.ECHO_REQ, b"after")
        + b"show jobs\n"
        + encode_request(T.SUBMIT_JOB_BG, b"resize_pipe", b"", b"3")
    )

    webapp.expect(T.JOB_CREATED)
    webapp.expect_error(b"PERMISSION_DENIED", denial("webapp", "submit jobs of", b"secret_pipe"))
    webapp.expect_error(b"PERMISSION_DENIED", denial("webapp", "register", b"resize_pipe"))
    webapp.expect(T.ECHO_RES, b"after")
    assert webapp.read_admin_reply(is_list=True).endswith(b".\n")
    webapp.expect(T.JOB_CREATED)


# --- register ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [T.CAN_DO, T.CAN_DO_TIMEOUT], ids=lambda kind: kind.name)
def test_registering_needs_register_rights_and_a_denied_one_registers_nothing(kind, as_identity):
    worker, ops = as_identity("worker-a"), as_identity("ops")
    tail = (b"30",) if kind == T.CAN_DO_TIMEOUT else ()
    allowed = b"resize_reg_%s" % kind.name.encode()
    denied = b"secret_reg_%s" % kind.name.encode()
    ops.submit(denied, b"waiting", packet_type=T.SUBMIT_JOB_BG)

    worker.send(kind, denied, *tail)
    worker.expect_error(b"PERMISSION_DENIED", denial("worker-a", "register", denied))
    worker.send(kind, allowed, *tail)
    worker.echo()

    status = ops.admin("status")
    assert allowed + b"\t0\t0\t1\n" in status  # one worker
    assert denied + b"\t1\t0\t0\n" in status  # its job queued, no worker
    worker.send(T.GRAB_JOB)
    worker.expect(T.NO_JOB)  # the job of the function it was refused is not handed out


def test_invoke_rights_are_not_register_rights(as_identity):
    webapp = as_identity("webapp")

    webapp.send(T.CAN_DO, b"resize_by_a_client")
    webapp.expect_error(b"PERMISSION_DENIED", denial("webapp", "register", b"resize_by_a_client"))


def test_a_job_goes_from_an_identity_that_may_invoke_to_one_that_may_register(as_identity):
    webapp, worker = as_identity("webapp"), as_identity("worker-a")
    handle = webapp.submit(b"resize_flow", b"picture")
    worker.can_do(b"resize_flow")

    worker.send(T.GRAB_JOB)
    assert worker.expect(T.JOB_ASSIGN) == (handle, b"resize_flow", b"picture")
    worker.send(T.WORK_COMPLETE, handle, b"smaller")
    webapp.expect(T.WORK_COMPLETE, handle, b"smaller")


# --- globs, [anonymous] and unlisted names -----------------------------------------------------


def test_globs_match_whole_names_with_star_question_mark_and_brackets(as_identity):
    globs = as_identity("globs")  # invoke = ["job?", "[ab]_task"]
    allowed = [b"job1", b"jobx", b"a_task", b"b_task"]
    denied = [b"job", b"job12", b"JOB1", b"xjob1", b"c_task", b"ab_task", b"resize_x"]

    globs.send_raw(
        b"".join(encode_request(T.SUBMIT_JOB_BG, name, b"", b"") for name in allowed + denied)
    )

    for _name in allowed:
        globs.expect(T.JOB_CREATED)
    for name in denied:
        globs.expect_error(b"PERMISSION_DENIED", denial("globs", "submit jobs of", name))


def test_plaintext_peers_have_the_anonymous_tables_rights(as_identity):
    anonymous = as_identity(None)

    anonymous.submit(b"public_anon", b"x", packet_type=T.SUBMIT_JOB_BG)
    anonymous.can_do(b"public_anon")
    anonymous.send(T.SUBMIT_JOB_BG, b"resize_anon", b"", b"x")
    anonymous.expect_error(
        b"PERMISSION_DENIED", denial("anonymous", "submit jobs of", b"resize_anon")
    )
    anonymous.send(T.CAN_DO, b"resize_anon")
    anonymous.expect_error(b"PERMISSION_DENIED", denial("anonymous", "register", b"resize_anon"))
    assert anonymous.admin("create function public_made") == DENIED_ADMIN


def test_a_certificate_whose_cn_the_file_does_not_list_gets_the_anonymous_rights(as_identity):
    stranger = as_identity("stranger")

    stranger.submit(b"public_stranger", b"x", packet_type=T.SUBMIT_JOB_BG)
    stranger.send(T.SUBMIT_JOB_BG, b"resize_stranger", b"", b"x")
    # ...and the denial names the CN, for whoever reads the log.
    stranger.expect_error(
        b"PERMISSION_DENIED", denial("stranger", "submit jobs of", b"resize_stranger")
    )


def test_identities_do_not_get_the_anonymous_rights_too(as_identity):
    webapp = as_identity("webapp")

    webapp.send(T.SUBMIT_JOB_BG, b"public_not_for_webapp", b"", b"x")
    webapp.expect_error(b"PERMISSION_DENIED")


# --- admin commands ----------------------------------------------------------------------------


@pytest.fixture
def dead_job(as_identity) -> Callable[[bytes], bytes]:
    """`dead_job(function)`: the handle of a background job of `function` that failed its only
    attempt (--bg-retries 0), done through the ops identity."""
    ops_client, ops_worker = as_identity("ops"), as_identity("ops")

    def make(function: bytes) -> bytes:
        handle = ops_client.submit(function, b"doomed", packet_type=T.SUBMIT_JOB_BG)
        ops_worker.can_do(function)
        ops_worker.send(T.GRAB_JOB)
        assert ops_worker.expect(T.JOB_ASSIGN)[0] == handle
        ops_worker.send(T.WORK_FAIL, handle)
        ops_worker.send(T.RESET_ABILITIES)
        wait_until(
            lambda: handle in ops_client.admin(b"show dead jobs " + function),
            what=f"{handle!r} in the dead set",
        )
        return handle

    return make


def mutating_commands(handle: bytes, dead: bytes) -> list[bytes]:
    """A line of each admin command that changes the server (admin.MUTATING_COMMANDS)."""
    return [
        b"cancel job " + handle,
        b"CANCEL job " + handle,  # command words are case-insensitive
        b"create function resize_admin_made",
        b"drop function resize_admin",
        b"maxqueue resize_admin 1",
        b"retry dead job " + dead,
        b"retry dead jobs all",
        b"purge dead jobs all",
        b"retries secret_admin 3",
        b"retries secret_admin default",
    ]


@pytest.mark.parametrize("who", ["webapp", "worker-a", None], ids=str)
def test_a_non_admin_may_run_no_command_that_changes_the_server(who, as_identity, dead_job):
    ops, console = as_identity("ops"), as_identity(who)
    function = b"resize_admin"
    handle = ops.submit(function, b"x", packet_type=T.SUBMIT_JOB_BG)
    dead = dead_job(b"resize_admin_dead_%s" % str(who).encode())

    for line in mutating_commands(handle, dead):
        assert console.admin(line) == DENIED_ADMIN, line

    # Nothing changed: the job is still queued (and no queue limit keeps a second out), the
    # function not dropped, the dead job still dead, no function made, no policy set.
    assert handle in ops.admin("show jobs")
    ops.submit(function, b"second", packet_type=T.SUBMIT_JOB_BG)
    assert function in listed_functions(ops.admin("status"))
    assert ops.admin(b"show job " + dead).startswith(b"OK dead ")
    assert b"resize_admin_made" not in listed_functions(ops.admin("status"))
    assert ops.admin("retries secret_admin").startswith(b"OK 0 ")


def test_an_admin_may_run_every_command_that_changes_the_server(as_identity, dead_job):
    ops = as_identity("ops")
    handle = ops.submit(b"ops_admin", b"x", packet_type=T.SUBMIT_JOB_BG)
    dead = dead_job(b"ops_admin_dead")

    assert ops.admin(b"cancel job " + handle) == b"OK\r\n"
    assert ops.admin("create function ops_admin_made") == b"OK\r\n"
    assert ops.admin("maxqueue ops_admin_made 1") == b"OK\r\n"
    assert ops.admin("drop function ops_admin_made") == b"OK\r\n"
    assert ops.admin("retries ops_admin 3") == b"OK\r\n"
    assert ops.admin("retries ops_admin default") == b"OK\r\n"
    assert ops.admin(b"retry dead job " + dead) == b"OK 1\n"
    assert ops.admin("purge dead jobs ops_admin_dead") == b"OK 0\n"  # retried: queued again


def test_a_worker_may_set_the_retry_policy_of_functions_it_may_register(as_identity):
    worker, webapp = as_identity("worker-a"), as_identity("webapp")

    assert worker.admin("retries resize_policy 2 0.5") == b"OK\r\n"
    assert worker.admin("retries resize_policy") == b"OK 2 0.5\n"
    assert webapp.admin("retries resize_policy") == b"OK 2 0.5\n"  # may read: it may invoke
    assert webapp.admin("retries resize_policy 5") == DENIED_ADMIN  # may not set: not a worker
    assert webapp.admin("retries secret_policy") == DENIED_ADMIN  # may not even read
    assert worker.admin("retries resize_policy default") == b"OK\r\n"
    assert worker.admin("retries secret_policy 2") == DENIED_ADMIN


def test_reading_commands_answer_everyone(as_identity):
    anonymous = as_identity(None)

    assert anonymous.admin("version").startswith(b"OK jobserver-")
    assert anonymous.admin("getpid").startswith(b"OK ")
    assert anonymous.admin("verbose").startswith(b"OK ")


# --- listings ----------------------------------------------------------------------------------


@pytest.fixture
def mixed_state(as_identity, dead_job) -> dict[str, bytes]:
    """Jobs, workers and dead jobs of a function webapp may invoke and of one it may not."""
    ops = as_identity("ops")
    mixed_worker, secret_worker = as_identity("ops"), as_identity("ops")
    mixed_worker.can_do(b"resize_list", b"secret_list")
    secret_worker.can_do(b"secret_list_only")
    return {
        "visible": ops.submit(b"resize_list", b"", b"resize-u", T.SUBMIT_JOB_BG),
        "hidden": ops.submit(b"secret_list", b"", b"secret-u", T.SUBMIT_JOB_BG),
        "visible dead": dead_job(b"resize_list_dead"),
        "hidden dead": dead_job(b"secret_list_dead"),
    }


@pytest.mark.parametrize("command", ["status", "prioritystatus"])
def test_status_lists_to_a_non_admin_only_functions_it_may_invoke_or_register(
    command, as_identity, mixed_state
):
    ops_functions = listed_functions(as_identity("ops").admin(command))
    assert b"resize_list" in ops_functions and b"secret_list" in ops_functions
    for identity, globs in VISIBLE_TO.items():
        functions = listed_functions(as_identity(identity).admin(command))
        assert b"resize_list" in functions or identity == "globs"
        assert all(any(fnmatch.fnmatchcase(f.decode(), g) for g in globs) for f in functions), (
            identity,
            functions,
        )


def test_workers_lists_to_a_non_admin_only_workers_of_its_functions_and_only_those(
    as_identity, mixed_state
):
    reply = as_identity("webapp").admin("workers")

    lines = reply.splitlines()[:-1]
    # The worker of resize_list and secret_list shows with resize_list alone; the worker of
    # secret_list_only, clients and this console are not listed at all.
    assert any(line.endswith(b" : resize_list") for line in lines), reply
    for line in lines:
        functions = line.split(b" : ", 1)[1].split()
        assert functions and all(f.startswith(b"resize") for f in functions), reply
    assert b"secret_list_only" in as_identity("ops").admin("workers")


def test_job_listings_show_a_non_admin_only_jobs_of_functions_it_may_invoke(
    as_identity, mixed_state
):
    webapp, worker, ops = as_identity("webapp"), as_identity("worker-a"), as_identity("ops")
    visible, hidden = mixed_state["visible"], mixed_state["hidden"]

    jobs, uniques = webapp.admin("show jobs"), webapp.admin("show unique jobs")
    assert visible + b"\t" in jobs and hidden + b"\t" not in jobs
    assert b"resize-u\n" in uniques and b"secret-u\n" not in uniques
    assert webapp.admin(b"show job " + visible) == b"OK queued 0 0 0\n"
    assert webapp.admin(b"show job " + hidden) == UNKNOWN_JOB
    # Registering is not invoking: a worker sees its functions' counts, not their jobs.
    assert visible + b"\t" not in worker.admin("show jobs")
    assert worker.admin(b"show job " + visible) == UNKNOWN_JOB
    # The admin sees everything.
    assert hidden + b"\t" in ops.admin("show jobs")
    assert b"secret-u\n" in ops.admin("show unique jobs")
    assert ops.admin(b"show job " + hidden) == b"OK queued 0 0 0\n"


def test_dead_job_listings_show_a_non_admin_only_jobs_of_functions_it_may_invoke(
    as_identity, mixed_state
):
    webapp, ops = as_identity("webapp"), as_identity("ops")
    visible, hidden = mixed_state["visible dead"], mixed_state["hidden dead"]

    dead = webapp.admin("show dead jobs")
    assert visible + b"\tresize_list_dead\t" in dead and hidden not in dead
    assert webapp.admin("show dead jobs secret_list_dead") == b".\n"
    assert webapp.admin(b"show job " + visible).startswith(b"OK dead 1 ")
    assert webapp.admin(b"show job " + hidden) == UNKNOWN_JOB
    assert hidden + b"\tsecret_list_dead\t" in ops.admin("show dead jobs")
    assert ops.admin(b"show job " + hidden).startswith(b"OK dead 1 ")


# --- GET_STATUS and GET_STATUS_UNIQUE ----------------------------------------------------------


def test_status_of_a_job_one_may_not_invoke_is_unknown(as_identity):
    webapp, anonymous = as_identity("webapp"), as_identity(None)
    mine = webapp.submit(b"resize_status", b"", b"resize-status-u", T.SUBMIT_JOB_BG)
    theirs = anonymous.submit(b"public_status", b"", b"public-status-u", T.SUBMIT_JOB_BG)

    webapp.send(T.GET_STATUS, mine)
    webapp.expect(T.STATUS_RES, mine, b"1", b"0", b"0", b"0")
    webapp.send(T.GET_STATUS, theirs)
    webapp.expect(T.STATUS_RES, theirs, b"0", b"0", b"0", b"0")  # as for no such job
    webapp.send(T.GET_STATUS_UNIQUE, b"resize-status-u")
    webapp.expect(T.STATUS_RES_UNIQUE, b"resize-status-u", b"1", b"0", b"0", b"0", b"0")
    webapp.send(T.GET_STATUS_UNIQUE, b"public-status-u")
    webapp.expect(T.STATUS_RES_UNIQUE, b"public-status-u", b"0", b"0", b"0", b"0", b"0")
    # The other way round too; and the admin sees both.
    anonymous.send(T.GET_STATUS, mine)
    anonymous.expect(T.STATUS_RES, mine, b"0", b"0", b"0", b"0")
    ops = as_identity("ops")
    ops.send(T.GET_STATUS, theirs)
    ops.expect(T.STATUS_RES, theirs, b"1", b"0", b"0", b"0")


def test_an_admin_sees_the_status_of_every_job_not_only_of_those_it_may_invoke(as_identity):
    """An admin sees every job in the listings; GET_STATUS(_UNIQUE) agrees with them."""
    anonymous, auditor = as_identity(None), as_identity("auditor")
    theirs = anonymous.submit(b"public_audited", b"", b"public-audited-u", T.SUBMIT_JOB_BG)

    assert theirs in auditor.admin("show jobs")
    assert auditor.admin(b"show job " + theirs).startswith(b"OK queued ")
    auditor.send(T.GET_STATUS, theirs)
    auditor.expect(T.STATUS_RES, theirs, b"1", b"0", b"0", b"0")
    auditor.send(T.GET_STATUS_UNIQUE, b"public-audited-u")
    auditor.expect(T.STATUS_RES_UNIQUE, b"public-audited-u", b"1", b"0", b"0", b"0", b"0")
    # Its admin rights do not widen what it may submit.
    auditor.send(T.SUBMIT_JOB_BG, b"public_audited", b"", b"")
    assert auditor.expect(T.ERROR)[0] == b"PERMISSION_DENIED"


def test_status_by_unique_finds_ones_own_job_when_another_identity_uses_the_same_unique(
    as_identity,
):
    webapp, anonymous = as_identity("webapp"), as_identity(None)
    anonymous.submit(b"public_shared", b"", b"shared-u", T.SUBMIT_JOB_BG)  # queued first
    webapp.submit(b"resize_shared", b"", b"shared-u", T.SUBMIT_JOB_BG)

    webapp.send(T.GET_STATUS_UNIQUE, b"shared-u")
    webapp.expect(T.STATUS_RES_UNIQUE, b"shared-u", b"1", b"0", b"0", b"0", b"0")


# --- the log -----------------------------------------------------------------------------------


def test_denials_are_logged_naming_the_peer_and_what_was_refused(acl_server, as_identity):
    webapp, stranger = as_identity("webapp"), as_identity("stranger")
    webapp.send(T.SUBMIT_JOB_BG, b"secret_logged", b"", b"x")
    webapp.expect_error(b"PERMISSION_DENIED")
    webapp.send(T.CAN_DO, b"resize_logged")
    webapp.expect_error(b"PERMISSION_DENIED")
    assert stranger.admin("Purge dead jobs all") == DENIED_ADMIN

    for refused in (
        "identity 'webapp' may not submit jobs of 'secret_logged'",
        "identity 'webapp' may not register 'resize_logged'",
        "identity 'stranger' may not run admin command Purge",
    ):

        def logged() -> str | None:
            lines = acl_server.server.stderr_text().splitlines()
            return next((line for line in lines if line.endswith(refused)), None)  # noqa: B023

        line = wait_until(logged, what=f"{refused!r} in the log")
        assert " WARNING denied 127.0.0.1 (fd " in line


def test_metrics_count_denials_and_failed_handshakes(tls_pki: Pki, acl_file, tls_connect):
    """/metrics' jobserver_acl_denials_total and jobserver_tls_handshake_failures_total count
    what the log reports: a denied submit, registration and admin command; a plaintext peer on
    the TLS port."""
    http_port = free_port()
    server = start_tls_jobserver(
        tls_pki,
        *("--tls-ca", str(tls_pki.ca_pem), "--acl", str(acl_file)),
        *("--http", f"{HOST}:{http_port}"),
    )
    try:
        http = HttpServer(server.server, http_port)
        webapp = tls_connect(server.tls, tls_pki.client_context("webapp"))
        webapp.send(T.SUBMIT_JOB_BG, b"secret_counted", b"", b"x")
        webapp.expect_error(b"PERMISSION_DENIED")
        webapp.send(T.CAN_DO, b"resize_counted")
        webapp.expect_error(b"PERMISSION_DENIED")
        assert webapp.admin("maxqueue resize_counted 1") == DENIED_ADMIN
        with socket.create_connection(server.tls, timeout=IO_TIMEOUT) as plaintext:
            plaintext.sendall(b"version\n")
            assert plaintext.recv(1024) == b""  # closed at its first bytes
        http.wait_for_metrics(
            {
                ("jobserver_acl_denials_total", ()): 3,
                ("jobserver_tls_handshake_failures_total", ()): 1,
            },
            "denials and failed handshakes counted",
        )
        # Bound to loopback: no warning that the HTTP side ignores the ACL.
        assert "need no identity" not in server.server.stderr_text()
    finally:
        server.stop()


def test_the_start_log_names_the_acl_file_and_its_identities(acl_server, acl_file):
    assert f"NOTICE ACL {acl_file}: 6 identities" in acl_server.server.stderr_text()


# --- --loopback-identity -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def loopback_server(tls_pki: Pki, acl_file) -> Iterator[TlsServer]:
    """Plaintext loopback peers are "local-tools"; TLS without client certificates."""
    server = start_tls_jobserver(
        tls_pki, "--acl", str(acl_file), "--loopback-identity", "local-tools"
    )
    yield server
    server.stop()


def test_plaintext_loopback_peers_get_the_loopback_identitys_rights(loopback_server, connect):
    local = connect(loopback_server.server)

    local.submit(b"local_job", b"x", packet_type=T.SUBMIT_JOB_BG)
    local.send(T.SUBMIT_JOB_BG, b"public_job", b"", b"x")  # anonymous's, not local-tools'
    local.expect_error(b"PERMISSION_DENIED", denial("local-tools", "submit jobs of", b"public_job"))
    assert "; plaintext loopback peers are 'local-tools'" in loopback_server.server.stderr_text()


def test_tls_peers_from_loopback_keep_their_own_identity(loopback_server, tls_pki, tls_connect):
    over_tls = tls_connect(loopback_server.tls, tls_pki.client_context())  # no certificate

    over_tls.submit(b"public_job", b"x", packet_type=T.SUBMIT_JOB_BG)
    over_tls.send(T.SUBMIT_JOB_BG, b"local_job", b"", b"x")
    over_tls.expect_error(b"PERMISSION_DENIED", denial("anonymous", "submit jobs of", b"local_job"))


def test_a_client_certificate_gives_no_identity_to_a_server_that_does_not_verify_it(
    loopback_server, tls_pki, tls_connect
):
    # Without --tls-ca nobody checked who signed it: "ops" in a certificate is only a claim.
    claims_ops = tls_connect(loopback_server.tls, tls_pki.client_context("ops"))

    claims_ops.send(T.SUBMIT_JOB_BG, b"resize_claimed", b"", b"x")
    claims_ops.expect_error(
        b"PERMISSION_DENIED", denial("anonymous", "submit jobs of", b"resize_claimed")
    )
    assert claims_ops.admin("create function resize_claimed") == DENIED_ADMIN


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),  # IPv4 loopback as a dual-stack listener sees it
        ("192.0.2.1", False),
        ("::ffff:192.0.2.1", False),
        ("2001:db8::1", False),
        ("::", False),
    ],
)
def test_only_loopback_addresses_get_the_loopback_identity(address, loopback):
    # The live tests can only connect from loopback; other peers are checked on the rule
    # itself (the server's private helper: there is no portable non-loopback address to use).
    from jobserver.server_connections import _is_loopback

    assert _is_loopback(address) is loopback

"""`jobserver submit`: one job from the command line, against real servers.

The worker is this test itself, on raw packets (tests/wire.py), so it can wait for the CLI to
show each WORK_STATUS and WORK_DATA before it sends the next: that proves the progress and
the data are shown as they arrive, not at the end, without timing anything. Progress goes to
stderr as plain lines into a pipe, as a rich bar into a terminal (a pty); the result goes to
stdout; failures (WORK_FAIL, WORK_EXCEPTION, --timeout, no server up) exit 1 with the reason.
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import msgpack
import pytest
import servers
from test_status_cli import CLI_TIMEOUT, MEMORY, addresses, jobserver, nowhere, plain, running
from wire import Wire

from jobserver.protocol import PacketType as T

GRAB_DEADLINE = 60.0
"""Seconds a test's worker waits for the CLI's job to reach the server."""


def take_job(wire: Wire, function: bytes) -> tuple[bytes, bytes]:
    """Register for `function` and wait (PRE_SLEEP, NOOP) for one job: (handle, argument)."""
    wire.can_do(function)
    deadline = time.monotonic() + GRAB_DEADLINE
    while True:
        wire.send(T.GRAB_JOB)
        packet = wire.read_packet()
        if packet.type == T.JOB_ASSIGN:
            handle, _, argument = packet.args
            return handle, argument
        assert packet.type == T.NO_JOB, packet
        wire.send(T.PRE_SLEEP)
        wire.expect(T.NOOP, timeout=max(deadline - time.monotonic(), 0.1))


@pytest.fixture
def server(start_jobserver) -> servers.Server:
    return start_jobserver(*MEMORY)


# --- a foreground job's progress, data and result ----------------------------------------------


def test_progress_and_data_are_shown_as_they_arrive_and_the_result_goes_to_stdout(server):
    submit = ("submit", "count", "to four", "--codec", "raw", "--servers", server.address)
    with running(*submit) as (process, stdout, stderr), Wire.to(server) as worker:
        handle, argument = take_job(worker, b"count")
        assert argument == b"to four"
        stderr.wait_for(lambda err: f"job {handle.decode()} accepted by".encode() in err, "accept")
        for n in range(1, 5):
            worker.send(T.WORK_STATUS, handle, str(n).encode(), b"4")
            line = f"progress: {n}/4 {25 * n}%\n".encode()
            stderr.wait_for(lambda err, line=line: line in err, line)
            worker.send(T.WORK_DATA, handle, f"chunk {n}\n".encode())
            chunk = f"chunk {n}\n".encode()
            stdout.wait_for(lambda out, chunk=chunk: out.endswith(chunk), chunk)
        worker.send(T.WORK_WARNING, handle, b"almost done")
        stderr.wait_for(lambda err: b"warning: almost done\n" in err, "the warning")
        worker.send(T.WORK_COMPLETE, handle, b"counted to four")
        assert process.wait(CLI_TIMEOUT) == 0
        out, err = stdout.wait_closed(), stderr.wait_closed()
    assert out == b"chunk 1\nchunk 2\nchunk 3\nchunk 4\ncounted to four"
    assert err.decode().splitlines() == [
        f"job {handle.decode()} accepted by {server.address}",
        "progress: 1/4 25%",
        "progress: 2/4 50%",
        "progress: 3/4 75%",
        "progress: 4/4 100%",
        "warning: almost done",
    ]


def test_on_a_terminal_the_progress_is_a_bar(server):
    submit = ("submit", "resize", '{"path": "a.png"}', "-s", server.address)
    with (
        running(*submit, terminal="stderr") as (process, stdout, stderr),
        Wire.to(server) as worker,
    ):
        handle, argument = take_job(worker, b"resize")
        assert msgpack.unpackb(argument) == {"path": "a.png"}
        for n in (1, 4):
            worker.send(T.WORK_STATUS, handle, str(n).encode(), b"4")
            # The bar's "n/4" and percentage: it is redrawn with each WORK_STATUS.
            drawn = re.compile(rf"{n}/4\s+{25 * n}%")
            stderr.wait_for(lambda err, drawn=drawn: drawn.search(plain(err)), drawn.pattern)
        worker.send(T.WORK_DATA, handle, b"partial")
        stdout.wait_for(lambda out: out == b"partial", "the data, on stdout (a pipe) as sent")
        worker.send(T.WORK_COMPLETE, handle, msgpack.packb({"ok": True}))
        assert process.wait(CLI_TIMEOUT) == 0
        out, err = stdout.wait_closed(), stderr.wait_closed()
    assert out == b'partial{"ok": true}\n'
    bar = plain(err)
    assert f"resize {handle.decode()}: done" in bar and "━" in bar  # the description, the bar
    assert b"\x1b[?25l" in err and b"\x1b[?25h" in err  # cursor hidden while drawing, restored


def test_at_a_terminal_data_goes_above_the_bar_and_a_failure_after_it(server):
    submit = ("submit", "resize", "-c", "raw", "-s", server.address)
    with (
        running(*submit, terminal="both") as (process, terminal, _),
        Wire.to(server) as worker,
    ):
        handle, _ = take_job(worker, b"resize")
        worker.send(T.WORK_STATUS, handle, b"1", b"2")
        terminal.wait_for(lambda out: re.search(r"1/2\s+50%", plain(out)), "the bar at 1/2")
        worker.send(T.WORK_DATA, handle, b"first half")
        terminal.wait_for(lambda out: b"first half\r\n" in out, "the data on a line of its own")
        worker.send(T.WORK_EXCEPTION, handle, b"OSError: disk full")
        assert process.wait(CLI_TIMEOUT) == 1
        output = plain(terminal.wait_closed())
    assert output.index("first half\n") < output.rindex(f"resize {handle.decode()}: failed")
    assert output.endswith(
        f"jobserver submit: 'resize' job {handle.decode()} on "
        f"{server.address} raised: OSError: disk full\n"
    )


@pytest.mark.parametrize("codec", ["json", "msgpack"])
def test_json_and_msgpack_arguments_and_results_round_trip(server, codec):
    value = {"path": "é.png", "sizes": [1, 2.5], "crop": None, "fast": True}
    with (
        running("submit", "echo", json.dumps(value), "--codec", codec, "-s", server.address) as (
            process,
            stdout,
            _,
        ),
        Wire.to(server) as worker,
    ):
        handle, argument = take_job(worker, b"echo")
        decode = json.loads if codec == "json" else msgpack.unpackb
        assert decode(argument) == value  # encoded with the codec on the wire
        worker.send(T.WORK_COMPLETE, handle, argument)
        assert process.wait(CLI_TIMEOUT) == 0
        out = stdout.wait_closed()
    assert json.loads(out) == value  # decoded with the codec, printed as JSON


def test_raw_data_from_stdin_is_sent_and_returned_byte_for_byte(server):
    payload = bytes(range(256))
    submit = ("submit", "echo", "-", "--codec", "raw", "--servers", server.address)
    with (
        running(*submit, stdin=subprocess.PIPE) as (process, stdout, _),
        Wire.to(server) as worker,
    ):
        assert process.stdin is not None
        process.stdin.write(payload)
        process.stdin.close()
        handle, argument = take_job(worker, b"echo")
        assert argument == payload
        worker.send(T.WORK_COMPLETE, handle, argument)
        assert process.wait(CLI_TIMEOUT) == 0
        assert stdout.wait_closed() == payload


# --- failures ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("worker_packets", "reason"),
    [
        ([(T.WORK_FAIL,)], "failed"),
        (
            [(T.WORK_EXCEPTION, b"ValueError: no such image")],  # ends the job, as WORK_FAIL
            "raised: ValueError: no such image",
        ),
    ],
    ids=["work_fail", "work_exception"],
)
def test_a_failed_job_exits_1_with_the_reason(any_server, worker_packets, reason):
    with (
        running("submit", "resize", "-c", "raw", "-s", any_server.address) as (process, out, err),
        Wire.to(any_server) as worker,
    ):
        handle, _ = take_job(worker, b"resize")
        for packet_type, *args in worker_packets:
            worker.send(packet_type, handle, *args)
        worker.echo()
        assert process.wait(CLI_TIMEOUT) == 1
        stderr = err.wait_closed().decode()
        assert out.wait_closed() == b""
    assert f"jobserver submit: 'resize' job {handle.decode()} on {any_server.address} {reason}" in (
        stderr
    )


def test_timeout_exits_1_saying_the_job_may_still_run(server):
    result = jobserver("submit", "nobody-serves-this", "--timeout", "0.5", "-s", server.address)
    assert result.returncode == 1
    assert result.stdout == b""
    assert b"no result within 0.5 s (it may still run on the server)" in result.stderr


def test_no_server_up_exits_1_naming_each_servers_reason():
    first, second = nowhere(), nowhere()
    for background in ([], ["--background"]):
        result = jobserver("submit", "resize", *background, "--servers", addresses(first, second))
        assert result.returncode == 1, result
        assert result.stdout == b""
        stderr = result.stderr.decode()
        assert stderr.startswith("jobserver submit: no server available for 'resize'")
        assert f"{first}: Connection refused" in stderr
        assert f"{second}: Connection refused" in stderr


@pytest.mark.parametrize("down_first", [True, False], ids=["down-up", "up-down"])
def test_a_foreground_job_with_one_server_down_goes_to_the_one_up(server, down_first):
    # Whichever way the unique id routes it, the server down is passed over for the one up.
    down = nowhere()
    listed = addresses(down, server) if down_first else addresses(server, down)
    submit = ("submit", "reverse", "abc", "-c", "raw", "--unique", "u-1", "--priority", "low")
    with (
        running(*submit, "--servers", listed) as (process, stdout, stderr),
        Wire.to(server) as worker,
    ):
        handle, argument = take_job(worker, b"reverse")
        assert argument == b"abc"
        worker.send(T.WORK_COMPLETE, handle, b"cba")
        assert process.wait(CLI_TIMEOUT) == 0
        out, err = stdout.wait_closed(), stderr.wait_closed()
    assert out == b"cba"
    assert err.decode().splitlines()[0] == f"job {handle.decode()} accepted by {server.address}"


def test_priority_low_queues_behind_a_normal_job_submitted_after_it(server):
    low = jobserver(
        "submit", "resize", "low", "-c", "raw", "--background", "--priority", "low",
        "--servers", server.address,
    )  # fmt: skip
    assert low.returncode == 0, low
    normal = jobserver(
        "submit", "resize", "normal", "-c", "raw", "--background", "--servers", server.address
    )
    assert normal.returncode == 0, normal
    with Wire.to(server) as worker:
        assert take_job(worker, b"resize")[1] == b"normal"  # queued second, runs first
        assert take_job(worker, b"resize")[1] == b"low"


def test_a_foreground_unique_coalesces_two_submits_into_one_job(server):
    submit = ("submit", "resize", "x", "-c", "raw", "--unique", "same", "-s", server.address)
    with (
        running(*submit) as (first, first_out, first_err),
        Wire.to(server) as worker,
    ):
        handle, _ = take_job(worker, b"resize")
        first_err.wait_for(lambda err: b"accepted by" in err, "the first accepted")
        with running(*submit) as (second, second_out, second_err):
            # The second joins the job already running: accepted under the same handle.
            accepted = f"job {handle.decode()} accepted by {server.address}".encode()
            second_err.wait_for(lambda err: accepted in err, "the second on the same job")
            worker.send(T.WORK_COMPLETE, handle, b"once")
            assert first.wait(CLI_TIMEOUT) == 0 and second.wait(CLI_TIMEOUT) == 0
            assert first_out.wait_closed() == b"once" and second_out.wait_closed() == b"once"
        worker.send(T.GRAB_JOB)
        worker.expect(T.NO_JOB)  # one job for both


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["resize", "not json"], "DATA is JSON text"),
        (["resize", "--codec", "xml"], "--codec"),
        (["resize", "--priority", "urgent"], "--priority"),
        (["resize", "--servers", "host:notaport"], "--servers"),
        (["resize", "--timeout", "0"], "--timeout"),
        (["", "x"], "empty"),
        ([], "FUNCTION"),
    ],
)
def test_bad_usage_exits_2_before_submitting(args, complaint):
    # Nothing listens there: a command that got as far as submitting would fail with 1.
    servers_option = [] if "--servers" in args else ["--servers", nowhere()]
    result = jobserver("submit", *args, *servers_option)
    assert result.returncode == 2, result
    assert b"Usage: jobserver submit" in result.stderr
    assert complaint.encode() in result.stderr


# --- background --------------------------------------------------------------------------------


def test_background_prints_a_handle_the_servers_know(start_jobserver, start_gearmand):
    ours, gearmand = start_jobserver(*MEMORY), start_gearmand()
    for target in (ours, gearmand):
        submit = ("submit", "resize", '{"path": "b.png"}', "--background", "--priority", "high")
        result = jobserver(*submit, "--unique", "b.png", "--servers", target.address)
        assert result.returncode == 0, result
        handle = result.stdout.decode().strip()
        assert result.stderr.decode() == f"job {handle} queued on {target.address}\n"

        with Wire.to(target) as client:  # GET_STATUS: known, not running
            client.send(T.GET_STATUS, handle.encode())
            assert client.expect(T.STATUS_RES) == (handle.encode(), b"1", b"0", b"0", b"0")

        again = jobserver(*submit, "--unique", "b.png", "--servers", target.address)
        assert again.stdout.decode().strip() == handle  # the same unique coalesced

    status = jobserver("status", "--json", "--servers", addresses(ours, gearmand))
    resize = json.loads(status.stdout)["functions"]["resize"]
    assert (resize["queued"], resize["high"]) == (2, 2)
    assert set(resize["servers"]) == {ours.address, gearmand.address}

"""deploy/jobserver@.service: its command line runs a real server that keeps background jobs.

systemd is not running on a test machine, so the unit is read as text: its ExecStart, with the
unit's paths moved under tmp_path, is what the test runs. The unit makes every path read-only
except its state directory (ProtectSystem=strict), so the store's --data-dir must be that
directory: the default for its unprivileged DynamicUser ($XDG_STATE_HOME/jobserver, else under
its home) is not writable there, and the server would refuse to start.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import servers
from servers import HOST, Server
from test_store_support import Packets

from jobserver.protocol import PacketType as T

UNIT = Path(__file__).resolve().parent.parent / "deploy" / "jobserver@.service"
INSTALLED_COMMAND = "/usr/local/bin/jobserver"
STATE = "/var/lib/jobserver"
RUNTIME = "/run/jobserver"


def service_settings() -> dict[str, list[str]]:
    """The [Service] section's settings, each with every value it is given (in order)."""
    settings: dict[str, list[str]] = {}
    section = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_the_unit_gives_the_store_its_state_directory():
    settings = service_settings()
    assert settings["StateDirectory"] == ["jobserver"]  # systemd makes /var/lib/jobserver
    assert settings["ProtectSystem"] == ["strict"]  # ... the one directory it may write
    (exec_start,) = settings["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[argv.index("--data-dir") + 1] == STATE


def test_the_units_command_line_serves_and_stores_background_jobs(tmp_path):
    """ExecStart as systemd would run it for jobserver@PORT, paths under tmp_path: the options
    exist, the server answers, and an acknowledged background job is in the state directory."""
    (exec_start,) = service_settings()["ExecStart"]
    port = servers.free_port()
    state, runtime = tmp_path / "state", tmp_path / "run"
    runtime.mkdir()
    argv = []
    for word in shlex.split(exec_start):
        if word == "$JOBSERVER_OPTS":
            continue  # empty unless /etc/default/jobserver sets it
        if word == INSTALLED_COMMAND:
            argv += servers.jobserver_argv(port)[:3]  # this interpreter, -m jobserver
            continue
        word = word.replace("%i", str(port)).replace(STATE, str(state))
        argv.append(word.replace(RUNTIME, str(runtime)))
    argv += ["-L", HOST]  # never listen beyond loopback in a test
    assert "--data-dir" in argv, "without it the store would go to the user's state directory"
    server = Server("jobserver-unit", argv, HOST, port, tmp_path)
    try:
        server.wait_ready()
        with Packets(port) as client:
            client.submit(T.SUBMIT_JOB_BG, b"unit", b"kept", b"payload")
        assert (runtime / f"{port}.pid").read_text().strip() == str(server.pid)
        assert (state / f"jobserver-{port}.sqlite3").is_file()
    finally:
        assert server.stop() == 0, server.stderr_text()

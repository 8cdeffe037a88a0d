"""The README's "Python SDKs" examples work as written.

Each ```python block of that section starts with a `# <file>.py` line naming the file it is.
The test writes the blocks to files as they are, with only the server addresses (127.0.0.1:4730
and 127.0.0.1:4731) replaced by those of two real jobserver processes, runs the worker the two
ways the README says (`jobserver worker tasks:worker` and `python tasks.py`), runs the client
scripts, and checks what they print.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import servers
from servers import REPO_ROOT, stop_process, wait_until

from client_sdk.server_pool import rendezvous_order

SECTION = "## Python SDKs"
README_ADDRESSES = ("127.0.0.1:4730", "127.0.0.1:4731")
SCRIPT_TIMEOUT = 60.0
"""Seconds a client script may take (each finishes in about a second)."""

WORKER_START_TIMEOUT = 30.0
WORKER_STOP_TIMEOUT = 30.0

CLIENT_OUTPUT = [
    "{'ok': True, 'path': 'a.png'}",
    "5",
    "b.png done",
    "Status(numerator=1, denominator=3)",
    "Data(data=b'partial')",
    "Status(numerator=3, denominator=3)",
    "{'ok': True, 'path': 'c.png'}",
    "resize failed: KeyError: 'path'",
]


def sdk_section() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    start = text.index(f"\n{SECTION}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def readme_examples() -> dict[str, str]:
    """The section's python blocks by the file name on their first line."""
    files: dict[str, str] = {}
    for block in re.findall(r"^```python\n(.*?)^```\s*$", sdk_section(), flags=re.S | re.M):
        first_line = block.splitlines()[0]
        match = re.fullmatch(r"# (\w+\.py)", first_line)
        assert match, f"a python block of {SECTION!r} must start with '# <file>.py': {first_line!r}"
        assert match.group(1) not in files, f"two blocks are {match.group(1)}"
        files[match.group(1)] = block
    return files


def with_addresses(code: str, addresses: list[str]) -> str:
    mapping = dict(zip(README_ADDRESSES, addresses, strict=True))
    return re.sub(r"127\.0\.0\.1:473[01]", lambda match: mapping[match.group(0)], code)


def test_the_section_has_the_issue_examples_with_substitutable_addresses():
    examples = readme_examples()
    assert sorted(examples) == ["client.py", "sync_client.py", "tasks.py", "web_app.py"]
    for name, code in examples.items():
        compile(code, name, "exec")
        # Only the two documented addresses, so that replacing them reaches every server.
        assert set(re.findall(r"\b\d+\.\d+\.\d+\.\d+:\d+\b", code)) == set(README_ADDRESSES)
    tasks, client, sync = examples["tasks.py"], examples["client.py"], examples["sync_client.py"]
    for snippet in (
        "@worker.function(",
        "timeout=30",
        "async def",
        "await job.status(",
        "await job.data(",
    ):
        assert snippet in tasks, snippet
    assert "return {" in tasks and "worker.run()" in tasks
    for snippet in (
        "async with Client(",
        "await client.submit(",
        'priority="high", unique=',
        "async with client.stream(",
        "async for update in job",
        "await job.result()",
        "await client.status(handle)",
    ):
        assert snippet in client, snippet
    assert "with SyncClient(" in sync and "client.submit(" in sync
    web = examples["web_app.py"]
    assert "async with client:" in web and "await client.submit(" in web


WEB_DRIVER = """
from starlette.testclient import TestClient  # runs the app on asyncio, lifespan included

import web_app

with TestClient(web_app.app) as http:
    print(http.post("/resize", json={"path": "w.png"}).json())
"""
"""Calls the README's web app the way an HTTP client would, with its lifespan (so its Client
opens and closes), on asyncio."""


@pytest.fixture
def two_servers(start_jobserver) -> list[servers.Server]:
    return [start_jobserver(), start_jobserver()]


def example_env() -> dict[str, str]:
    """The repository importable (as after `pip install .`), nothing else changed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_script(directory: Path, name: str) -> list[str]:
    """Run `python <name>` there; its stdout lines (it must exit 0)."""
    done = subprocess.run(
        [sys.executable, name],
        cwd=directory,
        env=example_env(),
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT,
    )
    assert done.returncode == 0, f"{name} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout.splitlines()


def registered(address: str, functions: tuple[str, ...]) -> bool:
    table = servers.status(address)
    return all(table.get(name, (0, 0, 0))[2] >= 1 for name in functions)


def jobs_left(address: str, function: str) -> int:
    return servers.status(address).get(function, (0, 0, 0))[0]


@pytest.mark.parametrize("launch", ["jobserver worker", "python tasks.py"])
def test_readme_examples_run_as_written(two_servers, tmp_path, launch):
    addresses = [server.address for server in two_servers]
    for name, code in readme_examples().items():
        (tmp_path / name).write_text(with_addresses(code, addresses))
    if launch == "jobserver worker":
        argv = [sys.executable, "-m", "jobserver", "worker", "tasks:worker"]
    else:
        argv = [sys.executable, "tasks.py"]
    worker_log = tmp_path / "worker.log"
    with open(worker_log, "wb") as log:
        worker = subprocess.Popen(
            argv, cwd=tmp_path, env=example_env(), stdout=log, stderr=subprocess.STDOUT
        )
    try:
        for address in addresses:  # the worker serves every server
            wait_until(
                lambda address=address: (
                    worker.poll() is not None or registered(address, ("resize", "add"))
                ),
                timeout=WORKER_START_TIMEOUT,
                what=f"the README worker to register on {address}",
            )
            assert worker.poll() is None, worker_log.read_text()

        assert run_script(tmp_path, "client.py") == CLIENT_OUTPUT

        (tmp_path / "web_driver.py").write_text(WEB_DRIVER)
        assert run_script(tmp_path, "web_driver.py") == ["{'ok': True, 'path': 'w.png'}"]

        sync_output = run_script(tmp_path, "sync_client.py")
        holder = rendezvous_order(b"resize", b"e.png", addresses)[0]
        assert sync_output == [
            "{'ok': True, 'path': 'd.png'}",
            str([n + n for n in range(10)]),
            holder,
        ]
        # The background job e.png runs too: the servers end up holding no resize job.
        wait_until(
            lambda: all(jobs_left(address, "resize") == 0 for address in addresses),
            timeout=SCRIPT_TIMEOUT,
            what="the background resize jobs to run",
        )

        worker.send_signal(signal.SIGTERM)  # graceful stop: exits 0
        assert worker.wait(WORKER_STOP_TIMEOUT) == 0, worker_log.read_text()
    finally:
        stop_process(worker)
    # The function that raised was reported, and the worker kept serving after it.
    assert "KeyError" in worker_log.read_text()

"""The driver's side of bench/load.py: start load processes, start them together, collect.

Each load process is `python -m bench.load ROLE SPEC`. The driver waits until every process of
a group has connected (`ready`), writes `go` to all of them at once so the clocks start
together, and reads one JSON result per process. Processes are stopped by their own PID only,
and every wait has a timeout.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

READY_TIMEOUT = 60.0
"""Seconds for a process to connect and encode its requests; a stuck one fails the run here."""


class LoadProcessError(RuntimeError):
    """A load process failed, reported an error, or did not answer in time."""


class LoadProcess:
    def __init__(self, role: str, spec: dict, log_path: Path) -> None:
        self.role = role
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.load", role, json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=REPO_ROOT,
        )
        self._pending = b""

    def read_line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            readable, _, _ = select.select([fd], [], [], max(0.0, left))
            if not readable:
                raise LoadProcessError(
                    f"{self.role} (pid {self.proc.pid}): no answer in {timeout} s"
                )
            chunk = os.read(fd, 65536)
            if not chunk:
                self.proc.wait(5)
                raise LoadProcessError(
                    f"{self.role} (pid {self.proc.pid}) exited with status "
                    f"{self.proc.returncode}: {self.log_tail()}"
                )
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode()

    def tell(self, word: str) -> None:
        try:
            self.proc.stdin.write(word.encode() + b"\n")  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
        except BrokenPipeError:
            pass  # it already exited; read_line reports why

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        line = self.read_line(timeout)
        if line != "ready":
            raise LoadProcessError(f"{self.role}: {self._error_of(line)}")

    def result(self, timeout: float) -> dict:
        line = self.read_line(timeout)
        result = json.loads(line)
        if not result.get("ok"):
            raise LoadProcessError(result.get("error", line))
        return result

    def _error_of(self, line: str) -> str:
        try:
            return json.loads(line).get("error", line)
        except ValueError:
            return line

    def log_tail(self, size: int = 2000) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-size:]

    def close(self) -> None:
        """Stop the process by its PID if it is still running, and release its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream:
                stream.close()
        self._log.close()


class LoadGroup:
    """Several load processes started together: `with LoadGroup(logdir) as group: ...`."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.processes: list[LoadProcess] = []

    def __enter__(self) -> LoadGroup:
        return self

    def __exit__(self, *exc_info) -> None:
        for process in self.processes:
            process.close()

    def start(
        self, role: str, specs: list[dict], ready_timeout: float = READY_TIMEOUT
    ) -> list[LoadProcess]:
        """Start one process per spec and wait until all of them are ready."""
        started = []
        for spec in specs:
            log_path = self.log_dir / f"load-{role}-{len(self.processes)}.log"
            process = LoadProcess(role, spec, log_path)
            self.processes.append(process)
            started.append(process)
        for process in started:
            process.wait_ready(ready_timeout)
        return started

    @staticmethod
    def go(processes: list[LoadProcess]) -> None:
        for process in processes:
            process.tell("go")

    @staticmethod
    def results(processes: list[LoadProcess], timeout: float) -> list[dict]:
        deadline = time.monotonic() + timeout
        return [p.result(max(1.0, deadline - time.monotonic())) for p in processes]

    def run(self, role: str, specs: list[dict], timeout: float) -> list[dict]:
        """Start, go, and collect: the common case of a group that ends by itself."""
        processes = self.start(role, specs)
        self.go(processes)
        return self.results(processes, timeout)

"""Detaching from the terminal, with the parent waiting until the server really serves.

`jobserver -d` must return 0 only once the port accepts connections, and fail with the real
reason (port busy, bad address) otherwise, so scripts can chain on it. The parent therefore
waits on a pipe: the daemon writes "ok" once it listens, or an error message, and the parent
exits with the matching status.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

READY_TIMEOUT = 30.0
"""How long the parent waits for the daemon to listen before giving up on it."""

_READY = b"ok\n"


class Readiness:
    """The daemon's end of the pipe to the waiting parent (a no-op when not daemonised)."""

    def __init__(self, fd: int | None = None) -> None:
        self._fd = fd

    def ready(self) -> None:
        self._send(_READY)

    def failed(self, message: str) -> None:
        self._send(message.encode(errors="replace"))

    def _send(self, data: bytes) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, data)
        finally:
            os.close(self._fd)
            self._fd = None


def detach() -> Readiness:
    """Double-fork into the background. Returns in the daemon only; the original process exits
    with 0 when the daemon reports ready, 1 when it reports a failure or dies first."""
    read_end, write_end = os.pipe()
    if os.fork() > 0:
        os.close(write_end)
        sys.exit(_wait_for_daemon(read_end))
    os.close(read_end)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)  # the session leader goes; the daemon can never regain a terminal
    os.umask(0o022)
    os.chdir("/")  # do not pin the directory we were started from (paths are resolved first)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    return Readiness(write_end)


def _wait_for_daemon(read_end: int) -> int:
    import select

    chunks = []
    while True:
        ready, _, _ = select.select([read_end], [], [], READY_TIMEOUT)
        if not ready:
            print(
                f"jobserver: the daemon did not start within {READY_TIMEOUT:.0f} s", file=sys.stderr
            )
            return 1
        chunk = os.read(read_end, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    message = b"".join(chunks)
    if message == _READY:
        return 0
    # Only a daemon killed outright (SIGKILL, the OOM killer) says nothing: every startup
    # error, expected or not, is reported through the pipe as one line.
    text = message.decode(errors="replace").strip() or "the daemon exited before it was ready"
    print(f"jobserver: {text}", file=sys.stderr)
    return 1


class PidFile:
    """The server's pid file, claimed before anything is bound and written once it serves.

    Claiming opens (or creates) the file at once, so a path in a missing directory, a
    directory, or a file we may not write fails the start before the port is taken, with the
    file named, in the foreground as in a daemon. The pid is written only once the server
    listens, so a second server started by mistake with the same pid file and port fails
    without overwriting (or removing) the pid of the one that runs.
    """

    def __init__(self, path: Path, fd: int, created: bool) -> None:
        self.path = path
        self._fd: int | None = fd
        self._created = created
        self._pid: int | None = None

    @classmethod
    def claim(cls, path: Path) -> PidFile:
        """Open `path` for writing, creating it if absent. Raises OSError."""
        flags = os.O_WRONLY | os.O_CLOEXEC
        try:
            return cls(path, os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644), created=True)
        except FileExistsError:
            return cls(path, os.open(path, flags), created=False)

    def write(self, pid: int) -> None:
        """Replace the contents with `pid`. Raises OSError (a full disk, say)."""
        assert self._fd is not None, "written twice"
        data = f"{pid}\n".encode()
        os.ftruncate(self._fd, 0)
        if os.pwrite(self._fd, data, 0) != len(data):
            raise OSError(f"short write to {self.path}")
        os.close(self._fd)
        self._fd = None
        self._pid = pid

    def release(self) -> None:
        """At exit: remove the file if it says our pid, or if we created it and never wrote it.
        A file someone else wrote meanwhile (a server started after us) is left alone."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            if self._created:
                self.path.unlink(missing_ok=True)
            return
        try:
            ours = self.path.read_text().strip() == str(self._pid)
        except (OSError, UnicodeError):
            return
        if ours:
            self.path.unlink(missing_ok=True)

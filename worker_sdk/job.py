"""What a worker function receives: the job's identity, its argument, and progress reporting."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import anyio.from_thread

from jobserver.protocol import PacketType, encode_request
from jobserver.sdk.connection import ConnectionLost
from jobserver.sdk.payload import Codec, encode_payload

if TYPE_CHECKING:
    from .server_session import Assignment, ServerLink

log = logging.getLogger("worker_sdk")


class Job:
    """One job, as an `async def` worker function sees it.

    `handle`, `function` and `unique` identify the job (unique is "" when the client gave none);
    `arg` is the argument decoded with the function's codec and `payload` the raw bytes.
    `status`, `data` and `warning` send WORK_STATUS, WORK_DATA and WORK_WARNING to the
    clients waiting on the job, on the connection that assigned it.

    Example:
        >>> from worker_sdk import Worker
        >>> worker = Worker(["127.0.0.1:4730"])
        >>> @worker.function("resize")
        ... async def resize(job):
        ...     await job.status(1, 2)
        ...     await job.data(b"half way")
        ...     return {"path": job.arg["path"], "unique": job.unique}
    """

    __slots__ = (
        "_assignment",
        "_codec",
        "_link",
        "_lost",
        "arg",
        "function",
        "handle",
        "payload",
        "unique",
    )

    def __init__(self, assignment: Assignment, link: ServerLink, codec: Codec, arg: Any) -> None:
        self.handle: str = assignment.handle.decode(errors="replace")
        self.function: str = assignment.function.decode(errors="replace")
        self.unique: str = assignment.unique.decode(errors="replace")
        self.payload: bytes = assignment.payload
        self.arg: Any = arg
        self._assignment = assignment
        self._link = link
        self._codec = codec
        self._lost = False

    def __repr__(self) -> str:
        return f"<Job {self.handle} {self.function!r} from {self._link.address}>"

    async def status(self, numerator: int, denominator: int) -> None:
        """Report progress as numerator/denominator (WORK_STATUS); GET_STATUS shows it too."""
        await self._send(
            PacketType.WORK_STATUS, str(int(numerator)).encode(), str(int(denominator)).encode()
        )

    async def data(self, value: Any) -> None:
        """Send a partial result (WORK_DATA). bytes go as they are; anything else is encoded
        with the function's codec."""
        await self._send(PacketType.WORK_DATA, self._encode(value, "data"))

    async def warning(self, value: Any) -> None:
        """Send a warning (WORK_WARNING); encoded like `data`."""
        await self._send(PacketType.WORK_WARNING, self._encode(value, "warning"))

    def _encode(self, value: Any, what: str) -> bytes:
        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value)
        return encode_payload(self._codec, value, function=self.function, what=what)

    async def _send(self, packet_type: int, *args: bytes) -> bool:
        """Send one WORK_* packet for this job; see _send_packets."""
        return await self._send_packets(encode_request(packet_type, self._assignment.handle, *args))

    async def _send_packets(self, data: bytes) -> bool:
        """Send encoded packets for this job on the connection that assigned it; False (and one
        log line per job) once that connection is gone: the server took the job back when it
        dropped, so progress and result are dropped while the function runs to its end."""
        if self._lost:
            return False
        try:
            await self._link.connection.send_bytes(data)
        except ConnectionLost as error:
            self._lost = True
            log.warning(
                "job %s (%s): connection lost (%s); the server requeues the job, so its "
                "progress and result are dropped",
                self.handle,
                self.function,
                error,
            )
            return False
        return True


class SyncJob:
    """The same job for a plain `def` worker function, which runs in a worker thread: the same
    attributes, and `status`, `data` and `warning` without `await`.

    Example:
        >>> from worker_sdk import Worker
        >>> worker = Worker(["127.0.0.1:4730"], codec="raw")
        >>> @worker.function("upper")
        ... def upper(job):
        ...     job.status(0, 1)
        ...     return job.payload.upper()
    """

    __slots__ = ("_job", "arg", "function", "handle", "payload", "unique")

    def __init__(self, job: Job) -> None:
        self._job = job
        self.handle = job.handle
        self.function = job.function
        self.unique = job.unique
        self.arg = job.arg
        self.payload = job.payload

    def __repr__(self) -> str:
        return repr(self._job).replace("<Job", "<SyncJob", 1)

    def status(self, numerator: int, denominator: int) -> None:
        """Report progress (WORK_STATUS); see Job.status."""
        anyio.from_thread.run(self._job.status, numerator, denominator)

    def data(self, value: Any) -> None:
        """Send a partial result (WORK_DATA); see Job.data."""
        anyio.from_thread.run(self._job.data, value)

    def warning(self, value: Any) -> None:
        """Send a warning (WORK_WARNING); see Job.warning."""
        anyio.from_thread.run(self._job.warning, value)

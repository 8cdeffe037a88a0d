"""Running one assigned job: decode the argument, call the function, report the outcome.

Whatever the function does, the job ends with at most one outcome on the connection that
assigned it: WORK_COMPLETE with the encoded result, or WORK_EXCEPTION followed by WORK_FAIL
(for `Retry`, with the delay asked for in a marker line first: jobserver.sdk.retry). The worker
never dies of a job.

A function's `timeout` (CAN_DO_TIMEOUT) is what the server enforces: past it the server takes
the job back and hands it out again (each time counts towards `--job-retries`, after which the
server fails the job). The worker keeps to the same deadline, so that the superseded run does
not go on taking a slot and its result is not sent to a server that no longer expects it:
an `async def` run is cancelled at the deadline and its slot freed; a plain `def` run cannot be
stopped (it is a thread), so its slot stays taken until it returns, and its late result is
dropped without a word to the server. Nothing is sent for a timed-out run.
"""

from __future__ import annotations

import functools
import logging
import math

import anyio
import anyio.to_thread

from jobserver.protocol import PacketType, encode_request
from jobserver.sdk.errors import PayloadError
from jobserver.sdk.payload import decode_payload, encode_payload, get_codec

from .functions import WorkerFunction
from .job import Job, SyncJob
from .retry import Retry
from .server_session import Assignment, ServerLink

log = logging.getLogger("worker_sdk")


async def run_job(
    function: WorkerFunction | None,
    assignment: Assignment,
    link: ServerLink,
    thread_limiter: anyio.CapacityLimiter,
    deadline: float = math.inf,
) -> None:
    """Run one job to its outcome. Cancellation (the grace period of a stop ran out) propagates
    without sending anything: the server requeues the job when the connection closes."""
    name = assignment.function.decode(errors="replace")
    if function is None:
        # Only a misbehaving server assigns a function we never registered.
        job = Job(assignment, link, get_codec("raw"), None)
        await _report_exception(job, f"LookupError: no function {name!r} on this worker")
        return
    try:
        arg = decode_payload(function.codec, assignment.payload, function=name)
    except PayloadError as error:
        job = Job(assignment, link, function.codec, None)
        log.warning("job %s: %s", job.handle, error)
        await _report_exception(job, _exception_text(error))
        return
    job = Job(assignment, link, function.codec, arg)
    log.debug("job %s (%s) from %s: started", job.handle, name, link.address)
    try:
        if function.is_async:
            with anyio.CancelScope(deadline=deadline) as scope:
                result = await function.func(job)
            if scope.cancelled_caught:
                _log_timeout(job, function, "cancelled")
                return
        else:
            result = await anyio.to_thread.run_sync(
                functools.partial(function.func, SyncJob(job)),
                limiter=thread_limiter,
                # Only a stop's grace period cancels this: a thread cannot be interrupted, so
                # the worker lets go of it then (the process is about to end).
                abandon_on_cancel=True,
            )
            if anyio.current_time() > deadline:
                _log_timeout(job, function, "returned late; its result is dropped")
                return
    except Retry as request:
        log.info(
            "job %s (%s) asked to be retried %s: %s",
            job.handle,
            job.function,
            "with the policy's backoff" if request.delay is None else f"in {request.delay:g} s",
            request.message,
        )
        await _report_exception(job, request.exception_data())
        return
    except Exception as error:  # any failure of user code becomes WORK_EXCEPTION
        log.exception("job %s (%s) raised %s", job.handle, job.function, type(error).__name__)
        await _report_exception(job, _exception_text(error))
        return
    try:
        data = encode_payload(function.codec, result, function=name, what="result")
    except PayloadError as error:
        log.warning("job %s: %s", job.handle, error)
        await _report_exception(job, _exception_text(error))
        return
    if await job._send(PacketType.WORK_COMPLETE, data):
        log.debug("job %s (%s): completed", job.handle, name)


def _log_timeout(job: Job, function: WorkerFunction, what: str) -> None:
    log.warning(
        "job %s (%s) passed its timeout of %g s: %s (the server takes the job back and may hand "
        "it out again, up to --job-retries)",
        job.handle,
        function.name,
        function.timeout,
        what,
    )


def _exception_text(error: BaseException) -> bytes:
    """WORK_EXCEPTION's payload: "<ExceptionType>: <message>" in UTF-8."""
    return f"{type(error).__name__}: {error}".encode(errors="replace")


async def _report_exception(job: Job, text: bytes | str) -> None:
    """WORK_EXCEPTION then WORK_FAIL, as libgearman workers do: clients with the `exceptions`
    option get the text, and servers or clients that predate WORK_EXCEPTION still see the job
    fail. Both gearmand and jobserver end the job at WORK_EXCEPTION and answer the WORK_FAIL
    with ERROR JOB_NOT_FOUND; the session expects that one and does not warn about it."""
    if isinstance(text, str):
        text = text.encode(errors="replace")
    handle = job._assignment.handle
    packets = encode_request(PacketType.WORK_EXCEPTION, handle, text) + encode_request(
        PacketType.WORK_FAIL, handle
    )
    job._link.stale_results_expected += 1
    if not await job._send_packets(packets):
        job._link.stale_results_expected -= 1

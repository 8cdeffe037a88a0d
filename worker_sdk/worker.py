"""Worker: register functions with a decorator, then serve jobs from every server at once."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel
import trio

from jobserver.sdk.addresses import ServerAddress, ServerSpec, parse_addresses
from jobserver.sdk.payload import get_codec
from jobserver.sdk.tasks import background_nursery
from jobserver.sdk.tls import TlsSettings, client_context

from .execution import run_job
from .functions import WorkerFunction, check_registration
from .server_session import UNRESPONSIVE_AFTER, Assignment, ServerLink, ServerSession

log = logging.getLogger("worker_sdk")

DEFAULT_GRACE_PERIOD = 25.0
"""Seconds a stopping worker lets jobs in flight finish before cancelling them. Shorter than
the 30 s Kubernetes (terminationGracePeriodSeconds) and Docker (`stop -t` is 10 s; compose
users raise it) give before SIGKILL is the point: finishing what can finish, then closing the
connections cleanly so the servers requeue the rest at once instead of when keepalive notices."""

MAX_RUNS_WAITED_FOR = 1_000
"""Bound on the runs of one job a new assignment waits out in turn (each is a re-dispatch that
found the previous run still going); far above what concurrency allows, only a loop guard."""

MAX_CONCURRENCY = 10_000
"""Upper bound for concurrency=; each slot may hold a task and, for plain `def` functions, a
thread. Far above any one process's sensible load; it catches typos like 1e9."""

F = TypeVar("F", bound=Callable[..., Any])


class Worker:
    """Serves the functions you register to every job server it is given.

    `servers` are "host:port" strings or (host, port) tuples; the worker connects to all of
    them and takes jobs from each (a server that is down is retried in the background).
    At most `concurrency` jobs run at once across all servers. `codec` ("msgpack", "json" or
    "raw") decodes arguments and encodes results, unless a function chooses its own.
    `client_id` is what `gearadmin --workers` shows (default "<hostname>-<pid>").
    `grace_period` is how long a stop waits for jobs in flight before cancelling them.
    `unresponsive_after`: a server that leaves a GRAB unanswered this long is logged as not
    responding (no job slot waits on it meanwhile). `tls` connects with TLS: a `TlsFiles`
    (the CA that signs the servers' certificates, and this worker's certificate and key for
    servers that require one) or an `ssl.SSLContext` of your own. A server whose certificate
    is refused, or that refuses the worker's, is logged and retried like an unreachable one.

    Example:
        >>> from worker_sdk import Worker
        >>> worker = Worker(["127.0.0.1:4730", "127.0.0.1:4731"], concurrency=4)
        >>> @worker.function("resize", timeout=30)
        ... async def resize(job):
        ...     await job.status(1, 3)
        ...     return {"ok": True, "path": job.arg["path"]}
        >>> # worker.run()  # blocks until SIGTERM/SIGINT or worker.stop()

    Over TLS (bad files raise TlsConfigError here, naming the file)::

        worker = Worker(["jobs.example:4730"],
                        tls=TlsFiles(ca="ca.pem", cert="worker.pem", key="worker.key"))
    """

    def __init__(
        self,
        servers: Iterable[ServerSpec] | str,
        concurrency: int = 1,
        codec: str = "msgpack",
        *,
        client_id: str | None = None,
        grace_period: float = DEFAULT_GRACE_PERIOD,
        unresponsive_after: float = UNRESPONSIVE_AFTER,
        tls: TlsSettings = None,
    ) -> None:
        self.servers = servers  # the setter parses
        self.tls = tls  # the setter builds the context: bad files fail here
        self.concurrency = concurrency
        self.codec = get_codec(codec).name
        self.client_id = client_id if client_id is not None else default_client_id()
        if grace_period < 0:
            raise ValueError("grace_period must be >= 0 seconds")
        self.grace_period = float(grace_period)
        if isinstance(unresponsive_after, bool) or not unresponsive_after > 0:
            raise ValueError("unresponsive_after must be > 0 seconds")
        self.unresponsive_after = float(unresponsive_after)
        self._functions: dict[str, WorkerFunction] = {}
        self._state_lock = threading.Lock()
        self._run: _Run | None = None
        self._stop_pending = False

    # ------------------------------------------------------------------ configuration

    @property
    def servers(self) -> list[ServerAddress]:
        """The servers, parsed; assign "host:port" strings or (host, port) tuples to change them
        (takes effect at the next serve())."""
        return list(self._servers)

    @servers.setter
    def servers(self, specs: Iterable[ServerSpec] | str) -> None:
        self._servers = parse_addresses(specs)

    @property
    def tls(self) -> ssl.SSLContext | None:
        """The TLS context connections use (None: plain TCP). Assign a `TlsFiles`, an
        `ssl.SSLContext` or None to change it (takes effect at the next serve()); files are
        loaded on assignment, so a bad one raises TlsConfigError then.

        Example:
            >>> from worker_sdk import Worker
            >>> worker = Worker(["127.0.0.1:4730"])
            >>> worker.tls is None
            True
        """
        return self._tls

    @tls.setter
    def tls(self, tls: TlsSettings) -> None:
        self._tls = client_context(tls)

    @property
    def concurrency(self) -> int:
        """Most jobs running at once, over all servers (takes effect at the next serve())."""
        return self._concurrency

    @concurrency.setter
    def concurrency(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"concurrency must be an int, not {value!r}")
        if not 1 <= value <= MAX_CONCURRENCY:
            raise ValueError(f"concurrency must be 1..{MAX_CONCURRENCY}, not {value}")
        self._concurrency = value

    @property
    def functions(self) -> Mapping[str, WorkerFunction]:
        """The registered functions by name (read-only)."""
        return MappingProxyType(self._functions)

    def function(
        self,
        name: str,
        timeout: float | None = None,
        codec: str | None = None,
        *,
        retries: int | None = None,
        retry_delay: float | None = None,
    ) -> Callable[[F], F]:
        """Decorator registering `async def f(job)` or `def f(job)` as the function `name`.

        A plain `def` runs in a worker thread and gets a job whose methods need no `await`.
        `timeout` (seconds) registers with CAN_DO_TIMEOUT: the server takes the job back when
        it runs longer. `codec` overrides the worker's codec for this function. The function
        is returned unchanged.

        `retries` sets the function's retry policy on every server the worker connects to
        (jobserver's admin command `retries <name> <n> [<base>]`, sent on each connection):
        a background job whose run fails is run again up to `retries` times, the first retry
        `retry_delay` seconds later (default: the server's --bg-retry-delay), each later one
        twice as long after the one before, then goes to the server's dead set. None (the
        default) leaves the server's own policy alone. Servers that do not know the command
        (gearmand) are served all the same. A run can also ask for its next attempt after a
        delay of its own by raising `worker_sdk.Retry`.

        Example:
            >>> from worker_sdk import Worker
            >>> worker = Worker(["127.0.0.1:4730"], codec="json")
            >>> @worker.function("add", timeout=10, retries=3, retry_delay=2)
            ... def add(job):
            ...     return job.arg["a"] + job.arg["b"]
            >>> sorted(worker.functions)
            ['add']
        """
        check_registration(name, timeout, retries, retry_delay)
        chosen = get_codec(codec if codec is not None else self.codec)

        def register(func: F) -> F:
            if name in self._functions:
                raise ValueError(f"function {name!r} is already registered on this worker")
            with self._state_lock:
                if self._run is not None:
                    raise RuntimeError(f"register {name!r} before the worker starts serving")
                self._functions[name] = WorkerFunction(
                    name,
                    func,
                    timeout=timeout,
                    codec=chosen,
                    retries=retries,
                    retry_delay=retry_delay,
                )
            return func

        return register

    # ------------------------------------------------------------------ running

    async def serve(self) -> None:
        """Serve until stop() is called or serve() is cancelled; both stop gracefully.

        After a stop: no more jobs are grabbed, jobs in flight get `grace_period` seconds to
        finish, the rest are cancelled (their servers requeue them when the connection closes),
        and serve() returns once every connection is closed.

        Example:
            >>> import anyio
            >>> from worker_sdk import Worker
            >>> worker = Worker(["127.0.0.1:4730"])
            >>> @worker.function("ping")
            ... async def ping(job):
            ...     return "pong"
            >>> async def main():
            ...     async with anyio.create_task_group() as tasks:
            ...         tasks.start_soon(worker.serve)
            ...         await anyio.sleep(60)
            ...         worker.stop()
            >>> # asyncio.run(main()) or trio.run(main)
        """
        if not self._functions:
            raise ValueError("no functions registered: decorate one with @worker.function(name)")
        run = _Run(self)
        with self._state_lock:
            if self._run is not None:
                raise RuntimeError("this worker is already serving")
            self._run = run
            if self._stop_pending:
                self._stop_pending = False
                run.stopping.set()
        try:
            async with background_nursery() as nursery:  # run.serve()'s errors come out as is
                finished = anyio.Event()
                nursery.start_soon(self._stop_when_cancelled, run, finished)
                # Cancelling serve() is a stop like any other: shielded, the run finishes its
                # jobs within the grace period; the watcher above turns the cancel into stop().
                with anyio.CancelScope(shield=True):
                    await run.serve()
                finished.set()
        finally:
            with self._state_lock:
                self._run = None

    @staticmethod
    async def _stop_when_cancelled(run: _Run, finished: anyio.Event) -> None:
        try:
            await finished.wait()
        finally:
            if not finished.is_set():  # serve() itself was cancelled
                run.request_stop(now=False)

    def run(self) -> None:
        """Serve in a fresh trio run until SIGTERM or SIGINT (or stop()); then stop gracefully.
        A second signal cancels the jobs still running at once.

        Example:
            >>> from worker_sdk import Worker
            >>> worker = Worker("127.0.0.1:4730")
            >>> @worker.function("ping")
            ... def ping(job):
            ...     return "pong"
            >>> # worker.run()
        """
        trio.run(self._serve_until_signalled)

    def stop(self) -> None:
        """Stop gracefully: from async code, from a signal handler's task or from any thread.
        Returns at once; serve() returns when the stop is complete. A stop requested before
        serve() starts makes it return at once.

        Example:
            >>> import threading
            >>> from worker_sdk import Worker
            >>> worker = Worker(["127.0.0.1:4730"])
            >>> @worker.function("ping")
            ... def ping(job):
            ...     return "pong"
            >>> timer = threading.Timer(60, worker.stop)  # stop from another thread in a minute
            >>> # timer.start(); worker.run()
        """
        self._request_stop(now=False)

    def _request_stop(self, *, now: bool) -> None:
        with self._state_lock:
            run = self._run
            if run is None:
                self._stop_pending = True
                return
        run.request_stop(now=now)

    async def _serve_until_signalled(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            await self.serve()  # signals can only be received in the main thread
            return
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with background_nursery() as nursery:
                nursery.start_soon(self._stop_on_signals, signals)
                await self.serve()
                nursery.cancel_scope.cancel()

    async def _stop_on_signals(self, signals: Any) -> None:
        count = 0
        async for signum in signals:
            count += 1
            name = signal.Signals(signum).name
            if count == 1:
                log.info(
                    "%s: stopping (jobs in flight get %g s; again to cancel them)",
                    name,
                    self.grace_period,
                )
                self._request_stop(now=False)
            else:
                log.warning("%s again: cancelling the jobs still running", name)
                self._request_stop(now=True)


def default_client_id() -> str:
    """The default client id, "<hostname>-<pid>": it tells the processes of a fleet apart in
    `gearadmin --workers`.

    Example:
        >>> import os
        >>> default_client_id().endswith(f"-{os.getpid()}")
        True
    """
    return f"{socket.gethostname()}-{os.getpid()}"


class _Run:
    """The state of one serve(): job slots, the stop signal, the job nursery, the sessions."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.functions = dict(worker._functions)
        self.by_name = {function.name_bytes: function for function in self.functions.values()}
        self.slot_count = worker.concurrency
        self.slots = anyio.CapacityLimiter(self.slot_count)
        # Plain `def` functions get their own threads, never queued behind other to_thread
        # users; the slots already bound how many run.
        self.threads = anyio.CapacityLimiter(worker.concurrency)
        self.stopping = anyio.Event()
        self.grace = anyio.CancelScope()
        # Created inside serve(): the event loop a thread's stop() is handed to.
        self.token = anyio.lowlevel.current_token()
        self.loop_thread = threading.get_ident()
        self.jobs: anyio.abc.TaskGroup | None = None
        self.running: dict[tuple[ServerAddress, bytes], anyio.Event] = {}
        """Jobs running now, by (server, handle): a job handed out again is not run twice."""

    def request_stop(self, *, now: bool) -> None:
        """Thread-safe: directly from this run's own thread, through its token otherwise."""
        if threading.get_ident() == self.loop_thread:
            self._stop(now)
            return
        with contextlib.suppress(anyio.RunFinishedError):  # serve() is over already
            anyio.from_thread.run_sync(self._stop, now, token=self.token)

    def _stop(self, now: bool) -> None:
        self.stopping.set()
        if now:
            self.grace.cancel()

    async def serve(self) -> None:
        worker = self.worker
        log.info(
            "worker %s serving %s on %s (concurrency %d)",
            worker.client_id,
            ", ".join(self.functions),
            ", ".join(map(str, worker.servers)),
            worker.concurrency,
        )
        async with background_nursery() as sessions:
            for address in worker.servers:
                session = ServerSession(
                    address,
                    list(self.functions.values()),
                    worker.client_id,
                    self.slots,
                    self.stopping,
                    self.start_job,
                    unresponsive_after=worker.unresponsive_after,
                    tls=worker.tls,
                )
                sessions.start_soon(session.run, name=f"worker session {address}")
            await self._run_jobs()
            sessions.cancel_scope.cancel()  # every job has ended: disconnect
        log.info("worker %s stopped", worker.client_id)

    async def _run_jobs(self) -> None:
        """Host the jobs until a stop, then give them the grace period."""
        async with anyio.create_task_group() as jobs:
            self.jobs = jobs
            await self.stopping.wait()
            grace_period = self.worker.grace_period
            in_flight = self.slots.borrowed_tokens
            log.info(
                "stopping: grabbing no more jobs; %d in flight get %g s", in_flight, grace_period
            )
            self.grace.deadline = min(self.grace.deadline, anyio.current_time() + grace_period)
            returned = 0
            with self.grace:
                # Every slot back means no job runs and no GRAB awaits its answer.
                for _ in range(self.slot_count):
                    await self.slots.acquire_on_behalf_of(object())
                    returned += 1
            if self.grace.cancelled_caught:
                still_running = self.slots.borrowed_tokens - returned
                if still_running:
                    log.warning(
                        "grace period over: cancelling %d job(s); their servers requeue them",
                        still_running,
                    )
                jobs.cancel_scope.cancel()
        self.jobs = None

    def start_job(self, assignment: Assignment, link: ServerLink, slot: object) -> None:
        jobs = self.jobs
        if jobs is None:  # assigned after the jobs were cancelled: the disconnect requeues it
            self.slots.release_on_behalf_of(slot)
            return
        function = self.by_name.get(assignment.function)
        jobs.start_soon(self._job, function, assignment, link, slot)

    async def _job(
        self,
        function: WorkerFunction | None,
        assignment: Assignment,
        link: ServerLink,
        slot: object,
    ) -> None:
        assigned_at = anyio.current_time()
        timeout = function.effective_timeout if function is not None else None
        deadline = assigned_at + (math.inf if timeout is None else timeout)
        key = (link.address, assignment.handle)
        try:
            # The server hands a job out again once its timeout passed; if our superseded run
            # (a thread that cannot be stopped) still goes on, the new one waits for it: the
            # same job never runs twice at once here.
            for _ in range(MAX_RUNS_WAITED_FOR):
                earlier = self.running.get(key)
                if earlier is None:
                    break
                await earlier.wait()
            if anyio.current_time() > deadline:
                return  # the server already took this assignment back too: nothing to run
            finished = self.running[key] = anyio.Event()
            try:
                await run_job(function, assignment, link, self.threads, deadline)
            finally:
                del self.running[key]
                finished.set()
        finally:
            self.slots.release_on_behalf_of(slot)

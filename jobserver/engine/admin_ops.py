"""The operator's commands on the engine: `create function`, `cancel job`, `drop function`,
`maxqueue` (the admin protocol, admin.py, parses them and checks permissions; this applies
them). Part of `Engine` (a mixin), like workers.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from ..protocol import PacketType as T
from ..protocol import encode
from .function import Function
from .functions import FunctionTable
from .job import Job, JobState, Priority


class AdminOperations:
    """The operator-facing half of `Engine`; see the module docstring."""

    # Provided by Engine.
    functions: FunctionTable
    jobs: dict[bytes, Job]
    _forget_if_unused: Callable[[Function], None]
    _notify: Callable[[Job, bytes], None]
    _detach_listeners: Callable[[Job], None]
    _unindex: Callable[[Job], None]

    def create_function(self, name: bytes) -> Function:
        """`create function`: the function, kept while idle until `drop function`."""
        function = self.functions.get_or_create(name)
        function.explicit = True
        return function

    def cancel_job(self, handle: bytes) -> bool:
        """`cancel job`: listeners get WORK_FAIL and the job is forgotten. A running job cannot
        be stopped (the worker is not told), but unlike gearmand (§3.12, §6.14) its listeners
        get nothing more, so no client sees WORK_FAIL and then WORK_COMPLETE."""
        job = self.jobs.get(handle)
        if job is None:
            return False
        if job.listeners:
            self._notify(job, encode(T.WORK_FAIL, job.handle))
        self._detach_listeners(job)
        self._unindex(job)
        if job.state == JobState.QUEUED:
            job.function.forget_queued(job)
            job.state = JobState.GONE
        elif job.state == JobState.WAITING:
            job.function.waiting -= 1
            job.state = JobState.GONE
        elif job.state == JobState.PENDING or job.state == JobState.HELD:
            job.function.pending -= 1
            job.state = JobState.GONE
        else:
            job.state = JobState.DETACHED
        self._forget_if_unused(job.function)
        return True

    def drop_function(self, name: bytes) -> str:
        """`drop function`: 'ok', 'not-found', 'busy' (workers or running jobs, as gearmand) or
        'queued'. gearmand drops a function with queued jobs and orphans them (§4); we refuse."""
        function = self.functions.find_ignoring_case(name)
        if function is None:
            return "not-found"
        if function.registrations or function.running:
            return "busy"
        if function.has_runnable or function.waiting or function.pending:
            return "queued"
        function.explicit = False
        self.functions.forget_if_unused(function)
        return "ok"

    def set_max_queue(self, name: bytes, limits: Iterable[int]) -> None:
        """`maxqueue`: limits per priority (HIGH, NORMAL, LOW), <= 0 unlimited. gearmand ignores
        the command for a function it does not know yet (§4); we create it so the limit an
        operator sets before workers connect is not lost."""
        limits = [max(0, limit) for limit in limits]
        if len(limits) != len(Priority):
            raise ValueError("maxqueue needs one limit per priority (HIGH, NORMAL, LOW)")
        self.create_function(name).limits = limits

    def iter_jobs(self) -> Iterator[Job]:
        return iter(self.jobs.values())

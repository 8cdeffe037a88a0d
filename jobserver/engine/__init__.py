"""The job engine: pure state, no I/O (style.md §2)."""

from .engine import Engine
from .function import Function
from .job import Job, JobState, Priority
from .peer import Peer

__all__ = ["Engine", "Function", "Job", "JobState", "Peer", "Priority"]

"""Worker SDK: serve Python functions as Gearman jobs from every job server of a cluster.

Example:
    >>> from worker_sdk import Worker
    >>> worker = Worker(["127.0.0.1:4730", "127.0.0.1:4731"])
    >>> @worker.function("resize", timeout=30)
    ... async def resize(job):
    ...     await job.status(1, 3)
    ...     return {"ok": True}
    >>> # worker.run()   # or `await worker.serve()` inside trio

Over TLS: `Worker([...], tls=TlsFiles(ca="ca.pem", cert="worker.pem", key="worker.key"))`.
"""

from jobserver.sdk.tls import TlsConfigError, TlsFiles

from .functions import WorkerFunction
from .job import Job, SyncJob
from .retry import Retry
from .worker import Worker

__all__ = ["Job", "Retry", "SyncJob", "TlsConfigError", "TlsFiles", "Worker", "WorkerFunction"]

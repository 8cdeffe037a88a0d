"""Submit jobs to a cluster of Gearman-compatible job servers and get their results.

    from client_sdk import Client, SyncClient

    async with Client(["10.0.0.1:4730", "10.0.0.2:4730"]) as client:
        result = await client.submit("resize", {"path": "a.png"})                # foreground
        handle = await client.submit_background("resize", {"path": "b.png"}, unique="b.png")
        async with client.stream("resize", {"path": "c.png"}) as job:            # progress
            async for update in job:                  # Status(...), Data(...), Warning(...)
                print(update)
        print(await job.result(), await client.status(handle))

    with SyncClient(["10.0.0.1:4730"]) as client:                                # no async
        client.submit("resize", {"path": "a.png"})

    async with Client(["jobs.example:4730"], tls=TlsFiles(ca="ca.pem")) as client:  # TLS
        ...

Files: client.py (the API), server_pool.py (which server, failover), session.py (one pipelined
connection), jobs.py (handles, updates, waiters), stream.py (progress), submission.py (request
checks and encoding), sync.py (SyncClient).
"""

from jobserver.sdk.errors import (
    GearmanError,
    JobException,
    JobFailed,
    JobLost,
    JobTimeout,
    NoServerAvailable,
    PayloadError,
    ServerError,
)
from jobserver.sdk.tls import TlsConfigError, TlsFiles

from .client import Client
from .jobs import Data, JobHandle, JobState, JobStatus, Status, Update, Warning
from .stream import JobStream
from .submission import Priority
from .sync import SyncClient, SyncJobStream

__all__ = [
    "Client",
    "Data",
    "GearmanError",
    "JobException",
    "JobFailed",
    "JobHandle",
    "JobLost",
    "JobState",
    "JobStatus",
    "JobStream",
    "JobTimeout",
    "NoServerAvailable",
    "PayloadError",
    "Priority",
    "ServerError",
    "Status",
    "SyncClient",
    "SyncJobStream",
    "TlsConfigError",
    "TlsFiles",
    "Update",
    "Warning",
]

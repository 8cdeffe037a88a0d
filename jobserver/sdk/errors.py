"""Exceptions the SDKs raise. All derive from GearmanError."""

from __future__ import annotations


class GearmanError(Exception):
    """Base of every SDK error."""


class NoServerAvailable(GearmanError):
    """No configured server could be reached (each one's reason is in the message)."""


class ServerError(GearmanError):
    """The server answered a request with an ERROR packet."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(f"{code}: {text}")
        self.code = code
        self.text = text


class JobError(GearmanError):
    """A submitted job did not produce a result."""

    def __init__(self, message: str, *, function: str = "", handle: str = "") -> None:
        super().__init__(message)
        self.function = function
        self.handle = handle


class JobFailed(JobError):
    """The worker reported failure (WORK_FAIL), or the server gave up on the job."""


class JobException(JobFailed):
    """The worker's function raised; `exception` is the worker's text for it."""

    def __init__(self, message: str, exception: str, **kwargs: str) -> None:
        super().__init__(message, **kwargs)
        self.exception = exception


class JobLost(JobError):
    """The server holding the job went away after accepting it; its outcome is unknown."""


class JobTimeout(JobError, TimeoutError):
    """The job did not finish within the call's timeout (it may still run on the server)."""


class PayloadError(GearmanError, ValueError):
    """A value could not be encoded, or bytes could not be decoded, with the chosen codec."""


class ProtocolViolation(GearmanError):
    """The server sent something the protocol does not allow here."""

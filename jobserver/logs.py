"""The server's log: gearmand's level names, where the lines go, and reopening on SIGHUP.

Levels follow gearmand (FATAL .. DEBUG), with NOTICE between WARNING and INFO. The default is
NOTICE, so that what an operator needs after the fact reaches the log file without asking:
lifecycle events (listening, the store opened and where, shutdown, SIGHUP) are logged at
NOTICE, limits hit (connections refused, the memory budget, slow readers) at WARNING, store
problems and misbehaving peers at WARNING or ERROR. gearmand's default is ERROR, which keeps
all of that out of its log.

A log file is reopened on SIGHUP, which is what logrotate sends after renaming the file away
(`postrotate kill -HUP ...`): new lines go to a new file at the configured path.

Lines are text (`--log-format text`, the default) or one JSON object each (`--log-format
json`) for log shippers (journald, Loki, Elasticsearch): a record is always exactly one line,
whatever newlines its message or traceback holds.
"""

from __future__ import annotations

import datetime
import enum
import json
import logging
import sys

NOTICE = 25
"""Between WARNING (30) and INFO (20), as syslog's and gearmand's NOTICE."""
logging.addLevelName(NOTICE, "NOTICE")

LOGGER_NAME = "jobserver"
"""Every server module logs under this name (or a child of it, e.g. jobserver.store.sqlite)."""

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
"""The text format's line. Its message is not escaped: a traceback spans several lines."""

TEXT, JSON = "text", "json"

log = logging.getLogger(LOGGER_NAME)


class Verbosity(enum.StrEnum):
    """gearmand's level names (§5); FATAL, ALERT and CRITICAL all mean Python's CRITICAL."""

    FATAL = "FATAL"
    ALERT = "ALERT"
    CRITICAL = "CRITICAL"
    ERROR = "ERROR"
    WARNING = "WARNING"
    NOTICE = "NOTICE"
    INFO = "INFO"
    DEBUG = "DEBUG"

    @property
    def level(self) -> int:
        return _LEVELS[self]


_LEVELS = {
    Verbosity.FATAL: logging.CRITICAL,
    Verbosity.ALERT: logging.CRITICAL,
    Verbosity.CRITICAL: logging.CRITICAL,
    Verbosity.ERROR: logging.ERROR,
    Verbosity.WARNING: logging.WARNING,
    Verbosity.NOTICE: NOTICE,
    Verbosity.INFO: logging.INFO,
    Verbosity.DEBUG: logging.DEBUG,
}

DEFAULT_VERBOSITY = Verbosity.NOTICE
"""Lifecycle events, limits hit and errors: a handful of lines a day on a healthy server."""

STDERR = "stderr"
NOWHERE = "none"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (ISO 8601, local time with its UTC offset, milliseconds),
    level (gearmand's names, as the text format), logger, message, and exception (the
    traceback text) when there is one. json.dumps escapes newlines and control characters,
    and ensure_ascii keeps undecodable bytes (surrogate escapes) writable."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created)
            .astimezone()
            .isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry)


class ReopenableFileHandler(logging.FileHandler):
    """A file handler that can switch to a new file at the same path (after logrotate)."""

    def reopen(self) -> None:
        """Open the path anew and write there from now on. Raises OSError if it cannot be
        opened; the old file then stays in use, so logging never stops."""
        stream = self._open()  # as the stdlib's WatchedFileHandler does when it reopens
        self.acquire()
        try:
            old, self.stream = self.stream, stream
        finally:
            self.release()
        if old is not None:
            old.close()


def configure(destination: str, level: int, log_format: str = TEXT) -> logging.Handler:
    """Send the server's log to `destination`: "stderr", "none", or a file path (appended to),
    as `log_format` ("text" or "json") lines. Raises OSError if the file cannot be opened.
    Returns the handler, for `reopen` (which keeps its format)."""
    formatter = JsonFormatter() if log_format == JSON else logging.Formatter(LOG_FORMAT)
    handler: logging.Handler
    if destination == NOWHERE:
        handler = logging.NullHandler()
    elif destination == STDERR:
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = ReopenableFileHandler(destination)
    handler.setFormatter(formatter)
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    return handler


def logs_to_stderr(handler: logging.Handler) -> bool:
    return type(handler) is logging.StreamHandler and handler.stream is sys.stderr


def reopen(handler: logging.Handler) -> None:
    """What SIGHUP does: reopen a log file (logrotate renamed it away); otherwise nothing."""
    if not isinstance(handler, ReopenableFileHandler):
        log.log(NOTICE, "SIGHUP received: no log file to reopen; still serving")
        return
    try:
        handler.reopen()
    except OSError as error:
        log.error(
            "SIGHUP received: cannot reopen log file %s: %s; still writing to the old file",
            handler.baseFilename,
            error.strerror or error,
        )
        return
    log.log(NOTICE, "SIGHUP received: log file %s reopened", handler.baseFilename)

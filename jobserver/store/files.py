"""The file moves of a rewrite: when the database was deleted or replaced while in use, the
store writes its live jobs into a new file (sqlite.py) and puts that file in place here.

The order makes every crash recoverable: the new file is written and synced under a hidden
name first (`.jobserver-<port>.sqlite3.rewrite`); a file found at the database's path is moved
aside, never overwritten; the old connection is closed, which deletes the old file's -wal and
-shm (SQLite would apply a WAL it finds beside a database to it); then the new file is renamed
into place and the directory synced. A crash before the rename leaves the complete new file
under its hidden name, and the next start puts it in place (`adopt_unfinished_rewrite`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

REWRITE_SUFFIX = ".rewrite"
"""The new file of a rewrite keeps this hidden name until it is complete and in place."""

MOVED_ASIDE_NAMES = 100
"""Names tried for a file moved aside (`<name>.replaced-<time>[.<n>]`): far more than one
second can need; past that, something renames files over the database in a loop."""


def rewrite_path(database: Path) -> Path:
    return database.with_name(f".{database.name}{REWRITE_SUFFIX}")


def journal(database: Path) -> Path:
    """The rollback journal SQLite keeps beside a database not in WAL mode."""
    return database.with_name(database.name + "-journal")


def sidecars(database: Path) -> tuple[Path, Path]:
    """The -wal and -shm files of a database in WAL mode."""
    return database.with_name(database.name + "-wal"), database.with_name(database.name + "-shm")


def move_aside(path: Path) -> Path | None:
    """Rename whatever is at `path` (not ours: it replaced our file) to a new name beside it,
    and return that; None if nothing is there. OSError if it cannot be moved."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(MOVED_ASIDE_NAMES):
        aside = path.with_name(f"{path.name}.replaced-{stamp}" + (f".{attempt}" if attempt else ""))
        if aside.exists():
            continue
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return None
        return aside
    raise FileExistsError(f"no free name to move {path} aside")


def remove_files(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def sync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (the file's own data is synced already)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def adopt_unfinished_rewrite(database: Path) -> None:
    """At start (the database locked): a complete new file left by a rewrite that a crash
    stopped before its rename holds the newest jobs; it is put in place, moving aside what is
    there. An incomplete one (its rollback journal beside it: it was being written) is
    deleted: the old file was still in use then. OSError if the files cannot be moved."""
    new = rewrite_path(database)
    if not new.exists():
        return
    if journal(new).exists():
        remove_files(new, journal(new))
        return
    aside = move_aside(database)
    remove_files(*sidecars(database))  # the old file's, which are no longer beside it
    os.replace(new, database)
    sync_directory(database.parent)
    log.warning(
        "job database %s: put in place the new file of a rewrite a crash interrupted%s",
        database,
        f" (moved {aside.name} aside)" if aside else "",
    )

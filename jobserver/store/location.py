"""Where the durable store lives when no --data-dir is given.

An absolute directory that does not depend on where the server was started, so a restart from
another directory finds the same jobs (a relative default once made a restart from elsewhere
come up silently with an empty queue). The choices follow the FHS and the XDG base directory
spec: what a systemd unit (StateDirectory=) or a packaged service would use as root, the
user's state directory otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

SYSTEM_DATA_DIR = Path("/var/lib/jobserver")
"""Root's default: persistent variable state of a system service (FHS 5.8)."""

APP_DIR_NAME = "jobserver"


def default_data_dir() -> Path:
    """/var/lib/jobserver as root; $XDG_STATE_HOME/jobserver (default ~/.local/state/jobserver)
    for anyone else. Always absolute.

    >>> default_data_dir().is_absolute()
    True
    """
    if os.geteuid() == 0:
        return SYSTEM_DATA_DIR
    state_home = os.environ.get("XDG_STATE_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    if state_home and Path(state_home).is_absolute():
        return Path(state_home) / APP_DIR_NAME
    return Path.home() / ".local" / "state" / APP_DIR_NAME

"""jobserver.gc_policy: survivors of a full collection are frozen, and unfrozen once an interval.

Each check runs in a Python process of its own: the policy changes that interpreter's garbage
collector, which the test process must keep as it is.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import gc
    import weakref

    from jobserver.gc_policy import FreezeSurvivors

    now = [0.0]
    gc.callbacks.append(FreezeSurvivors(interval=100.0, clock=lambda: now[0]))


    class Node:
        pass


    # Survivors of a full collection are frozen: later ones do not scan them.
    kept = [Node() for _ in range(1000)]
    gc.collect()
    assert gc.get_freeze_count() >= 1000, gc.get_freeze_count()

    # Frozen objects still go by reference counting (how finished jobs go).
    first = weakref.ref(kept[0])
    kept.clear()
    assert first() is None, "a frozen object outlived its last reference"

    # A cycle among frozen objects waits for the unfreeze...
    a, b = Node(), Node()
    a.other, b.other = b, a
    cycle = weakref.ref(a)
    gc.collect()  # a and b survive it: frozen
    del a, b
    gc.collect()
    assert cycle() is not None, "frozen objects were scanned"

    # ... which comes after the interval: the next full collection looks at everything.
    now[0] = 101.0
    gc.collect()  # unfreezes when it ends
    assert gc.get_freeze_count() == 0, gc.get_freeze_count()
    gc.collect()
    assert cycle() is None, "the cycle was not collected after the unfreeze"
    assert gc.get_freeze_count() > 0, "freezing did not resume"  # (this collection froze)
    print("checked")
    """
)


def test_full_collections_freeze_survivors_and_an_unfreeze_comes_once_an_interval():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "checked"


def test_the_jobserver_command_installs_the_policy_and_an_embedding_program_does_not(tmp_path):
    """`jobserver` installs it before serving (here it then stops at once: its data directory
    is a file); importing the server as a library changes nothing."""
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    check = textwrap.dedent(
        f"""
        import gc, sys
        from jobserver import cli, server
        from jobserver.gc_policy import FreezeSurvivors

        def installed():
            return [c for c in gc.callbacks if isinstance(c, FreezeSurvivors)]

        assert not installed(), "importing the server changed the collector"
        sys.argv = ["jobserver", "-p", "0", "--data-dir", {str(not_a_directory / "data")!r}]
        try:
            cli.main()
        except SystemExit as stop:
            assert stop.code == 1, stop.code
        assert len(installed()) == 1, gc.callbacks
        print("checked")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", check], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "checked"

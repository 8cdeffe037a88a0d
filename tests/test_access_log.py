"""How ACL denials are logged (jobserver/access.py DenialLog): each new kind at once, repeats
of a kind at most once per DENIAL_REPEAT_INTERVAL with their count, the rest at DEBUG; the
kinds remembered are bounded."""

from __future__ import annotations

import logging

from jobserver.access import DENIAL_REPEAT_INTERVAL, MAX_DENIAL_KINDS, DenialLog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_each_kind_warns_once_then_once_per_interval_with_the_count():
    clock = Clock()
    denials = DenialLog(clock)
    assert denials.note("a may not register f") == (logging.WARNING, 0)
    assert denials.note("b may not submit g") == (logging.WARNING, 0)  # another kind: at once
    for _ in range(20):
        assert denials.note("a may not register f") == (logging.DEBUG, 0)
    clock.now += DENIAL_REPEAT_INTERVAL
    assert denials.note("a may not register f") == (logging.WARNING, 20)
    assert denials.note("a may not register f") == (logging.DEBUG, 0)
    assert denials.total == 24


def test_the_kinds_remembered_are_bounded_oldest_forgotten_first():
    clock = Clock()
    denials = DenialLog(clock)
    for n in range(MAX_DENIAL_KINDS + 1):
        assert denials.note(f"kind {n}")[0] == logging.WARNING
    assert denials.note(f"kind {MAX_DENIAL_KINDS}")[0] == logging.DEBUG  # still remembered
    assert denials.note("kind 0")[0] == logging.WARNING  # forgotten: warned again

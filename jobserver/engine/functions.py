"""The function names the engine knows: made on demand, forgotten once nothing uses them, and
found case-insensitively for `drop function`, each in O(1)."""

from __future__ import annotations

from .function import Function


class FunctionTable(dict[bytes, Function]):
    """Functions by name (a dict, so `status` walks it as it is), plus an index by lowercased
    name of the functions whose name is not all lowercase: `drop function` matches names
    case-insensitively as gearmand does, and scanning every name for that took 12 s for 2,000
    drops among 100,000 functions. All-lowercase names, most of them, cost the index nothing."""

    __slots__ = ("_by_lowercase",)

    def __init__(self) -> None:
        super().__init__()
        # A Function, or a dict by name when several names differ only in case.
        self._by_lowercase: dict[bytes, Function | dict[bytes, Function]] = {}

    def get_or_create(self, name: bytes) -> Function:
        """The function of that name, created if new (CAN_DO, SUBMIT_*)."""
        function = self.get(name)
        if function is None:
            function = self[name] = Function(name)
            lowered = name.lower()
            if lowered != name:
                same = self._by_lowercase.get(lowered)
                if same is None:
                    self._by_lowercase[lowered] = function
                elif isinstance(same, Function):
                    self._by_lowercase[lowered] = {same.name: same, name: function}
                else:
                    same[name] = function
        return function

    def forget_if_unused(self, function: Function) -> None:
        """Forget a function nothing uses any more (no workers, no jobs, no operator setting),
        so names clients mention once do not stay forever; gearmand keeps every name."""
        if function.in_use or self.get(function.name) is not function:
            return
        name = function.name
        del self[name]
        lowered = name.lower()
        if lowered != name:
            same = self._by_lowercase[lowered]
            if isinstance(same, Function):
                del self._by_lowercase[lowered]
            else:
                del same[name]
                if len(same) == 1:
                    self._by_lowercase[lowered] = next(iter(same.values()))

    def find_ignoring_case(self, name: bytes) -> Function | None:
        """The function of that name, or else one whose name differs only in ASCII case."""
        function = self.get(name)
        if function is not None:
            return function
        lowered = name.lower()
        function = self.get(lowered)
        if function is not None:
            return function
        same = self._by_lowercase.get(lowered)
        if same is None or isinstance(same, Function):
            return same
        return next(iter(same.values()))

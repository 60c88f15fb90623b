"""The clock the benches time a check's pieces with.

``Pieces.clocked(name, call)`` wraps a function so that each call's time is
added to ``spent[name]``, but only when the call is made on the thread that
made the ``Pieces``: the releasing thread's work is off the check's clock.
Standard library only, and nothing beyond ``time`` and ``threading``: the
cold bench imports it in a fresh interpreter before the pieces it times.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable


class Pieces:
    def __init__(self) -> None:
        self.caller = threading.get_ident()
        self.spent: dict[str, int] = {}

    def clocked(self, name: str, call: Callable[..., Any]) -> Callable[..., Any]:
        spent, caller = self.spent, self.caller

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter_ns()
            try:
                return call(*args, **kwargs)
            finally:
                if threading.get_ident() == caller:
                    spent[name] = spent.get(name, 0) + time.perf_counter_ns() - start

        return timed


class Parked:
    """``with Parked(module):`` keeps the module's releasing thread inside a
    job of ours for the block: the check's teardowns queue behind it and
    run after the block, off the clock, as the C floors' come after theirs.
    Nothing where no thread takes teardowns (see _teardown_thread)."""

    def __init__(self, module: Any) -> None:
        self.module = module
        self.go: Any = None

    def __enter__(self) -> Parked:
        import _thread

        releaser = self.module._teardown_thread()
        if releaser is None:
            return self
        self.go, inside = _thread.allocate_lock(), _thread.allocate_lock()
        self.go.acquire()
        inside.acquire()
        go = self.go

        def park() -> None:
            inside.release()
            go.acquire()

        releaser.put(park)
        releaser.let_go()  # a hold left by an interrupted check would keep it waiting
        inside.acquire()  # the thread is in the job: the check's jobs queue
        return self

    def __exit__(self, *exc: object) -> None:
        if self.go is not None:
            self.go.release()
            self.go = None

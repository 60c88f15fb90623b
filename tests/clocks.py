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

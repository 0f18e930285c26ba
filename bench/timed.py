"""Run a body on N threads, released together, until a shared deadline.

The journal row's writers and the Python load generator's clients both need
it: threads started first must not get a head start, the clock runs from the
release, and a thread that fails or hangs fails the row instead of
shrinking it quietly.
"""

from __future__ import annotations

import threading
import time
from typing import Callable


def run_for(count: int, seconds: float, body: Callable[[int, float], None],
            grace: float = 60.0) -> float:
    """Run ``body(k, stop_at)`` on ``count`` threads (k = 0..count-1), all
    released at once; ``stop_at`` is the ``perf_counter`` deadline each
    body watches. Return the seconds from release until all have ended."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(count + 1)
    stop_at: list[float] = []

    def run(k: int) -> None:
        try:
            barrier.wait(30)
            body(k, stop_at[0])
        except BaseException as err:  # noqa: BLE001 - re-raised below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(k,), daemon=True)
               for k in range(count)]
    for t in threads:
        t.start()
    began = time.perf_counter()
    stop_at.append(began + seconds)
    barrier.wait(30)
    for t in threads:
        t.join(seconds + grace)
    elapsed = time.perf_counter() - began
    if errors:
        raise RuntimeError(f"a thread failed: {errors[0]!r}") from errors[0]
    if any(t.is_alive() for t in threads):
        raise RuntimeError("a thread did not finish in time")
    return elapsed

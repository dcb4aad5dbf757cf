"""CPU time by stage of a request's work outside the model: where a front end's CPU goes.

Each stage is timed with the calling thread's own CPU clock (`time.thread_time_ns`, about 0.3 µs a call), so
time spent waiting (for the device, a lock, the event loop) is not counted, and stages timed on different
threads add up to the process's CPU time for them. Knows nothing of HTTP or Prometheus: genrec/serve/ exports the
totals on /metrics, and a benchmark divides them by the requests served.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

STAGES = ("parse", "render", "tokenise", "retrieve", "layout", "rank", "results", "encode")
"""A request's stages, in order. parse: the request's history resolved; render: its prompt from the template;
tokenise: the prompt's token ids; retrieve: the retriever's candidates; layout: candidate tries and their tree
layouts; rank: the engine (packing, the model's forward pass, top-k; on a GPU, the launch and the wait);
results: ranked items as catalogue recommendations; encode: the response built and serialised."""


class StageClock:
    """Thread CPU seconds accumulated per stage (STAGES), from any number of threads."""

    def __init__(self) -> None:
        self._ns = dict.fromkeys(STAGES, 0)
        self._lock = threading.Lock()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Count the calling thread's CPU time inside the block against `name`."""
        start = time.thread_time_ns()
        try:
            yield
        finally:
            self.add(name, time.thread_time_ns() - start)

    def add(self, name: str, ns: int) -> None:
        if name not in self._ns:
            raise ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
        with self._lock:
            self._ns[name] += ns

    def seconds(self) -> dict[str, float]:
        """Each stage's CPU seconds so far."""
        with self._lock:
            return {k: v / 1e9 for k, v in self._ns.items()}

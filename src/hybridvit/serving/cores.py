"""The cores a server's models share, fairly in seconds: one model call at a time (each call
uses every core), and among the models with a call waiting, the one that has had the least time on
the cores goes next.

Taking turns call by call, a model whose batches take longer gets more of the machine, and two
models under load get the same images per second (measured: LeViT-128S beside LeViT-192 got 0.39x
of its alone-rate; fair in seconds, with each batcher keeping a batch waiting here, 0.48x each,
docs/serving.md). A model that was idle joins at the least time of those waiting, so it neither
starves the others nor is starved for the time it spent idle.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Executor, Future
from typing import Any


class Cores:
    """One thread runs every model call; ``lane(key)`` is the executor one model submits to."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._waiting: dict[Hashable, deque[tuple[Future, Callable[..., Any], tuple[Any, ...]]]] = {}
        self.used: dict[Hashable, float] = {}  # seconds on the cores, per model (its virtual time)
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="model", daemon=True)
        self._thread.start()

    def lane(self, key: Hashable) -> Executor:
        return _Lane(self, key)

    def submit(self, key: Hashable, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        with self._changed:
            if self._closed:
                raise RuntimeError("the server's cores are shut down")
            queue = self._waiting.setdefault(key, deque())
            if not queue:  # joining: at the least time of those waiting, never below its own
                waiting = [self.used.get(k, 0.0) for k, q in self._waiting.items() if q]
                self.used[key] = max(self.used.get(key, 0.0), min(waiting, default=0.0))
            queue.append((future, fn, args))
            self._changed.notify()
        return future

    def _next(self) -> tuple[Hashable, Future, Callable[..., Any], tuple[Any, ...]] | None:
        with self._changed:
            while not any(self._waiting.values()):
                if self._closed:
                    return None
                self._changed.wait()
            key = min((k for k, q in self._waiting.items() if q), key=lambda k: self.used.get(k, 0.0))
            return (key, *self._waiting[key].popleft())

    def _work(self) -> None:
        while (job := self._next()) is not None:
            key, future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            start = time.perf_counter()
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - the caller gets it through the future
                future.set_exception(e)
            with self._changed:
                self.used[key] = self.used.get(key, 0.0) + time.perf_counter() - start

    def shutdown(self) -> None:
        """Run what was submitted, then stop the thread."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()


class _Lane(Executor):
    """One model's way onto the cores (what ``loop.run_in_executor`` takes)."""

    def __init__(self, cores: Cores, key: Hashable) -> None:
        self.cores, self.key = cores, key

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        if kwargs:
            return self.cores.submit(self.key, lambda: fn(*args, **kwargs))
        return self.cores.submit(self.key, fn, *args)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass  # the cores outlive any one model

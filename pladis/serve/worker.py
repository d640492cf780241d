"""The GPU worker: one thread owns the runtime; a bounded queue feeds it batches of compatible requests.

Requests that share every sampling setting (size, steps, scheduler, guidance, negative prompt) are batched
up to the engine's maximum within a short window. Each image has its own seed, so a batched image equals
the image the same request gets alone. Expired or abandoned requests are dropped before they run.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field


class QueueFull(Exception):
    """The queue is at its bound: the caller should answer 429 with Retry-After."""


class ShuttingDown(Exception):
    """The server is stopping and does not take (or finish queuing) work."""


@dataclass
class Job:
    """One request: ``n`` images of one prompt, with its seeds and sampling settings."""

    key: tuple  # (height, width, steps, scheduler, guidance, negative_prompt): what must match to batch
    prompt: str
    seeds: list[int]
    deadline: float
    future: Future = field(default_factory=Future)
    abandoned: bool = False  # set by the HTTP side on timeout or client disconnect


class Worker:
    """Runs ``generate(prompts, seeds, key)`` batches on one thread."""

    def __init__(self, generate, max_batch: int, max_queue: int, window_s: float, metrics=None):
        self.generate, self.max_batch, self.max_queue, self.window_s = generate, max_batch, max_queue, window_s
        self.metrics = metrics
        self.jobs: deque[Job] = deque()
        self.cond = threading.Condition()
        self.accepting, self.running = True, True
        self.thread = threading.Thread(target=self._loop, name="pladis-worker", daemon=True)
        self.thread.start()

    def depth(self) -> int:
        with self.cond:
            return len(self.jobs)

    def submit(self, job: Job) -> Future:
        with self.cond:
            if not self.accepting:
                raise ShuttingDown("the server is shutting down")
            if len(self.jobs) >= self.max_queue:
                raise QueueFull(f"queue is full ({self.max_queue} requests waiting)")
            self.jobs.append(job)
            self.cond.notify()
        return job.future

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking work, reject what is queued, let the running batch finish, join the thread."""
        with self.cond:
            self.accepting = False
            while self.jobs:
                self.jobs.popleft().future.set_exception(ShuttingDown("the server shut down before this request ran"))
            self.running = False
            self.cond.notify_all()
        self.thread.join(timeout)

    def _take_batch(self) -> list[Job]:
        """Wait for a job, then gather compatible ones for up to ``window_s``, at most ``max_batch`` images."""
        with self.cond:
            while self.running and not self.jobs:
                self.cond.wait()
            if not self.running:
                return []
            first = self.jobs.popleft()
            batch, images = [first], len(first.seeds)
            end = time.monotonic() + self.window_s
            while images < self.max_batch:
                match = next(
                    (j for j in self.jobs if j.key == first.key and images + len(j.seeds) <= self.max_batch), None
                )
                if match is not None:
                    self.jobs.remove(match)
                    batch.append(match)
                    images += len(match.seeds)
                    continue
                remaining = end - time.monotonic()
                if remaining <= 0 or not self.running:
                    break
                self.cond.wait(remaining)
            return batch

    def _loop(self) -> None:
        while self.running:
            batch = self._take_batch()
            now = time.monotonic()
            live = []
            for job in batch:
                if job.abandoned or now > job.deadline:
                    job.future.set_exception(TimeoutError("request expired before it ran"))
                else:
                    live.append(job)
            if not live:
                continue
            if self.metrics:
                self.metrics.batch_size.observe(sum(len(j.seeds) for j in live))
            try:
                images = self.generate([j.prompt for j in live for _ in j.seeds], [s for j in live for s in j.seeds],
                                       live[0].key)  # fmt: skip
            except Exception as err:  # noqa: BLE001 - every failure goes back to its requests, the worker lives on
                for job in live:
                    job.future.set_exception(err)
                continue
            i = 0
            for job in live:
                job.future.set_result(images[i : i + len(job.seeds)])
                i += len(job.seeds)

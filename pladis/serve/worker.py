"""The engine worker: one thread owns the runtime; a bounded queue feeds it batches of compatible requests.

Requests that share every sampling setting (size, steps, scheduler, guidance, negative prompt) are batched
up to the engine's maximum within a short window. Each image has its own seed, so a batched image equals
the image the same request gets alone.

Nothing a request does can stop the worker: a request whose future was cancelled, that expired or whose
client went away is dropped before it runs; a running batch is stopped between denoising steps once all
its requests are past their deadline or abandoned (or the server's shutdown limit passed); any exception
in a batch goes to that batch's requests only. If the thread dies anyway, ``alive()`` says so and the
app's supervisor calls ``start()`` again on the same queue.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

log = logging.getLogger("pladis.serve")


class QueueFull(Exception):
    """The queue is at its bound: the caller should answer 429 with Retry-After."""


class ShuttingDown(Exception):
    """The server is stopping and does not take (or finish) this work."""


class Expired(TimeoutError):
    """The request passed its deadline or was abandoned by its client before its images were made."""


class WorkerDied(RuntimeError):
    """The worker thread ended while this request's batch ran (the supervisor restarts it)."""


@dataclass(eq=False)  # identity: a job is found in the queue as itself
class Job:
    """One request: ``images`` images made from ``work`` (what ``generate`` reads: the app's checked settings)."""

    key: tuple  # what must match to batch (the app's: size, steps, scheduler, guidance, negative prompt)
    work: object
    images: int
    deadline: float  # time.monotonic()
    future: Future = field(default_factory=Future)
    abandoned: bool = False  # set by the HTTP side on timeout or client disconnect

    def dead(self, now: float) -> bool:
        return self.abandoned or now > self.deadline


def settle(future: Future, result=None, error: BaseException | None = None) -> None:
    """Set a future's outcome unless it already has one (cancelled by its client): never raises."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


class Worker:
    """Runs ``generate(jobs, check)`` on one thread; ``check()`` raises once the batch should stop.

    ``generate`` returns the images of all jobs in order (``job.images`` each) and calls ``check``
    between its steps.
    """

    def __init__(self, generate, max_batch: int, max_queue: int, window_s: float, metrics=None):
        self.generate, self.max_batch, self.max_queue, self.window_s = generate, max_batch, max_queue, window_s
        self.metrics = metrics
        self.jobs: deque[Job] = deque()
        self.cond = threading.Condition()
        self.accepting, self.running = True, True
        self.abort = False  # set when the shutdown limit passed: the running batch stops at its next step
        self.batch: list[Job] = []  # the batch now running
        self.batch_started: float | None = None
        self.thread: threading.Thread | None = None
        self.start()

    def start(self) -> None:
        """Start (or, after it died, restart) the worker thread."""
        self.thread = threading.Thread(target=self._run, name="pladis-worker", daemon=True)
        self.thread.start()

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def depth(self) -> int:
        with self.cond:
            return len(self.jobs)

    def submit(self, job: Job) -> Future:
        with self.cond:
            if not self.accepting:
                raise ShuttingDown("the server is shutting down; retry on another replica or later")
            if len(self.jobs) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry shortly")
            self.jobs.append(job)
            self.cond.notify()
        return job.future

    def discard(self, job: Job) -> None:
        """The client no longer waits for ``job`` (deadline, disconnect): leave the queue now (its place is free
        at once), or, if it runs, let the running batch stop once none of its requests is still wanted."""
        job.abandoned = True
        with self.cond:
            if job in self.jobs:
                self.jobs.remove(job)
        job.future.cancel()  # pending: cancelled; running: no effect, the worker settles it

    def drain(self) -> None:
        """Stop taking work and answer everything queued with ShuttingDown; the running batch goes on."""
        with self.cond:
            self.accepting = False
            while self.jobs:
                settle(self.jobs.popleft().future, error=ShuttingDown("the server shut down before this request ran"))
            self.cond.notify_all()

    def abort_running(self) -> None:
        """The shutdown limit passed: answer the running batch's requests now (ShuttingDown) and stop the batch
        at its next step, however long that step takes."""
        self.abort = True
        for job in list(self.batch):
            settle(job.future, error=ShuttingDown("the server shut down while this request ran"))

    def stop(self, timeout: float = 30.0) -> None:
        """Drain, stop the running batch, end the thread (joined up to ``timeout``)."""
        self.drain()
        self.abort_running()
        with self.cond:
            self.running = False
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)

    def _take_batch(self) -> list[Job]:
        """Wait for a job, then gather compatible ones for up to ``window_s``, at most ``max_batch`` images."""
        with self.cond:
            while self.running and not self.jobs:
                self.cond.wait()
            if not self.running:
                return []
            first = self.jobs.popleft()
            batch, images = [first], first.images
            end = time.monotonic() + self.window_s
            while images < self.max_batch:
                match = next((j for j in self.jobs if j.key == first.key and images + j.images <= self.max_batch), None)
                if match is not None:
                    self.jobs.remove(match)
                    batch.append(match)
                    images += match.images
                    continue
                remaining = end - time.monotonic()
                if remaining <= 0 or not self.running:
                    break
                self.cond.wait(remaining)
            return batch

    def _check(self) -> None:
        """Raise when the running batch should stop: shutdown limit passed, or no request still wants it."""
        if self.abort:
            raise ShuttingDown("the server shut down while this request ran")
        now = time.monotonic()
        if all(job.dead(now) for job in self.batch):
            raise Expired("every request of this batch passed its deadline or was abandoned")

    def _run(self) -> None:
        try:
            self._loop()
        finally:  # only reached on the way out: a dying thread leaves no request waiting forever
            for job in self.batch:
                settle(job.future, error=WorkerDied("the worker stopped while this request ran; retry"))
            self.batch, self.batch_started = [], None

    def _loop(self) -> None:
        while self.running:
            batch = self._take_batch()
            now = time.monotonic()
            live = []
            for job in batch:
                # RUNNING from here on: the HTTP side can no longer cancel it, only mark it abandoned
                if not job.future.set_running_or_notify_cancel():
                    continue
                if job.dead(now):
                    settle(job.future, error=Expired("the request expired or was abandoned before it ran"))
                else:
                    live.append(job)
            if not live:
                continue
            if self.metrics:
                self.metrics.batch_size.observe(sum(j.images for j in live))
            self.batch, self.batch_started = live, time.monotonic()
            try:
                images, error = self.generate(live, self._check), None
            except Exception as err:  # noqa: BLE001 - every failure goes back to its batch, the worker lives on
                images, error = None, err
                if not isinstance(err, Expired | ShuttingDown):
                    log.exception("batch of %d request(s) failed", len(live))
            self.batch, self.batch_started = [], None  # before any answer: whoever gets one sees the worker idle
            i = 0
            for job in live:
                if error is not None:
                    settle(job.future, error=error)
                else:
                    settle(job.future, images[i : i + job.images])
                    i += job.images

"""The micro-batcher: concurrent answer requests become one forward pass, with a bounded queue and deadlines."""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from runner.workloads.agents.answer import AnswerAgent, AnswerItem

DEADLINE_GRACE_S = 0.25  # a forward pass already running when the deadline passes may finish this much later


class QueueFull(Exception):
    pass


@dataclass
class _Entry:
    items: list[AnswerItem]
    deadline: float
    future: concurrent.futures.Future[list[dict[str, Any]]]
    queued_at: float = field(default_factory=time.monotonic)
    behind: int = 0  # requests queued or being scored when it arrived: 0 on an idle service


def _late(e: _Entry, now: float) -> str:
    """Why a request got the fallback before scoring: its budget, its wait, and whether others were ahead."""
    ahead = f"{e.behind} batch(es) ahead of it" if e.behind else "the service was otherwise idle"
    return (f"its {e.deadline - e.queued_at:.3g} s deadline passed before scoring began (waited "
            f"{now - e.queued_at:.3g} s; {ahead})")


def _settle(fut: concurrent.futures.Future[Any], result: Any = None, error: BaseException | None = None) -> None:
    # The waiting request may have given up (deadline) and cancelled the future; that is not an error here.
    try:
        if not fut.done():
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


class MicroBatcher:
    """One worker thread that gathers queued requests into one forward pass.

    The first waiting request holds the batch open for at most `window_s` (or until `max_batch` questions);
    requests that arrive while a pass runs are all taken by the next one, so under load batches fill up
    without waiting. The window is skipped when the service is idle (the last pass answered one question and
    nothing else is queued): a lone request does not wait for company that is not coming. Requests whose
    deadline passed while queued get the agent's fallback answer.
    """

    def __init__(self, agent: AnswerAgent, *, max_batch: int = 32, window_s: float = 0.004, queue_size: int = 256):
        self.agent = agent
        self.max_batch = max_batch
        self.window_s = window_s
        self.queue: queue.Queue[_Entry] = queue.Queue(maxsize=queue_size)
        self.batches = 0
        self.items = 0
        self.fallbacks = 0
        self.last_batch = 0  # questions in the last pass
        self.on_batch: Any = None  # called with each pass's number of questions (metrics)
        self._in_pass = 0  # 1 while a forward pass runs
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> MicroBatcher:
        self._thread = threading.Thread(target=self._loop, name="micro-batcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop taking batches; wait up to `timeout` for a running pass. False if it is still running."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            return not self._thread.is_alive()
        return True

    def submit(self, items: list[AnswerItem], deadline: float) -> concurrent.futures.Future[list[dict[str, Any]]]:
        fut: concurrent.futures.Future[list[dict[str, Any]]] = concurrent.futures.Future()
        try:
            self.queue.put_nowait(_Entry(items, deadline, fut, behind=self.queue.qsize() + self._in_pass))
        except queue.Full:
            raise QueueFull from None
        return fut

    def _gather(self, first: _Entry) -> list[_Entry]:
        batch, n = [first], len(first.items)
        idle = self.last_batch <= 1 and self.queue.empty()
        until = time.monotonic() + (0.0 if idle else self.window_s)
        while n < self.max_batch:
            try:
                e = self.queue.get_nowait()
            except queue.Empty:
                left = until - time.monotonic()
                if left <= 0:
                    break
                try:
                    e = self.queue.get(timeout=left)
                except queue.Empty:
                    break
            batch.append(e)
            n += len(e.items)
        return batch

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = self._gather(first)
            now = time.monotonic()
            live = []
            for e in batch:
                if e.future.done():
                    continue
                if e.deadline <= now:
                    self.fallbacks += len(e.items)
                    _settle(e.future, [self.agent.fallback(it, _late(e, now)) for it in e.items])
                else:
                    live.append(e)
            if not live:
                continue
            items = [it for e in live for it in e.items]
            self._in_pass = 1
            try:
                answers = self.agent.answer_many(items, min(e.deadline for e in live))
            except Exception as ex:  # a bad batch must not kill the worker; each request gets the error
                for e in live:
                    _settle(e.future, error=ex)
                continue
            finally:
                self._in_pass = 0
            self.batches += 1
            self.items += len(items)
            self.last_batch = len(items)
            if self.on_batch is not None:
                self.on_batch(len(items))
            i = 0
            for e in live:
                _settle(e.future, answers[i : i + len(e.items)])
                i += len(e.items)

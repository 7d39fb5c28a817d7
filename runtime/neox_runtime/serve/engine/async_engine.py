"""Drive the synchronous engine from a background thread for an asyncio server.

The thread owns the engine: it builds it (loads the model, prepacks the weights), then
runs the step loop; requests and aborts reach it through a queue, and each step's deltas
come back to the event loop in one `call_soon_threadsafe`. Torch releases the GIL inside
its kernels, so the HTTP loop keeps serving while a step computes. The thread also keeps
what `/health` needs: whether work is pending and when the last token came.

A request the engine fails (see `isolation`) raises `RequestFailedError` in its own
`generate` only; the engine is dead (`error` set, every stream and later request fails
with `EngineDeadError`) only when a step raises past isolation, which happens when
known-good input fails too.

Why the same thread builds and runs: torch's CPU kernels use OpenMP, and libgomp keeps a
worker pool per thread that ever ran a parallel region. Once two pools exist there are
more OpenMP threads than cores, libgomp stops spinning between regions, and every
region pays a futex wake-up: a decode step of the 70M model on 2 cores measured 27%
slower when the model was loaded on the main thread and stepped on another. So the HTTP
thread never runs a parallel torch op.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable

from neox_runtime.serve.engine.core import LLMEngine
from neox_runtime.serve.engine.sequence import SamplingParams, SequenceDelta

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine cannot run anything any more (the server reports itself unhealthy)."""


class RequestFailedError(RuntimeError):
    """The engine failed this request alone; the others run on."""


class RequestRefusedError(ValueError):
    """The engine refused to admit this request (a check the API layer makes first, made again)."""


class AsyncEngine:
    """Starts the engine thread, which calls `build`; returns once the engine is built (or raises its error)."""

    def __init__(self, build: Callable[[], LLMEngine]):
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._started = threading.Event()
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = False
        self.error: BaseException | None = None
        self.last_progress = time.monotonic()
        self.pending = False
        built = threading.Event()
        build_error: list[BaseException] = []

        def main() -> None:
            try:
                self.engine = build()
            except BaseException as exc:  # noqa: BLE001 - re-raised on the constructing thread
                build_error.append(exc)
                return
            finally:
                built.set()
            self._started.wait()
            if not self._stop:
                self._run()

        self._thread = threading.Thread(target=main, name="neox-engine", daemon=True)
        self._thread.start()
        built.wait()
        if build_error:
            raise build_error[0]

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._started.set()

    def shutdown(self) -> None:
        self._stop = True
        self._started.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def stalled_for(self) -> float:
        """Seconds without a new token while work is pending (0 when idle)."""
        return time.monotonic() - self.last_progress if self.pending else 0.0

    async def generate(self, request_id: str, prompt_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[SequenceDelta]:
        """Yield deltas until all `params.n` sequences finish; aborts the request if cancelled."""
        if self.error is not None:
            raise EngineDeadError(str(self.error))
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self._commands.put(("add", request_id, prompt_ids, params))
        self._wake.set()
        remaining = params.n
        try:
            while remaining:
                item = await stream.get()
                if isinstance(item, RequestRefusedError):
                    remaining = 0
                    raise item
                if isinstance(item, BaseException):
                    raise EngineDeadError(str(item))
                if item.error is not None:
                    remaining = 0  # the engine has already dropped the request
                    raise RequestFailedError(item.error)
                if item.finish_reason is not None:
                    remaining -= 1
                yield item
        finally:
            self._streams.pop(request_id, None)
            if remaining:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    def _run(self) -> None:
        eng = self.engine
        while not self._stop:
            self._take_commands()
            if not eng.has_work():
                self.pending = False
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            if not self.pending:
                self.pending, self.last_progress = True, time.monotonic()
            try:
                deltas = eng.step()
            except Exception as exc:  # past isolation: known-good input fails too, nothing can run
                log.exception("Engine is broken; failing every request")
                self.error = exc
                for rid in eng.request_ids():
                    eng.abort(rid)
                self._loop.call_soon_threadsafe(self._fail_all, exc)
                return
            if eng.last_progress > self.last_progress:
                self.last_progress = eng.last_progress
            if deltas:
                self._loop.call_soon_threadsafe(self._dispatch, deltas)

    def _take_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                try:
                    self.engine.add_request(*cmd[1:])
                except ValueError as exc:
                    self._loop.call_soon_threadsafe(self._fail, cmd[1], RequestRefusedError(str(exc)))
            else:
                self.engine.abort(cmd[1])

    def _dispatch(self, deltas: list[SequenceDelta]) -> None:
        for d in deltas:
            stream = self._streams.get(d.request_id)
            if stream is not None:
                stream.put_nowait(d)

    def _fail_all(self, exc: BaseException) -> None:
        for stream in self._streams.values():
            stream.put_nowait(exc)

    def _fail(self, request_id: str, exc: BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(exc)

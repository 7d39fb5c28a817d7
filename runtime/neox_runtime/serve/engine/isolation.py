"""One bad request fails alone: find the sequences that make a step raise, fail only their requests.

A step that raises while scheduling or executing has advanced no sequence (K/V written
for its rows are rewritten when they are computed again), so its sequences can be
stepped again in smaller groups. `isolate` bisects: a group that steps cleanly has made
its progress and is done; a group that raises is split in two; a single sequence that
raises is the culprit, and its request (all its choices) fails with an error delta while
every other request keeps running. Work after the model's forward (prompt scoring,
sampling, detokenizing) is isolated per sequence where it runs (`core`), so it never
needs a re-run.

A broken engine (a dead tensor-parallel worker, a corrupted cache) also makes single
sequences raise, and must not be blamed on them: before the first culprit of a round is
failed, a known-good one-token probe runs through the same schedule -> execute path; if
it raises too, `EngineBrokenError` goes up and the server reports itself dead.

Groups are stepped through the real scheduler with a narrowed view (`scheduling_only`):
its `running` and `waiting` queues hold only the group while it plans, and afterwards the
group's sequences are merged back where the step left them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from neox_runtime.serve.engine.sequence import SamplingParams, Sequence, SequenceDelta

if TYPE_CHECKING:
    from neox_runtime.serve.engine.core import LLMEngine

log = logging.getLogger(__name__)

PROBE_REQUEST_ID = "neox-engine-probe"


class EngineBrokenError(RuntimeError):
    """The engine fails on known-good input: nothing it runs can succeed."""


@contextmanager
def scheduling_only(scheduler, group: list[Sequence] | None) -> Iterator[None]:
    """While inside, the scheduler sees only `group` (None: everything); its moves are kept after."""
    if group is None:
        yield
        return
    members = set(group)
    running, waiting = scheduler.running, scheduler.waiting
    scheduler.running = type(running)(s for s in running if s in members)
    scheduler.waiting = type(waiting)(s for s in waiting if s in members)
    try:
        yield
    finally:
        sub_running, sub_waiting = scheduler.running, scheduler.waiting
        still_running, still_waiting = set(sub_running), set(sub_waiting)
        was_running, was_waiting = set(running), set(waiting)
        # Outside the group nothing moved; inside it, admitted sequences joined `running` and
        # preempted ones (if the scheduler preempts) went back to the front of `waiting`.
        scheduler.running = type(running)(
            [s for s in running if s not in members or s in still_running]
            + [s for s in sub_running if s not in was_running])
        scheduler.waiting = type(waiting)(
            [s for s in sub_waiting if s not in was_waiting]
            + [s for s in waiting if s not in members or s in still_waiting])


def isolate(engine: LLMEngine, suspects: list[Sequence], cause: BaseException) -> list[SequenceDelta]:
    """Step `suspects` in halves until each raising sequence is alone; fail those requests only."""
    deltas: list[SequenceDelta] = []
    probed = False
    groups = [suspects]
    while groups:
        group = [s for s in groups.pop() if not s.finished]
        if not group:
            continue
        try:
            deltas += engine.step_only(group)
        except Exception as exc:  # noqa: BLE001 - narrowed down below
            if len(group) > 1:
                half = len(group) // 2
                groups += [group[half:], group[:half]]
                continue
            log.error("Request failed alone request_id=%s error=%r", group[0].request_id, exc)
            deltas += engine.fail_request(group[0], exc)
            if not probed:
                probed = True
                if not engine_works(engine):
                    raise EngineBrokenError(f"the engine fails on known-good input: {exc!r}") from cause
    return deltas


def engine_works(engine: LLMEngine) -> bool:
    """Schedule and execute a one-token request alone; False when that raises too."""
    token = engine.eos_token_id if engine.eos_token_id is not None else 0
    engine.add_request(PROBE_REQUEST_ID, [token], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    probe = engine.sequences(PROBE_REQUEST_ID)
    try:
        with scheduling_only(engine.scheduler, probe):
            step = engine.scheduler.schedule()
        if step is not None:  # None: no free slot for it, so nothing can be concluded
            engine.executor.execute(step.plan)
            engine.scheduler.record_computed(step)
        return True
    except Exception:  # noqa: BLE001 - the answer is the point
        log.exception("Engine probe failed")
        return False
    finally:
        engine.abort(PROBE_REQUEST_ID)

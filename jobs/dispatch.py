"""Dispatch: the policy that feeds the actor pool (`sdfleet.jobs.pool`) shards by pull.

It owns the queue, the attempts, the budget and quarantine: a shard whose actor dies or whose
call fails goes back to the queue until it has failed `max_attempts` times; a termination notice
(SIGTERM, preemption) is not the shard's fault and is not counted; once the budget is spent no
shard starts. Each actor holds two shards and runs both calls at once: one generating, the other
reading its prompts before, or writing its output after, its turn on the GPU (see
`sdfleet.actors.generator`).

The pool (`sdfleet.jobs.pool.ActorPool`) keeps the books and speaks Ray; the dispatcher sees only
its `PoolEvent`s, so this policy runs, and is tested, without Ray (tests/test_dispatch.py).
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sdfleet.actors.logs import mask
from sdfleet.jobs.pool import (
    DIED,
    DONE,
    FAILED,
    PREEMPTED,
    START_FAILED,
    STARTED,
    PoolEvent,
    Slot,
)
from sdfleet.schemas.errors import UserError
from sdfleet.schemas.layout import FailedShard, ShardAttemptError, ShardStats, UncommittedSpend
from sdfleet.schemas.plan import Plan

if TYPE_CHECKING:
    from sdfleet.jobs.pool import ActorPool
    from sdfleet.jobs.sink import OutputSink

log = logging.getLogger("sdfleet")

# How often the loop wakes without a result, to check shard timeouts and refresh the display.
POLL_S = 1.0
# The reason a preempted worker's shards are requeued with; such a failure is never counted.
PREEMPTED_REASON = "worker preempted"


@dataclass
class ShardTask:
    shard_id: int
    attempts: int = 0
    errors: list[ShardAttemptError] = field(default_factory=list)


@dataclass
class DispatchResult:
    committed: dict[int, ShardStats] = field(default_factory=dict)
    quarantined: dict[int, ShardTask] = field(default_factory=dict)
    budget_stopped: bool = (
        False  # resources.budget_usd was reached; the shards left were not started
    )


class WorkerStartError(UserError):
    """No worker could start: the model or detector does not load, the output is not writable."""


class Dispatcher:
    def __init__(
        self,
        plan: Plan,
        sink: OutputSink,
        pool: ActorPool,
        shard_ids: list[int],
        *,
        progress: bool = True,
        done_samples: int = 0,
        spent_gpu_seconds: float = 0.0,
        uncommitted: UncommittedSpend | None = None,
        stopping: Callable[[], bool] = lambda: False,
    ):
        """sink: where committed and quarantined shards are reported; pool: the workers (the
        dispatcher shuts it down when done); shard_ids: the shards to make; done_samples and
        spent_gpu_seconds: what earlier runs of this job already made and spent in committed
        shards (for the progress bar and the budget); uncommitted: what their attempts that
        committed nothing spent (`_spent.json`), which the budget counts too; stopping: asked at
        every poll, true once the driver was told to stop (Ctrl-C, SIGTERM): the loop ends there,
        its shards uncommitted and every actor released."""
        self.plan = plan
        self.resources = plan.spec.resources
        self.sink = sink
        self.pool = pool
        self.queue = deque(ShardTask(s) for s in shard_ids)
        self.result = DispatchResult()
        self.uncommitted = uncommitted or UncommittedSpend(fingerprint=plan.fingerprint)
        # Every attempt's GPU-seconds, committed or not: the budget's measure.
        self.spent_gpu_seconds = spent_gpu_seconds + self.uncommitted.gpu_seconds
        self.start_failures = 0  # consecutive actors that failed to start
        self.any_ready = False
        self.progress = progress
        self.done_samples = done_samples
        self.stopping = stopping

    def run(self) -> DispatchResult:
        """Make every queued shard, or quarantine it, or stop at the budget."""
        pool = self.pool
        bar = self._progress_bar()
        try:
            # The pull loop: size the pool, feed ready actors, collect results, enforce timeouts.
            while (self._open_queue() or pool.busy) and not self.stopping():
                pool.resize(self._desired())
                pool.feed(self._next_task)
                for event in pool.wait(POLL_S):
                    self._collect(event, bar)
                limit = self.resources.shard_timeout_s
                for slot in pool.timed_out(limit):
                    log.warning(
                        "shard %s ran past shard_timeout_s=%s; killing its worker",
                        self.plan.shard_name(slot.running.shard_id),
                        limit,
                    )
                    self._lose_actor(slot, f"timed out after {limit}s")
                pool.report_waiting()
                bar.set_postfix(
                    workers=f"{pool.ready} running, {len(pool.slots) - pool.ready} pending",
                    failed_shards=len(self.result.quarantined),
                    refresh=False,
                )
        finally:
            bar.close()
            pool.shutdown()
        return self.result

    # ---------------------------------------------------------------- the queue

    def _open_queue(self) -> int:
        """Shards that may still be started: none once the budget is spent."""
        res = self.resources
        if (
            res.budget_usd is not None
            and self.spent_gpu_seconds / 3600 * res.gpu_hour_usd >= res.budget_usd
        ):
            if self.queue and not self.result.budget_stopped:
                log.warning(
                    "budget reached: $%.2f of resources.budget_usd=$%.2f spent; %d shard(s) not started",
                    self.spent_gpu_seconds / 3600 * res.gpu_hour_usd,
                    res.budget_usd,
                    len(self.queue),
                )
                self.result.budget_stopped = True
            return 0
        return len(self.queue)

    def _next_task(self) -> ShardTask | None:
        return self.queue.popleft() if self._open_queue() else None

    def _desired(self) -> int:
        """Toward min(max_workers, shards not yet done), never below min_workers while work remains."""
        remaining = self._open_queue() + self.pool.busy
        return 0 if remaining == 0 else max(self.resources.min_workers, remaining)

    # ---------------------------------------------------------------- results

    def _collect(self, event: PoolEvent, bar) -> None:
        if event.kind == STARTED:
            self.any_ready, self.start_failures = True, 0
        elif event.kind == START_FAILED:
            self._start_failed(event)
        elif event.kind == DIED:
            self._lose_actor(event.slot, f"worker died: {event.summary}")
        elif event.kind == PREEMPTED:
            self._lose_actor(event.slot, f"{PREEMPTED_REASON}: {event.summary}", preempted=True)
        elif event.kind == FAILED:
            self.pool.release(event)
            self._spend(event.gpu_seconds or 0.0, committed=False)
            self._attempt_failed(event)
        elif event.kind == DONE:
            stats: ShardStats = event.stats
            self.result.committed[event.task.shard_id] = stats
            spent = stats.gpu_seconds if event.gpu_seconds is None else event.gpu_seconds
            self._spend(spent, committed=event.committed_here)  # a lost race spent too
            self.sink.shard_written(stats)
            bar.update(stats.samples)
        else:
            raise AssertionError(f"unknown pool event {event.kind}")

    def _spend(self, gpu_seconds: float, committed: bool) -> None:
        """An attempt's GPU-seconds: all count toward the budget; those of an attempt whose files
        are not the committed ones are kept in `_spent.json`, as no stats file holds them."""
        self.spent_gpu_seconds += gpu_seconds
        if committed or gpu_seconds <= 0:
            return
        spend = self.uncommitted
        self.uncommitted = spend.model_copy(
            update={
                "gpu_seconds": round(spend.gpu_seconds + gpu_seconds, 4),
                "attempts": spend.attempts + 1,
            }
        )
        try:
            self.sink.attempts_spent(self.uncommitted)
        except Exception as e:  # noqa: BLE001 -- the next attempt's write carries the total
            log.warning("could not record the GPU-seconds of failed attempts: %s", e)

    def _start_failed(self, event: PoolEvent) -> None:
        if event.refusal is not None:
            # A bad model, weights refused, an output it may not write: the next worker would
            # find the same, so the job stops now instead of after max_attempts workers.
            raise WorkerStartError(str(event.refusal)) from None
        self.start_failures += 1
        message = event.error
        log.error(
            "a worker failed to start: %s",
            message.strip().splitlines()[-1] if message.strip() else message,
        )
        log.debug("the worker's traceback:\n%s", message.strip())
        if not self.any_ready and self.start_failures >= self.resources.max_attempts:
            raise WorkerStartError(
                f"no worker could start after {self.start_failures} tries; last error:\n{message}"
            )
        self._lose_actor(event.slot, f"worker failed to start: {event.summary}")

    def _lose_actor(self, slot: Slot, reason: str, preempted: bool = False) -> None:
        """The slot's actor is gone or hung: its running shard fails (uncounted if preempted), its
        queued one goes back uncounted. What its running shard held the GPU for is spent."""
        self._spend(self.pool.held_gpu_seconds(slot), committed=False)
        held = self.pool.remove(slot)
        for i, task in enumerate(held):
            self._fail(task, reason, counted=i == 0 and not preempted)
        if self.queue:
            names = ", ".join(self.plan.shard_name(t.shard_id) for t in held) or "none"
            log.warning(
                "%s; shards %s go back to the queue; starting a replacement worker", reason, names
            )

    def _attempt_failed(self, event: PoolEvent) -> None:
        """A shard's call raised in its worker: one line always, the worker's traceback under -v."""
        name = self.plan.shard_name(event.task.shard_id)
        lines = event.error.strip().splitlines() or ["?"]
        log.warning("shard %s attempt %d failed: %s", name, event.task.attempts + 1, lines[-1])
        log.debug("shard %s: the worker's traceback:\n%s", name, event.error.strip())
        self._fail(event.task, event.error)

    def _fail(self, task: ShardTask, error: str, counted: bool = True) -> None:
        if counted:
            task.attempts += 1
            # `_failed.json` keeps the worker's traceback, with its credentials masked by the rule
            # every log record is masked by.
            task.errors.append(
                ShardAttemptError(attempt=task.attempts, error=mask(error), at=time.time())
            )
        if task.attempts < self.resources.max_attempts:
            self.queue.appendleft(task)
            return
        self.result.quarantined[task.shard_id] = task
        name = self.plan.shard_name(task.shard_id)
        record = FailedShard(
            shard_id=task.shard_id,
            attempts=task.attempts,
            errors=task.errors,
            fingerprint=self.plan.fingerprint,
        )
        self.sink.shard_failed(name, record)
        log.error(
            "shard %s quarantined after %d attempts: %s",
            name,
            task.attempts,
            record.last_error_line(),
        )

    def _progress_bar(self):
        from tqdm import tqdm

        return tqdm(
            total=self.plan.num_samples,
            initial=self.done_samples,
            unit="img",
            desc=self.plan.spec.name,
            disable=not self.progress,
            file=sys.stdout,
            mininterval=1.0 if sys.stdout.isatty() else 10.0,
            dynamic_ncols=True,
        )

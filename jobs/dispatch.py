"""Dispatch: the policy that feeds the actor pool (`sdfleet.jobs.pool`) shards by pull.

It owns the queue, the attempts, the budget and quarantine: a shard whose actor dies or whose
call fails goes back to the queue until it has failed `max_attempts` times; a termination notice
(SIGTERM, preemption) is not the shard's fault and is not counted; once the budget is spent no
shard starts. Each actor holds two shards and runs both calls at once: one generating, the other
reading its prompts before, or writing its output after, its turn on the GPU (see
`sdfleet.actors.generator`).
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass, field

from sdfleet.actors.generator import Preempted
from sdfleet.actors.storage import Storage
from sdfleet.jobs.pool import ActorPool, Finished, Slot
from sdfleet.schemas import layout
from sdfleet.schemas.errors import UserError, first_line
from sdfleet.schemas.layout import FailedShard, ShardAttemptError, ShardStats
from sdfleet.schemas.plan import Plan

log = logging.getLogger("sdfleet")

# How often the loop wakes without a result, to check shard timeouts and refresh the display.
POLL_S = 1.0
# The reason a preempted worker's shards are requeued with; such a failure is never counted.
PREEMPTED = "worker preempted"


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
        storage: Storage,
        shard_ids: list[int],
        *,
        progress: bool = True,
        embedded: bool = False,
        done_samples: int = 0,
        spent_gpu_seconds: float = 0.0,
        worker: type | None = None,
    ):
        """shard_ids: the shards to make; done_samples and spent_gpu_seconds: what earlier runs of
        this job already made and spent (for the progress bar and the budget); worker: the actor
        class (default ShardGenerator)."""
        self.plan = plan
        self.resources = plan.spec.resources
        self.storage = storage
        self.embedded = embedded
        self.queue = deque(ShardTask(s) for s in shard_ids)
        self.result = DispatchResult()
        self.spent_gpu_seconds = spent_gpu_seconds
        self.start_failures = 0  # consecutive actors that failed to start
        self.any_ready = False
        self.progress = progress
        self.done_samples = done_samples
        self.worker = worker

    def run(self) -> DispatchResult:
        """Make every queued shard, or quarantine it, or stop at the budget."""
        pool = ActorPool(self.plan, self.embedded, self.worker)
        bar = self._progress_bar()
        try:
            # The pull loop: size the pool, feed ready actors, collect results, enforce timeouts.
            while self._open_queue() or pool.busy:
                pool.resize(self._desired(pool))
                pool.feed(self._next_task)
                for finished in pool.wait(POLL_S):
                    self._collect(pool, finished, bar)
                limit = self.resources.shard_timeout_s
                for slot in pool.timed_out(limit):
                    log.warning(
                        "shard %s ran past shard_timeout_s=%s; killing its worker",
                        self.plan.shard_name(slot.tasks[0][1].shard_id),
                        limit,
                    )
                    self._lose_actor(pool, slot, f"timed out after {limit}s")
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

    def _desired(self, pool: ActorPool) -> int:
        """Toward min(max_workers, shards not yet done), never below min_workers while work remains."""
        remaining = self._open_queue() + pool.busy
        return 0 if remaining == 0 else max(self.resources.min_workers, remaining)

    # ---------------------------------------------------------------- results

    def _collect(self, pool: ActorPool, finished: Finished, bar) -> None:
        import ray

        e = finished.error
        if finished.task is None:  # an actor's start-up
            if e is None:
                self.any_ready, self.start_failures = True, 0
            else:
                self._start_failed(pool, finished.slot, e)
        elif isinstance(e, ray.exceptions.RayActorError):
            self._lose_actor(pool, finished.slot, f"worker died: {first_line(e)}")
        elif isinstance(getattr(e, "cause", None), Preempted):
            # A termination notice (spot reclaim, pod eviction) is not the shard's fault.
            self._lose_actor(pool, finished.slot, f"{PREEMPTED}: {e.cause}", preempted=True)
        elif e is not None:
            pool.release(finished)
            self._fail(finished.task, _task_error(e))
        else:
            stats: ShardStats = finished.value
            self.result.committed[finished.task.shard_id] = stats
            self.spent_gpu_seconds += stats.gpu_seconds
            bar.update(stats.samples)

    def _start_failed(self, pool: ActorPool, slot: Slot, e: BaseException) -> None:
        cause = getattr(e, "cause", None)
        if isinstance(cause, UserError):
            # A bad model, weights refused, an output it may not write: the next worker would
            # find the same, so the job stops now instead of after max_attempts workers.
            raise WorkerStartError(str(cause)) from None
        self.start_failures += 1
        message = _task_error(e)
        log.error(
            "a worker failed to start: %s",
            message.strip().splitlines()[-1] if message.strip() else e,
        )
        if not self.any_ready and self.start_failures >= self.resources.max_attempts:
            raise WorkerStartError(
                f"no worker could start after {self.start_failures} tries; last error:\n{message}"
            )
        self._lose_actor(pool, slot, f"worker failed to start: {first_line(e)}")

    def _lose_actor(
        self, pool: ActorPool, slot: Slot, reason: str, preempted: bool = False
    ) -> None:
        """The slot's actor is gone or hung: its running shard fails (uncounted if preempted), its
        queued one goes back uncounted."""
        held = pool.remove(slot)
        for i, task in enumerate(held):
            self._fail(task, reason, counted=i == 0 and not preempted)
        if self.queue:
            names = ", ".join(self.plan.shard_name(t.shard_id) for t in held) or "none"
            log.warning(
                "%s; shards %s go back to the queue; starting a replacement worker", reason, names
            )

    def _fail(self, task: ShardTask, error: str, counted: bool = True) -> None:
        if counted:
            task.attempts += 1
            task.errors.append(
                ShardAttemptError(attempt=task.attempts, error=error, at=time.time())
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
        self.storage.write_json(layout.failed_file(name), record.model_dump(mode="json"))
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


def _task_error(e: BaseException) -> str:
    cause = getattr(e, "cause", None)
    if cause is not None:
        return "".join(traceback.format_exception(type(cause), cause, cause.__traceback__))
    return str(e)

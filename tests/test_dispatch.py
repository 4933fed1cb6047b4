"""The dispatcher's policy against a fake pool: retries, quarantine, preemption, start failures,
timeouts, scaling and the budget, in milliseconds and without Ray.

`FakePool` keeps the books the way `sdfleet.jobs.pool.ActorPool` does (slots, ready actors, calls in
flight, up to SHARDS_PER_ACTOR shards per actor) and answers each call as a script says. The same
policy runs end to end on real clusters in tests/test_faults.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import deque
from types import SimpleNamespace

import pyarrow as pa
import pytest

from sdfleet.actors.storage import Storage
from sdfleet.jobs.dispatch import Dispatcher, WorkerStartError
from sdfleet.jobs.pool import (
    DIED,
    DONE,
    FAILED,
    PREEMPTED,
    SHARDS_PER_ACTOR,
    START_FAILED,
    STARTED,
    PoolEvent,
    Slot,
)
from sdfleet.jobs.sink import OutputSink
from sdfleet.schemas import layout
from sdfleet.schemas.errors import ModelLoadError
from sdfleet.schemas.layout import FailedShard, UncommittedSpend
from sdfleet.schemas.plan import InputFile, Plan
from sdfleet.schemas.samples import sweep_points
from sdfleet.schemas.spec import parse_spec

HANG = "hang"  # a call that never comes back (until its worker is killed)
LOST = "lost"  # a call that generated, then found the shard committed by another writer
GPU_SECONDS = 0.5  # what each fake shard spends


class FakePool:
    """ActorPool's interface and bookkeeping, with scripted outcomes instead of Ray.

    shard(shard_id, attempt, call) -> DONE | FAILED | DIED | PREEMPTED | HANG, where call counts
    that shard's calls from 1 (a preempted shard is called again with the same attempt);
    start(n) -> STARTED or the exception the n-th actor (from 0) fails to start with; capacity: the
    actors it holds at most (ActorPool's is resources.max_workers, the default here)."""

    def __init__(
        self,
        shard=lambda shard_id, attempt, call: DONE,
        start=lambda n: STARTED,
        capacity=None,
        error=lambda shard_id: (
            f"Traceback (most recent call last):\nRuntimeError: shard {shard_id} broke\n"
        ),
    ):
        """error(shard_id): the text a FAILED call's worker error carries."""
        self.script, self.start_script, self.capacity = shard, start, capacity
        self.error = error
        self.slots: list[Slot] = []
        self.ready = 0
        self.starting: deque[Slot] = deque()
        self.refs: dict[str, tuple[Slot, object, int]] = {}  # call -> slot, task, attempt
        self.hung: set[str] = set()
        # What the tests look at.
        self.actors_started = 0
        self.sizes: list[int] = []  # each resize's request
        self.calls: list[tuple[int, int]] = []  # (shard, attempt) in the order given
        self.removed: list[str] = []  # actors let go: killed, shrunk away or shut down
        self.killed: list[str] = []  # actors killed by the dispatcher (`remove`)
        self.released = 0
        self.shut_down = False
        self.waits = 0

    @property
    def busy(self) -> int:
        return len(self.refs)

    def resize(self, desired: int) -> None:
        self.sizes.append(desired)
        desired = min(desired, self.capacity)
        while len(self.slots) < desired:
            n = len(self.slots) + len(self.removed)
            slot = Slot(actor=f"actor-{n}", ready_ref=f"ready-{n}")
            self.slots.append(slot)
            self.starting.append(slot)
        for slot in sorted(self.slots, key=lambda s: s.ready):
            if len(self.slots) <= desired:
                break
            if not slot.tasks:
                self._drop(slot)

    def feed(self, next_task) -> None:
        for slot in self.slots:
            while slot.live and slot.ready and len(slot.tasks) < SHARDS_PER_ACTOR:
                task = next_task()
                if task is None:
                    return
                ref = f"call-{len(self.calls)}"
                slot.add(ref, task)
                self.refs[ref] = (slot, task, task.attempts + 1)
                self.calls.append((task.shard_id, task.attempts + 1))

    def wait(self, timeout: float):
        self.waits += 1
        assert self.waits < 10_000, "the dispatcher never finished"
        if self.starting:
            yield self._start(self.starting.popleft())
            return
        for ref, (slot, task, attempt) in list(self.refs.items()):
            if ref in self.hung:
                continue
            call = sum(1 for s, _ in self.calls[: int(ref.split("-")[1]) + 1] if s == task.shard_id)
            kind = self.script(task.shard_id, attempt, call)
            if kind == HANG:
                self.hung.add(ref)
                continue
            del self.refs[ref]
            if kind in (DONE, LOST):
                slot.pop(ref)
                stats = SimpleNamespace(shard_id=task.shard_id, samples=2, gpu_seconds=GPU_SECONDS)
                yield PoolEvent(
                    DONE,
                    slot,
                    task,
                    stats=stats,
                    ref=ref,
                    gpu_seconds=GPU_SECONDS,
                    committed_here=kind == DONE,
                )
            elif kind == FAILED:
                error = self.error(task.shard_id)
                yield PoolEvent(FAILED, slot, task, error=error, ref=ref, gpu_seconds=GPU_SECONDS)
            elif kind == DIED:
                yield PoolEvent(DIED, slot, task, summary="The actor died unexpectedly", ref=ref)
            else:
                yield PoolEvent(PREEMPTED, slot, task, summary="SIGTERM on node-1", ref=ref)
            return

    def _start(self, slot: Slot) -> PoolEvent:
        outcome = self.start_script(self.actors_started)
        self.actors_started += 1
        if outcome == STARTED:
            slot.ready = True
            self.ready += 1
            return PoolEvent(STARTED, slot)
        refusal = outcome if isinstance(outcome, ModelLoadError) else None
        return PoolEvent(
            START_FAILED,
            slot,
            error=f"Traceback\n{outcome!r}",
            summary=str(outcome),
            refusal=refusal,
        )

    def timed_out(self, limit_s: float) -> list[Slot]:
        """The fake clock: a hung call has run past any limit."""
        return [s for s in self.slots if s.tasks and s.tasks[0][0] in self.hung]

    def held_gpu_seconds(self, slot: Slot) -> float:
        """A killed or dead worker's running shard held the GPU for as long as a shard takes."""
        return GPU_SECONDS if slot.tasks else 0.0

    def release(self, event: PoolEvent) -> None:
        self.released += 1
        event.slot.pop(event.ref)

    def remove(self, slot: Slot) -> list:
        self.killed.append(slot.actor)
        held = [task for _, task in slot.tasks]
        for ref, _ in slot.tasks:
            self.refs.pop(ref, None)
        slot.tasks.clear()
        self._drop(slot)
        return held

    def _drop(self, slot: Slot) -> None:
        self.slots.remove(slot)
        if slot in self.starting:
            self.starting.remove(slot)
        self.ready -= slot.ready
        self.removed.append(slot.actor)
        slot.live = False

    def report_waiting(self) -> None:
        pass

    def shutdown(self) -> None:
        for slot in list(self.slots):
            self._drop(slot)
        self.shut_down = True


class RecordingSink(OutputSink):
    """The real sink (its `_failed.json` is the one under test), remembering what committed."""

    def __init__(self, storage: Storage):
        super().__init__(storage)
        self.written: list[int] = []

    def shard_written(self, stats) -> None:
        self.written.append(stats.shard_id)


def make_plan(tmp_path, shards: int, **resources) -> Plan:
    spec = parse_spec(
        {
            "input": {"uri": str(tmp_path / "in")},
            "output": {"uri": str(tmp_path / "out"), "samples_per_shard": 2},
            "safety": {"detector": "none"},
            "resources": resources,
        }
    )
    rows = 2 * shards
    files = [
        InputFile(uri=str(tmp_path / "in" / "p.parquet"), size=1, rows=rows, row_groups=[rows])
    ]
    return Plan(spec, files, sweep_points(spec), pa.schema([]))


def dispatch(
    tmp_path, pool: FakePool, shards: int = 4, spent: float = 0.0, uncommitted=None, **resources
):
    plan = make_plan(tmp_path, shards, **resources)
    sink = RecordingSink(Storage(str(tmp_path / "out")))
    if pool.capacity is None:
        pool.capacity = plan.spec.resources.max_workers
    dispatcher = Dispatcher(
        plan,
        sink,
        pool,
        list(range(shards)),
        progress=False,
        spent_gpu_seconds=spent,
        uncommitted=uncommitted,
    )
    return dispatcher, sink, plan


def failed_record(tmp_path, plan: Plan, shard_id: int) -> FailedShard:
    path = tmp_path / "out" / layout.failed_file(plan.shard_name(shard_id))
    return FailedShard.model_validate(json.loads(path.read_text()))


# ------------------------------------------------------------------------------------ the happy path


def test_every_shard_is_made_once_and_the_pool_is_shut_down(tmp_path):
    pool = FakePool()
    dispatcher, sink, _ = dispatch(tmp_path, pool, shards=5)
    result = dispatcher.run()
    assert sorted(result.committed) == sorted(sink.written) == [0, 1, 2, 3, 4]
    assert sorted(pool.calls) == [(s, 1) for s in range(5)]
    assert not result.quarantined and not result.budget_stopped
    assert pool.shut_down and not pool.slots and not pool.killed
    assert not list((tmp_path / "out").glob(layout.FAILED_GLOB))


def test_a_stop_ends_the_loop_at_its_next_poll_and_releases_every_actor(tmp_path):
    """Ctrl-C or SIGTERM on the driver (`stopping` turns true): no further shard is handed out,
    what the actors hold stays uncommitted (the rerun makes it), and every actor is released."""
    pool = FakePool(shard=lambda s, attempt, call: HANG if s >= 2 else DONE)
    dispatcher, sink, _ = dispatch(tmp_path, pool, shards=8, max_workers=1)
    dispatcher.stopping = lambda: sink.written == [0, 1]
    result = dispatcher.run()
    assert sorted(result.committed) == [0, 1] and not result.quarantined
    assert max(s for s, _ in pool.calls) <= 3  # only what the one actor held; 4-7 never
    assert pool.shut_down and not pool.slots and not list((tmp_path / "out").glob("*"))


# ------------------------------------------------------------------------------------ retries


def test_a_failing_shard_is_retried_up_to_max_attempts_then_quarantined(tmp_path):
    pool = FakePool(shard=lambda s, attempt, call: FAILED if s == 1 else DONE)
    dispatcher, _, plan = dispatch(tmp_path, pool, max_attempts=3)
    result = dispatcher.run()
    assert [a for s, a in pool.calls if s == 1] == [1, 2, 3]
    assert sorted(result.committed) == [0, 2, 3] and list(result.quarantined) == [1]
    assert pool.released == 3 and not pool.killed  # a failed call leaves its worker running
    record = failed_record(tmp_path, plan, 1)
    assert record.shard_id == 1 and record.attempts == 3
    assert record.fingerprint == plan.fingerprint
    assert [e.attempt for e in record.errors] == [1, 2, 3]
    assert all(e.error.endswith("RuntimeError: shard 1 broke\n") for e in record.errors)
    assert record.last_error_line() == "RuntimeError: shard 1 broke"
    # Its record, and the GPU-seconds its failed attempts used (for the budget).
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        layout.failed_file(plan.shard_name(1)),
        layout.SPENT_FILE,
    ]


def test_failed_json_keeps_the_workers_traceback_with_credentials_masked(tmp_path, caplog):
    secret = "wJalrXUtnFEMIK7MDENGbPxRfiCYzEXAMPLEKEY"
    traceback_text = (
        'Traceback (most recent call last):\n  File "generator.py", line 9, in _spool\n'
        "    writer.write(rows)\n"
        f"OSError: could not write s3://b/out/00001.tar?aws_secret_access_key={secret}\n"
    )
    pool = FakePool(
        shard=lambda s, a, c: FAILED if s == 1 else DONE, error=lambda s: traceback_text
    )
    dispatcher, _, plan = dispatch(tmp_path, pool, max_attempts=2)
    with caplog.at_level("DEBUG", logger="sdfleet"):
        dispatcher.run()
    record = failed_record(tmp_path, plan, 1)
    for attempt in record.errors:
        assert 'File "generator.py", line 9, in _spool' in attempt.error  # the whole traceback
        assert secret not in attempt.error and "aws_secret_access_key=***" in attempt.error
    # Each failed attempt is one warning line; the traceback is a debug record (shown with -v).
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "shard 00001 attempt 1 failed: OSError: could not write" in "\n".join(warnings)
    debug = "\n".join(r.getMessage() for r in caplog.records if r.levelname == "DEBUG")
    assert "in _spool" in debug


def test_the_workers_traceback_crosses_from_a_ray_task_error_as_plain_text():
    from ray.exceptions import RayTaskError

    from sdfleet.jobs.pool import worker_error_text

    try:
        raise IsADirectoryError(21, "Is a directory", "/out/00002.tar")
    except IsADirectoryError as cause:
        import traceback

        remote = traceback.format_exc()
        # As the driver gets it: the cause unpickled (no traceback), Ray's text beside it.
        error = RayTaskError(
            "run_attempt", remote, cause.with_traceback(None)
        ).as_instanceof_cause()
    text = worker_error_text(error)
    assert "test_the_workers_traceback_crosses" in text  # the frame the worker raised in
    assert text.splitlines()[-1] == "IsADirectoryError: [Errno 21] Is a directory: '/out/00002.tar'"
    assert "\x1b[" not in text


def test_a_failed_call_keeps_its_worker(tmp_path):
    pool = FakePool(shard=lambda s, attempt, call: FAILED if attempt == 1 else DONE)
    dispatcher, _, _ = dispatch(tmp_path, pool, shards=2, max_workers=1)
    result = dispatcher.run()
    assert sorted(result.committed) == [0, 1]
    assert pool.actors_started == 1 and pool.released == 2 and not pool.killed


def test_a_shard_that_succeeds_on_a_retry_is_committed_and_not_quarantined(tmp_path):
    pool = FakePool(shard=lambda s, attempt, call: FAILED if s == 2 and attempt < 3 else DONE)
    dispatcher, _, plan = dispatch(tmp_path, pool, max_attempts=3)
    result = dispatcher.run()
    assert sorted(result.committed) == [0, 1, 2, 3] and not result.quarantined
    assert not (tmp_path / "out" / layout.failed_file(plan.shard_name(2))).exists()


def test_a_dead_worker_counts_an_attempt_for_its_running_shard_only(tmp_path):
    """The running shard (the slot's oldest) is charged; the one queued behind it goes back free."""
    pool = FakePool(shard=lambda s, attempt, call: DIED if s == 0 and attempt == 1 else DONE)
    dispatcher, _, _ = dispatch(tmp_path, pool, shards=2, max_workers=1, max_attempts=2)
    result = dispatcher.run()
    assert sorted(result.committed) == [0, 1] and not result.quarantined
    assert pool.calls[:2] == [(0, 1), (1, 1)]  # one actor held both
    assert sorted(pool.calls[2:]) == [(0, 2), (1, 1)]  # 1 was not charged for 0's death
    assert pool.killed == ["actor-0"] and pool.actors_started == 2  # and a replacement


def test_a_worker_that_keeps_dying_quarantines_its_shard_with_every_reason(tmp_path):
    pool = FakePool(shard=lambda s, attempt, call: DIED if s == 3 else DONE)
    dispatcher, _, plan = dispatch(tmp_path, pool, max_attempts=2)
    result = dispatcher.run()
    assert list(result.quarantined) == [3] and sorted(result.committed) == [0, 1, 2]
    record = failed_record(tmp_path, plan, 3)
    assert [e.error for e in record.errors] == ["worker died: The actor died unexpectedly"] * 2


# ------------------------------------------------------------------------------------ preemption


def test_preemption_requeues_without_counting_an_attempt(tmp_path):
    """With max_attempts=1 any counted failure would quarantine: two preemptions do not."""
    pool = FakePool(shard=lambda s, attempt, call: PREEMPTED if s == 0 and call <= 2 else DONE)
    dispatcher, _, _ = dispatch(tmp_path, pool, shards=2, max_attempts=1)
    result = dispatcher.run()
    assert sorted(result.committed) == [0, 1] and not result.quarantined
    assert [a for s, a in pool.calls if s == 0] == [1, 1, 1]
    assert len(pool.killed) == 2  # each preempted worker was let go
    assert not list((tmp_path / "out").glob(layout.FAILED_GLOB))


# ------------------------------------------------------------------------------------ start-up


def test_a_start_failure_with_a_user_error_stops_the_job_at_once(tmp_path):
    refused = ModelLoadError("model.source /nowhere does not exist (worker 1 on node n)")
    pool = FakePool(start=lambda n: refused)
    dispatcher, sink, _ = dispatch(tmp_path, pool, max_attempts=3)
    with pytest.raises(WorkerStartError, match=r"^model.source /nowhere does not exist"):
        dispatcher.run()
    assert pool.actors_started == 1 and not pool.calls and not sink.written
    assert pool.shut_down


def test_workers_that_never_start_stop_the_job_after_max_attempts(tmp_path):
    pool = FakePool(start=lambda n: RuntimeError("CUDA error: no kernel image"), capacity=1)
    dispatcher, _, _ = dispatch(tmp_path, pool, max_attempts=3)
    with pytest.raises(WorkerStartError, match=r"no worker could start after 3 tries; last error:"):
        dispatcher.run()
    assert pool.actors_started == 3 and not pool.calls and pool.shut_down


def test_start_failures_after_a_worker_started_replace_the_worker(tmp_path, caplog):
    """Once any worker has started, a failing start-up is that node's problem: the job goes on."""
    pool = FakePool(
        start=lambda n: STARTED if n in (0, 4) else RuntimeError("node lost"), capacity=1
    )
    dispatcher, _, _ = dispatch(tmp_path, pool, shards=2, max_attempts=2)
    # Actor 0 starts and dies with both shards; actors 1-3 fail to start; actor 4 does the work.
    pool.script = lambda s, attempt, call: DIED if attempt == 1 and s == 0 else DONE
    with caplog.at_level("DEBUG", logger="sdfleet"):
        result = dispatcher.run()
    assert sorted(result.committed) == [0, 1] and pool.actors_started == 5
    # Each failed start-up: one error line, and under -v (DEBUG) the worker's traceback.
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors.count("a worker failed to start: RuntimeError('node lost')") == 3
    tracebacks = [
        r.getMessage() for r in caplog.records if "the worker's traceback" in r.getMessage()
    ]
    assert len(tracebacks) == 3 and all("Traceback" in t for t in tracebacks)


# ------------------------------------------------------------------------------------ timeouts


def test_a_shard_past_its_timeout_has_its_worker_killed_and_is_retried(tmp_path, caplog):
    pool = FakePool(shard=lambda s, attempt, call: HANG if s == 1 and attempt == 1 else DONE)
    dispatcher, _, plan = dispatch(tmp_path, pool, max_attempts=2, shard_timeout_s=10)
    result = dispatcher.run()
    assert sorted(result.committed) == [0, 1, 2, 3] and not result.quarantined
    assert (1, 2) in pool.calls
    assert (
        f"shard {plan.shard_name(1)} ran past shard_timeout_s=10.0; killing its worker"
        in caplog.text
    )
    assert len(pool.killed) == 1


def test_a_shard_that_always_times_out_is_quarantined(tmp_path):
    pool = FakePool(shard=lambda s, attempt, call: HANG if s == 0 else DONE)
    dispatcher, _, plan = dispatch(tmp_path, pool, max_attempts=2, shard_timeout_s=10)
    result = dispatcher.run()
    assert list(result.quarantined) == [0]
    assert [e.error for e in failed_record(tmp_path, plan, 0).errors] == [
        "timed out after 10.0s"
    ] * 2


# ------------------------------------------------------------------------------------ scaling


def test_the_pool_is_asked_for_one_worker_per_shard_left(tmp_path):
    pool = FakePool()
    dispatcher, _, _ = dispatch(tmp_path, pool, shards=5, max_workers=8)
    dispatcher.run()
    assert pool.sizes[0] == 5
    assert pool.sizes == sorted(pool.sizes, reverse=True)  # shrinks as shards finish
    assert pool.sizes[-1] >= 1  # never asked to shrink below the work in hand


def test_min_workers_holds_while_work_remains(tmp_path):
    pool = FakePool()
    dispatcher, _, _ = dispatch(tmp_path, pool, shards=1, min_workers=3, max_workers=4)
    dispatcher.run()
    assert pool.sizes and all(size == 3 for size in pool.sizes)
    assert pool.actors_started >= 1


def test_max_workers_caps_the_actors_not_the_request(tmp_path):
    """The dispatcher asks for the work left; the pool holds at most its capacity (max_workers)."""
    pool = FakePool(capacity=2)
    dispatcher, _, _ = dispatch(tmp_path, pool, shards=6, max_workers=2)
    result = dispatcher.run()
    assert sorted(result.committed) == list(range(6))
    assert pool.sizes[0] == 6 and pool.actors_started == 2


def test_nothing_is_started_when_no_shard_is_pending(tmp_path):
    pool = FakePool()
    dispatcher, _, _ = dispatch(tmp_path, pool, shards=0)
    assert not dispatcher.run().committed
    assert pool.sizes == [] and pool.shut_down


# ------------------------------------------------------------------------------------ the budget


def test_no_shard_starts_once_the_budget_is_spent(tmp_path, caplog):
    """$1 per GPU-second: after two shards ($1.00) no more start; the one in hand finishes."""
    pool = FakePool()
    dispatcher, _, _ = dispatch(
        tmp_path, pool, shards=6, max_workers=1, budget_usd=1.0, gpu_hour_usd=3600.0
    )
    result = dispatcher.run()
    assert result.budget_stopped
    assert sorted(result.committed) == [0, 1, 2]
    assert sorted(s for s, _ in pool.calls) == [0, 1, 2]
    assert "budget reached: $1.00 of resources.budget_usd=$1.00 spent; 3 shard(s) not started" in (
        caplog.text
    )


def test_a_budget_spent_by_earlier_runs_starts_nothing(tmp_path):
    pool = FakePool()
    dispatcher, _, _ = dispatch(
        tmp_path, pool, shards=3, spent=5.0, budget_usd=1.0, gpu_hour_usd=3600.0
    )
    result = dispatcher.run()
    assert result.budget_stopped and not result.committed
    assert pool.actors_started == 0 and pool.shut_down


def test_failed_attempts_count_toward_the_budget_and_are_recorded(tmp_path):
    """Shards that fail after generating, $1 per GPU-second, $1 of budget: attempts stop once two
    failed ones ($1.00) are spent, not after 6 shards x 3 attempts; `_spent.json` keeps them."""
    pool = FakePool(shard=lambda shard_id, attempt, call: FAILED)
    dispatcher, _, plan = dispatch(
        tmp_path, pool, shards=6, max_workers=1, budget_usd=1.0, gpu_hour_usd=3600.0
    )
    result = dispatcher.run()
    assert result.budget_stopped and not result.committed and not result.quarantined
    # Two calls in the worker's hands when the budget ran out: both finished, neither retried.
    assert pool.calls == [(0, 1), (1, 1), (0, 2)]
    spent = UncommittedSpend.model_validate_json((tmp_path / "out" / layout.SPENT_FILE).read_text())
    assert spent == UncommittedSpend(
        fingerprint=plan.fingerprint, gpu_seconds=3 * GPU_SECONDS, attempts=3
    )


def test_a_worker_killed_for_a_timeout_counts_what_its_shard_held(tmp_path):
    pool = FakePool(shard=lambda shard_id, attempt, call: HANG)
    dispatcher, _, _ = dispatch(
        tmp_path, pool, shards=4, max_workers=1, budget_usd=1.0, gpu_hour_usd=3600.0
    )
    result = dispatcher.run()
    assert result.budget_stopped and not result.quarantined
    assert len(pool.killed) == 2  # 0.5 each: the second kill reached the cap


def test_an_attempt_that_lost_the_commit_race_spent_too(tmp_path):
    """Its shard is committed (by the winner), but its own GPU-seconds are in no stats file."""
    pool = FakePool(shard=lambda shard_id, attempt, call: LOST if shard_id == 1 else DONE)
    dispatcher, _, plan = dispatch(tmp_path, pool, shards=3)
    result = dispatcher.run()
    assert sorted(result.committed) == [0, 1, 2]
    assert dispatcher.spent_gpu_seconds == 3 * GPU_SECONDS
    spent = UncommittedSpend.model_validate_json((tmp_path / "out" / layout.SPENT_FILE).read_text())
    assert spent == UncommittedSpend(
        fingerprint=plan.fingerprint, gpu_seconds=GPU_SECONDS, attempts=1
    )


def test_failed_attempts_of_earlier_runs_count_too(tmp_path):
    earlier = UncommittedSpend(fingerprint="f", gpu_seconds=5.0, attempts=4)
    pool = FakePool()
    dispatcher, _, _ = dispatch(
        tmp_path, pool, shards=3, uncommitted=earlier, budget_usd=1.0, gpu_hour_usd=3600.0
    )
    result = dispatcher.run()
    assert result.budget_stopped and pool.actors_started == 0


# ------------------------------------------------------------------------------------ Ray stays out


def test_the_dispatcher_imports_no_ray():
    code = "import sys, sdfleet.jobs.dispatch; print(sorted(m for m in ('ray', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

"""The actor pool: Ray's side of the driver. One ShardGenerator actor per GPU, each holding up to
`SHARDS_PER_ACTOR` shards; which shard to give, when to retry and when to stop is the dispatcher's
business (`sdfleet.jobs.dispatch`), not the pool's.

The pool knows its slots (an actor and the shards it holds), which actors have loaded their
models (only those get shards), how long each actor's oldest shard has run (timeouts), and what to
ask the autoscaler for. Cf. Ray Data's `_ActorPool` and datatrove's timeout manager.

Ray stays in here: what comes back from the actors reaches the dispatcher as a `PoolEvent` of one
of six kinds (`EVENT_KINDS`), never as a Ray object or exception.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdfleet.jobs.output_reach import check_output_reaches_every_node, worker_node_refusal
from sdfleet.schemas.errors import Preempted, UserError, first_line
from sdfleet.schemas.plan import Plan
from sdfleet.schemas.resources import cpu_threads_per_worker

log = logging.getLogger("sdfleet")

# One generating and one reading or writing beside it: enough to hide reads and uploads from the
# GPU, few enough that a dead actor strands at most two shards.
SHARDS_PER_ACTOR = 2
# How long workers may all wait to be placed before the driver says so (and then once a minute).
WAITING_WARN_S = 60.0
# How often the pool looks for shards past shard_timeout_s: a scan is a pass over every actor,
# and timeouts are minutes to hours, so once a second is soon enough at any fleet size.
TIMEOUT_SCAN_S = 1.0
# S3 settings that are not secrets, forwarded to workers so that an endpoint such as MinIO or a
# regional mirror set on the driver is used by every actor too. Credentials are never forwarded:
# each node takes them from its own environment or instance role.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def connect_ray(address: str | None) -> bool:
    """Connect to `address` (or RAY_ADDRESS); else start an embedded local Ray. Returns whether embedded."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return False
    if address:
        runtime_env: dict | None = None
        stage = None
        if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
            # Outside `ray job submit`, ship our own package and S3 settings to the cluster's
            # workers. Inside a submitted job, the job's own runtime_env already carries them.
            stage = staged_package()
            runtime_env = {"py_modules": [str(stage)]}
            env_vars = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
            if env_vars:
                runtime_env["env_vars"] = env_vars
        try:
            ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
        finally:
            if stage is not None:  # uploaded by now: Ray ships py_modules at init
                shutil.rmtree(stage.parent, ignore_errors=True)
        log.info("connected to the Ray cluster at %s", address)
        return False
    # An embedded Ray for one machine: no dashboard (saves ~1 GB and port 8265 clashes).
    ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
    log.info("started an embedded local Ray")
    return True


def disconnect_ray() -> None:
    """Leave Ray, if this process joined it: its workers' log lines, which Ray forwards to the
    driver's stderr as they come, stop here (so a line printed after them is the last one)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    try:
        ray.shutdown()
    except Exception as e:  # noqa: BLE001 -- leaving is a courtesy; the process ends anyway
        log.debug("ray.shutdown failed: %s", e)


def staged_package() -> Path:
    """This sdfleet's code as one folder named `sdfleet`, which Ray's py_modules ships as that package.

    Installed, the code is site-packages/sdfleet; installed editable, it is the repo's jobs/, actors/
    and schemas/ mapped under that name. A copy under the right name serves both (Ray uploads a
    folder by its content hash, so an unchanged package is uploaded once per cluster).
    """
    from sdfleet import actors, jobs, schemas

    stage = Path(tempfile.mkdtemp(prefix="sdfleet-ship-")) / "sdfleet"
    for package in (schemas, actors, jobs):
        shutil.copytree(
            Path(package.__file__).parent,
            stage / package.__name__.rsplit(".", 1)[-1],
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
    return stage


@dataclass
class Slot:
    """One actor and the shards it holds, oldest (running) first."""

    actor: Any
    ready_ref: Any  # resolves once the actor has loaded its models
    ready: bool = False
    tasks: deque = field(default_factory=deque)  # (ref, task)
    head_since: float = 0.0  # when the oldest shard it holds became its oldest
    live: bool = True  # False once removed from the pool

    @property
    def hungry(self) -> bool:
        """Ready, in the pool, and holding fewer shards than it may."""
        return self.live and self.ready and len(self.tasks) < SHARDS_PER_ACTOR

    def add(self, ref: Any, task: Any) -> None:
        if not self.tasks:
            self.head_since = time.monotonic()
        self.tasks.append((ref, task))

    @property
    def running(self) -> Any:
        """The task of its oldest shard: the one generating (or the first to have)."""
        return self.tasks[0][1]

    def pop(self, ref: Any) -> None:
        for i, (r, _) in enumerate(self.tasks):
            if r == ref:
                del self.tasks[i]
                if i == 0:
                    # The next shard's clock starts now. A queued shard that finishes first (it
                    # generates after the head, but may upload faster) leaves the head's clock running.
                    self.head_since = time.monotonic()
                return


# What the pool reports, per call that came back: an actor's start-up, then one of its shards.
STARTED = "started"  # the actor loaded its models and takes shards
START_FAILED = "start_failed"  # the actor could not start (it is still the pool's to remove)
DIED = "died"  # the actor is gone, with the shards it held
PREEMPTED = "preempted"  # the actor got a termination notice (spot reclaim, pod eviction)
FAILED = "failed"  # the shard's call raised; the actor lives on
DONE = "done"  # the shard is committed
EVENT_KINDS = (STARTED, START_FAILED, DIED, PREEMPTED, FAILED, DONE)


@dataclass
class PoolEvent:
    """A call that came back, in the dispatcher's terms."""

    kind: str  # one of EVENT_KINDS
    slot: Slot
    task: Any = None  # the shard's task; None for a start-up
    stats: Any = None  # DONE: the shard's ShardStats
    # DONE and FAILED: the GPU-seconds the attempt used, as its worker said (None: it did not say);
    # DONE: whether its files are the committed ones (False: it lost the race to another writer).
    gpu_seconds: float | None = None
    committed_here: bool = True
    # START_FAILED and FAILED: the error in full (the worker's traceback where there is one).
    error: str = ""
    # START_FAILED and DIED: the error's first line; PREEMPTED: the notice.
    summary: str = ""
    # START_FAILED: the UserError the worker refused to start with (bad model, output not writable):
    # every other worker would meet it too.
    refusal: UserError | None = None
    ref: Any = None  # the call, for `release`


@dataclass
class WorkerKind:
    """How the pool's actors are placed."""

    placement: dict[str, Any]  # ray.remote's num_gpus / num_cpus
    capacity: int  # actors the job may hold at once
    cpu_threads: int | None  # torch CPU threads per actor; None: set per node by the actor
    gpus_per_actor: float  # 0 for CPU workers


class ActorPool:
    def __init__(self, plan: Plan, embedded: bool, worker: type | None = None):
        """worker: the actor class, ShardGenerator or a subclass (the benchmarks swap its engine)."""
        import ray

        if worker is None:
            from sdfleet.actors.generator import ShardGenerator as worker

        self.embedded = (
            embedded  # an embedded Ray has no autoscaler: what it has now is all there is
        )
        self.kind = choose_worker_kind(plan, embedded)
        # Refused here, before any actor is asked for: where the workers' local output would go.
        check_output_reaches_every_node(plan.spec.output, gpu_workers=self.kind.gpus_per_actor > 0)
        self.output = plan.spec.output
        self.driver_node = ray.get_runtime_context().get_node_id()
        # The driver, not Ray, counts attempts: Ray's own restarts would retry a deterministic crash forever.
        self.actor_cls = ray.remote(
            max_restarts=0,
            max_task_retries=0,
            max_concurrency=SHARDS_PER_ACTOR,
            **self.kind.placement,
        )(worker)
        self.plan_ref = ray.put(plan)
        # The driver's work per event must not grow with the fleet (1,000 GPUs are 2,000 calls in
        # flight): calls and start-ups are found by dict, shards go to a queue of slots with room,
        # and the timeout scan runs once per TIMEOUT_SCAN_S, not once per result.
        self.slots: list[Slot] = []
        self.refs: dict[Any, tuple[Slot, Any]] = {}  # a shard's call -> its slot and task
        self.starting: dict[
            Any, Slot
        ] = {}  # an actor's start-up call -> its slot, until it is ready
        self.hungry: deque[Slot] = deque()  # slots that may have room; checked when taken
        self.ready = 0  # actors that have loaded their models
        self.requested = -1  # GPU bundles last asked of the autoscaler
        self.waiting_since = time.monotonic()
        self.timeouts_scanned = 0.0

    @property
    def busy(self) -> int:
        """Shards in the actors' hands."""
        return len(self.refs)

    # ------------------------------------------------------------------ size

    def resize(self, desired: int) -> None:
        """Grow to `desired` actors; shrink by releasing unplaced actors, then idle ready ones. An
        actor with shards in hand is never removed; it is released when it has finished them."""
        import ray

        desired = min(desired, self.kind.capacity)
        while len(self.slots) < desired:
            actor = self.actor_cls.remote(self.plan_ref, self.kind.cpu_threads)
            slot = Slot(actor=actor, ready_ref=actor.ready.remote())
            self.slots.append(slot)
            self.starting[slot.ready_ref] = slot
        if len(self.slots) > desired:
            for slot in sorted(self.slots, key=lambda s: s.ready):
                if len(self.slots) <= desired:
                    break
                if not slot.tasks:
                    ray.kill(slot.actor, no_restart=True)
                    self._drop(slot)
        self.request(desired)

    def request(self, workers: int) -> None:
        """Ask the autoscaler for the GPU bundles ahead of time (it also reacts to pending actors)."""
        if self.embedded or self.kind.gpus_per_actor == 0 or workers == self.requested:
            return
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[{"GPU": self.kind.gpus_per_actor}] * workers)
        self.requested = workers

    # ------------------------------------------------------------------ work

    def feed(self, next_task: Callable[[], Any | None]) -> None:
        """Give ready actors shards until each holds SHARDS_PER_ACTOR or `next_task` has none.

        Only a ready actor gets shards: one that is still loading, or cannot be placed at all (its
        node died and no GPU is free), must not hold shards hostage."""
        while self.hungry:
            slot = self.hungry[0]
            if not slot.hungry:
                self.hungry.popleft()
                continue
            task = next_task()
            if task is None:
                return
            ref = slot.actor.run_attempt.remote(task.shard_id, task.attempts + 1)
            slot.add(ref, task)
            self.refs[ref] = (slot, task)

    def wait(self, timeout: float) -> Iterator[PoolEvent]:
        """The calls that came back within `timeout` seconds (at most one start-up or shard)."""
        import ray

        waiting = [*self.refs, *self.starting]
        if not waiting:
            time.sleep(timeout)
            return
        done, _ = ray.wait(waiting, num_returns=1, timeout=timeout)
        for ref in done:
            starting = self.starting.pop(ref, None)
            if starting is not None:
                yield self._started(starting)
                continue
            if ref not in self.refs:
                continue  # its actor was already removed
            slot, task = self.refs.pop(ref)
            try:
                value = ray.get(ref)
            except ray.exceptions.RayError as e:
                # The slot keeps the task: whether it goes with the actor or alone is the caller's call.
                yield _failure(slot, task, ref, e)
                continue
            self._pop(slot, ref)
            yield PoolEvent(
                DONE,
                slot,
                task,
                stats=value.stats,
                ref=ref,
                gpu_seconds=value.gpu_seconds,
                committed_here=value.committed,
            )

    def _started(self, slot: Slot) -> PoolEvent:
        import ray

        try:
            worker = ray.get(slot.ready_ref)
        except ray.exceptions.RayError as e:
            cause = getattr(e, "cause", None)
            refusal = cause if isinstance(cause, UserError) else None
            return PoolEvent(
                START_FAILED,
                slot,
                error=worker_error_text(e),
                summary=first_line(e),
                refusal=refusal,
            )
        refusal = worker_node_refusal(self.output, worker.get("node"), self.driver_node)
        if refusal is not None:  # before it gets a shard
            return PoolEvent(
                START_FAILED, slot, error=str(refusal), summary=first_line(refusal), refusal=refusal
            )
        slot.ready = True
        self.ready += 1
        self.hungry.append(slot)
        return PoolEvent(STARTED, slot)

    def _pop(self, slot: Slot, ref: Any) -> None:
        slot.pop(ref)
        self.hungry.append(slot)

    def release(self, event: PoolEvent) -> None:
        """Drop a failed call's shard from its slot; the actor lives on."""
        self._pop(event.slot, event.ref)

    def timed_out(self, limit_s: float) -> list[Slot]:
        """Slots whose oldest shard has run longer than `limit_s`, looked for once per TIMEOUT_SCAN_S."""
        now = time.monotonic()
        if now - self.timeouts_scanned < TIMEOUT_SCAN_S:
            return []
        self.timeouts_scanned = now
        return [s for s in self.slots if s.tasks and now - s.head_since > limit_s]

    def held_gpu_seconds(self, slot: Slot) -> float:
        """What the slot's oldest shard has held its actor's GPUs for: the spend of an attempt
        whose worker cannot say (it died, hung or was preempted)."""
        if not slot.tasks:
            return 0.0
        return (time.monotonic() - slot.head_since) * self.kind.gpus_per_actor

    def remove(self, slot: Slot) -> list[Any]:
        """Kill the slot's actor and drop it; return the tasks it held, oldest (running) first.
        The next resize starts a replacement if work remains."""
        import ray

        ray.kill(slot.actor, no_restart=True)
        held = [task for _, task in slot.tasks]
        for ref, _ in slot.tasks:
            self.refs.pop(ref, None)
        slot.tasks.clear()
        self._drop(slot)
        return held

    def _drop(self, slot: Slot) -> None:
        self.slots.remove(slot)
        self.starting.pop(slot.ready_ref, None)
        self.ready -= slot.ready
        slot.live = False

    def report_waiting(self) -> None:
        """Say so, once a minute, while no actor could be placed."""
        now = time.monotonic()
        if self.ready or not self.slots:
            self.waiting_since = now
        elif now - self.waiting_since > WAITING_WARN_S:
            self.waiting_since = now
            log.warning(
                "%d worker(s) still waiting to be placed: the cluster has no free %s. An autoscaler adds "
                "nodes for them; without one, free capacity or set resources.gpus_per_worker: 0 for CPU workers",
                len(self.slots),
                "GPU" if self.kind.gpus_per_actor else "CPU",
            )

    def shutdown(self) -> None:
        """Release every actor (and with them their GPUs) and withdraw the resource request, so the
        autoscaler can remove the nodes once they idle."""
        import ray

        for slot in list(self.slots):
            ray.kill(slot.actor, no_restart=True)
            self._drop(slot)
        self.refs.clear()
        self.hungry.clear()
        self.request(0)


def choose_worker_kind(plan: Plan, embedded: bool) -> WorkerKind:
    """GPU actors (placed now, or pending until the autoscaler adds GPU nodes), or CPU actors where
    no GPU can ever come."""
    import ray

    res = plan.spec.resources
    cluster = ray.cluster_resources()
    gpus, cpus = cluster.get("GPU", 0), int(cluster.get("CPU", 1))
    if res.gpus_per_worker > 0 and (gpus > 0 or not embedded):
        # One actor per GPU. On a cluster with no GPU yet, the actors wait as pending demand and the
        # autoscaler adds GPU nodes. num_cpus=0: a GPU actor that also reserves a CPU can starve
        # every other task on small nodes (a silent deadlock was seen on 2 CPUs).
        if gpus == 0:
            log.info("no GPU in the cluster yet: asking the autoscaler for GPU nodes")
        return WorkerKind(
            {"num_gpus": res.gpus_per_worker, "num_cpus": 0},
            res.max_workers,
            res.cpu_threads,
            res.gpus_per_worker,
        )
    # CPU workers: asked for (gpus_per_worker: 0), or an embedded Ray on a machine without GPUs (the
    # demo). Their threads follow from the machine's capacity, never from the work left: CPU float
    # results depend on the thread count, and a resumed shard must come out byte-identical to the
    # one an uninterrupted run would have made.
    capacity = max(1, min(res.max_workers, cpus // 2 or 1))
    log.info("no GPUs for this job: running up to %d CPU worker(s)", capacity)
    return WorkerKind(
        {"num_cpus": 1}, capacity, res.cpu_threads or cpu_threads_per_worker(cpus, capacity), 0.0
    )


def _failure(slot: Slot, task: Any, ref: Any, e: BaseException) -> PoolEvent:
    """A shard's call that raised: its actor died, was preempted, or the call itself failed."""
    import ray

    if isinstance(e, ray.exceptions.RayActorError):
        return PoolEvent(DIED, slot, task, summary=first_line(e), ref=ref)
    cause = getattr(e, "cause", None)
    if isinstance(cause, Preempted):
        # A termination notice is not the shard's fault.
        return PoolEvent(PREEMPTED, slot, task, summary=str(cause), ref=ref)
    spent = getattr(cause, "gpu_seconds", None)  # set by ShardGenerator.run_attempt
    return PoolEvent(FAILED, slot, task, error=worker_error_text(e), ref=ref, gpu_seconds=spent)


# Ray colours the worker's traceback for a terminal; `_failed.json` and the logs hold plain text.
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def worker_error_text(e: BaseException) -> str:
    """The worker's own traceback where Ray carries one, ending with the error's own line, else the
    message. A task error's cause crosses processes without its traceback (exceptions pickle
    without one): the worker's traceback is the text Ray formatted there, which its str holds."""
    cause = getattr(e, "cause", None)
    if cause is None:
        return str(e)
    last = "".join(traceback.format_exception_only(type(cause), cause)).strip()
    text = _ANSI_ESCAPE.sub("", str(e)).strip()
    if not text.endswith(last):
        text = f"{text}\n{last}" if text else last
    return text

"""Dispatch: one GeneratorActor per GPU, fed by pull, with retries, timeouts and quarantine.

Each actor holds one shard in flight and one queued in its mailbox (Ray runs an actor's calls in
order), so it starts the next shard the moment it finishes one. The driver, not Ray, counts
attempts: Ray's own restarts would retry a deterministic crash forever.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from actors.storage import Storage

log = logging.getLogger("sdfleet")

# One running and one waiting: enough to hide the gap between shards, few enough that a dead
# actor strands at most two shards.
SHARDS_PER_ACTOR = 2
# How often the loop wakes without a result, to check shard timeouts and refresh the display.
POLL_S = 1.0
# S3 settings that are not secrets, forwarded to workers so that an endpoint such as MinIO or a
# regional mirror set on the driver is used by every actor too. Credentials are never forwarded:
# each node takes them from its own environment or instance role.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def connect_ray(address: str | None) -> str:
    """Connect to `address` (or RAY_ADDRESS); else start an embedded local Ray. Returns a description."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return "existing Ray session"
    if address:
        runtime_env: dict | None = None
        if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
            # Outside `ray job submit`, ship our own packages and S3 settings to the cluster's
            # workers. Inside a submitted job, the job's own runtime_env already carries them.
            import actors
            import jobs
            import schemas

            runtime_env = {"py_modules": [schemas, jobs, actors]}
            env_vars = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
            if env_vars:
                runtime_env["env_vars"] = env_vars
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
        return f"Ray cluster at {address}"
    # An embedded Ray for one machine: no dashboard (saves ~1 GB and port 8265 clashes).
    ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
    return "embedded local Ray"


@dataclass
class ShardTask:
    shard_id: int
    attempts: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Slot:
    """One actor and the shards it holds, oldest (running) first."""

    actor: Any
    ready_ref: Any  # resolves once the actor has loaded its models
    ready: bool = False
    tasks: deque = field(default_factory=deque)  # (ref, task)
    head_since: float = 0.0


@dataclass
class DispatchResult:
    committed: dict[int, dict[str, Any]] = field(default_factory=dict)
    quarantined: dict[int, ShardTask] = field(default_factory=dict)


class WorkerStartError(RuntimeError):
    """No worker could start (e.g. the model fails to load on the cluster)."""


class Dispatcher:
    def __init__(self, plan, storage: Storage, progress: bool = True):
        self.plan = plan
        self.spec = plan.spec
        self.storage = storage
        self.progress = progress

    def run(self, shard_ids: list[int], already_done_samples: int = 0) -> DispatchResult:
        import ray

        res = self.spec.resources
        self.result = DispatchResult()
        self.queue = deque(ShardTask(s) for s in shard_ids)
        self.refs: dict[Any, tuple[_Slot, ShardTask]] = {}
        self.init_failures = 0
        self.any_ready = False

        # 1. Size the pool: one actor per GPU (up to max_workers), or CPU actors on a GPU-less cluster.
        self.actor_cls, n_workers, self.cpu_threads = self._actor_class(len(shard_ids))
        self.plan_ref = ray.put(self.plan)
        self.slots = [self._new_slot() for _ in range(n_workers)]
        log.info("dispatching %d shards to %d workers", len(shard_ids), n_workers)
        bar = self._progress_bar(already_done_samples)

        # 2. The pull loop: feed ready actors, collect results, enforce timeouts.
        try:
            while self.queue or self.refs:
                for slot in self.slots:
                    self._feed(slot)
                waiting = list(self.refs) + [s.ready_ref for s in self.slots if not s.ready]
                done, _ = ray.wait(waiting, num_returns=1, timeout=POLL_S)
                for ref in done:
                    self._collect(ref, bar)
                now = time.monotonic()
                for slot in self.slots:
                    if slot.tasks and now - slot.head_since > res.shard_timeout_s:
                        shard = self.plan.shard_name(slot.tasks[0][1].shard_id)
                        log.warning("shard %s ran past shard_timeout_s=%s; killing its worker", shard,
                                    res.shard_timeout_s)
                        self._replace(slot, f"timed out after {res.shard_timeout_s}s")
                ready = sum(s.ready for s in self.slots)
                bar.set_postfix(workers=f"{ready} running, {len(self.slots) - ready} starting",
                                quarantined=len(self.result.quarantined), refresh=False)
        finally:
            bar.close()
            # 3. Release the actors (and with them their GPUs) as soon as the queue is drained.
            for slot in self.slots:
                ray.kill(slot.actor, no_restart=True)
        return self.result

    # ------------------------------------------------------------------ pool

    def _new_slot(self) -> _Slot:
        actor = self.actor_cls.remote(self.plan_ref, self.cpu_threads)
        return _Slot(actor=actor, ready_ref=actor.ready.remote())

    def _feed(self, slot: _Slot) -> None:
        # Only a ready actor gets shards: one that is still loading, or cannot be placed at all
        # (its node died and no GPU is free), must not hold shards hostage.
        while slot.ready and len(slot.tasks) < SHARDS_PER_ACTOR and self.queue:
            task = self.queue.popleft()
            ref = slot.actor.run.remote(task.shard_id, task.attempts + 1)
            if not slot.tasks:
                slot.head_since = time.monotonic()
            slot.tasks.append((ref, task))
            self.refs[ref] = (slot, task)

    def _collect(self, ref, bar) -> None:
        import ray

        slot = next((s for s in self.slots if s.ready_ref == ref and not s.ready), None)
        if slot is not None:
            try:
                ray.get(ref)
            except ray.exceptions.RayError as e:
                self._start_failed(slot, e)
                return
            slot.ready, self.any_ready, self.init_failures = True, True, 0
            return
        if ref not in self.refs:
            return  # its actor was already replaced
        slot, task = self.refs.pop(ref)
        try:
            stats = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            self._replace(slot, f"worker died: {_short(e)}")
            return
        except ray.exceptions.RayTaskError as e:
            _pop(slot, ref)
            self._fail(task, _task_error(e))
            return
        _pop(slot, ref)
        self.result.committed[task.shard_id] = stats
        bar.update(stats["samples"])

    def _start_failed(self, slot: _Slot, e: Exception) -> None:
        self.init_failures += 1
        message = _task_error(e)
        log.error("a worker failed to start: %s", message.strip().splitlines()[-1] if message.strip() else e)
        if not self.any_ready and self.init_failures >= self.spec.resources.max_attempts:
            raise WorkerStartError(f"no worker could start after {self.init_failures} tries; last error:\n{message}")
        self._replace(slot, f"worker failed to start: {_short(e)}")

    def _fail(self, task: ShardTask, error: str, counted: bool = True) -> None:
        if counted:
            task.attempts += 1
            task.errors.append({"attempt": task.attempts, "error": error, "at": time.time()})
        if task.attempts >= self.spec.resources.max_attempts:
            self.result.quarantined[task.shard_id] = task
            self._write_failed(task)
            log.error("shard %s quarantined after %d attempts: %s", self.plan.shard_name(task.shard_id),
                      task.attempts, error.strip().splitlines()[-1] if error.strip() else error)
        else:
            self.queue.appendleft(task)

    def _replace(self, slot: _Slot, reason: str) -> None:
        """The slot's actor is gone or hung: its running shard fails, queued ones go back uncounted."""
        import ray

        ray.kill(slot.actor, no_restart=True)
        held = [self.plan.shard_name(task.shard_id) for _, task in slot.tasks]
        for i, (ref, task) in enumerate(list(slot.tasks)):
            self.refs.pop(ref, None)
            self._fail(task, reason, counted=(i == 0))
        slot.tasks.clear()
        if not self.queue:
            self.slots.remove(slot)  # nothing left for a replacement to do
            return
        log.warning("%s; shards %s go back to the queue; starting a replacement worker", reason,
                    ", ".join(held) or "none")
        fresh = self._new_slot()
        slot.actor, slot.ready_ref, slot.ready = fresh.actor, fresh.ready_ref, False

    def _actor_class(self, n_shards: int):
        import ray

        from actors.generator import ShardGenerator

        res = self.spec.resources
        cluster = ray.cluster_resources()
        gpus, cpus = cluster.get("GPU", 0), int(cluster.get("CPU", 1))
        # Threads per CPU-side torch follow from the cluster's capacity, never from how many shards
        # are left: CPU float results depend on the thread count, and a resumed shard must come out
        # byte-identical to the one an uninterrupted run would have made.
        if gpus >= res.gpus_per_worker:
            capacity = min(res.max_workers, int(gpus // res.gpus_per_worker))
            # num_cpus=0: a GPU actor that also reserves a CPU can starve every other task on
            # small nodes (a silent deadlock was seen on 2-CPU machines).
            options = {"num_gpus": res.gpus_per_worker, "num_cpus": 0}
        else:
            # No GPU anywhere: CPU workers so the demo runs; torch already uses every core it gets.
            capacity = max(1, min(res.max_workers, cpus // 2 or 1))
            options = {"num_cpus": 1}
            log.info("no GPUs in the Ray cluster: running up to %d CPU worker(s)", capacity)
        threads = max(1, cpus // capacity)
        n = max(1, min(capacity, n_shards))
        cls = ray.remote(max_restarts=0, max_task_retries=0, **options)(ShardGenerator)
        return cls, n, threads

    def _progress_bar(self, initial: int):
        from tqdm import tqdm

        return tqdm(
            total=self.plan.num_samples,
            initial=initial,
            unit="img",
            desc=self.spec.name,
            disable=not self.progress,
            file=sys.stderr,
            mininterval=1.0 if sys.stderr.isatty() else 10.0,
            dynamic_ncols=True,
        )

    def _write_failed(self, task: ShardTask) -> None:
        self.storage.write_json(
            f"{self.plan.shard_name(task.shard_id)}_failed.json",
            {"shard_id": task.shard_id, "attempts": task.attempts, "errors": task.errors,
             "fingerprint": self.plan.fingerprint},
        )


def _pop(slot: _Slot, ref) -> None:
    for i, (r, _) in enumerate(slot.tasks):
        if r == ref:
            del slot.tasks[i]
            break
    slot.head_since = time.monotonic()


def _task_error(e) -> str:
    cause = getattr(e, "cause", None)
    if cause is not None:
        return "".join(traceback.format_exception(type(cause), cause, cause.__traceback__))
    return str(e)


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__

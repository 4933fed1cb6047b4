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
    tasks: deque = field(default_factory=deque)  # (ref, task)
    head_since: float = 0.0


@dataclass
class DispatchResult:
    committed: dict[int, dict[str, Any]] = field(default_factory=dict)
    quarantined: dict[int, ShardTask] = field(default_factory=dict)


class Dispatcher:
    def __init__(self, plan, storage: Storage, progress: bool = True):
        self.plan = plan
        self.spec = plan.spec
        self.storage = storage
        self.progress = progress

    def run(self, shard_ids: list[int], already_done_samples: int = 0) -> DispatchResult:
        import ray

        res = self.spec.resources
        result = DispatchResult()
        queue = deque(ShardTask(s) for s in shard_ids)

        # 1. Size the pool: one actor per GPU (up to max_workers), or CPU actors on a GPU-less cluster.
        actor_cls, n_workers, cpu_threads = self._actor_class(len(shard_ids))
        plan_ref = ray.put(self.plan)
        slots = [_Slot(actor_cls.remote(plan_ref, cpu_threads)) for _ in range(n_workers)]
        log.info("dispatching %d shards to %d workers", len(shard_ids), n_workers)
        bar = self._progress_bar(already_done_samples)
        refs: dict[Any, tuple[_Slot, ShardTask]] = {}

        def submit(slot: _Slot) -> None:
            while len(slot.tasks) < SHARDS_PER_ACTOR and queue:
                task = queue.popleft()
                ref = slot.actor.run.remote(task.shard_id, task.attempts + 1)
                if not slot.tasks:
                    slot.head_since = time.monotonic()
                slot.tasks.append((ref, task))
                refs[ref] = (slot, task)

        def fail(task: ShardTask, error: str, counted: bool = True) -> None:
            if counted:
                task.attempts += 1
                task.errors.append({"attempt": task.attempts, "error": error, "at": time.time()})
            if task.attempts >= res.max_attempts:
                result.quarantined[task.shard_id] = task
                self._write_failed(task)
                log.error("shard %s quarantined after %d attempts: %s", self.plan.shard_name(task.shard_id),
                          task.attempts, error.strip().splitlines()[-1] if error.strip() else error)
            else:
                queue.appendleft(task)

        def replace(slot: _Slot, reason: str) -> None:
            """The slot's actor is gone or hung: its running shard fails, queued ones go back uncounted."""
            ray.kill(slot.actor, no_restart=True)
            for i, (ref, task) in enumerate(list(slot.tasks)):
                refs.pop(ref, None)
                fail(task, reason, counted=(i == 0))
            slot.tasks.clear()
            if queue:
                slot.actor = actor_cls.remote(plan_ref, cpu_threads)

        # 2. The pull loop.
        try:
            while queue or refs:
                for slot in slots:
                    submit(slot)
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=POLL_S)
                for ref in ready:
                    if ref not in refs:
                        continue  # its actor was already replaced
                    slot, task = refs.pop(ref)
                    try:
                        stats = ray.get(ref)
                    except ray.exceptions.RayActorError as e:
                        replace(slot, f"worker died: {_short(e)}")
                        continue
                    except ray.exceptions.RayTaskError as e:
                        _pop(slot, ref)
                        fail(task, _task_error(e))
                        continue
                    _pop(slot, ref)
                    result.committed[task.shard_id] = stats
                    bar.update(stats["samples"])
                    bar.set_postfix(workers=len(slots), quarantined=len(result.quarantined), refresh=False)
                now = time.monotonic()
                for slot in slots:
                    if slot.tasks and now - slot.head_since > res.shard_timeout_s:
                        shard = self.plan.shard_name(slot.tasks[0][1].shard_id)
                        log.warning("shard %s ran past shard_timeout_s=%s; killing its worker", shard,
                                    res.shard_timeout_s)
                        replace(slot, f"timed out after {res.shard_timeout_s}s")
        finally:
            bar.close()
            # 3. Release the actors (and with them their GPUs) as soon as the queue is drained.
            for slot in slots:
                ray.kill(slot.actor, no_restart=True)
        return result

    def _actor_class(self, n_shards: int):
        import ray

        from actors.generator import ShardGenerator

        res = self.spec.resources
        cluster = ray.cluster_resources()
        gpus = cluster.get("GPU", 0)
        if gpus >= res.gpus_per_worker:
            n = max(1, min(res.max_workers, int(gpus // res.gpus_per_worker), n_shards))
            # num_cpus=0: a GPU actor that also reserves a CPU can starve every other task on
            # small nodes (a silent deadlock was seen on 2-CPU machines).
            options = {"num_gpus": res.gpus_per_worker, "num_cpus": 0}
            threads = max(1, int(cluster.get("CPU", 1)) // n)
        else:
            cpus = int(cluster.get("CPU", 1))
            # No GPU anywhere: CPU workers so the demo runs; torch already uses every core it gets.
            n = max(1, min(res.max_workers, n_shards, cpus // 2 or 1))
            options = {"num_cpus": 1}
            threads = max(1, cpus // n)
            log.info("no GPUs in the Ray cluster: running %d CPU worker(s)", n)
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

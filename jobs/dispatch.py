"""Dispatch: one GeneratorActor per GPU, fed by pull, with retries, timeouts and quarantine.

Each actor holds two shards and runs both calls at once: one generating, the other reading its
prompts before, or writing its output after, its turn on the GPU (see actors.generator). The
driver, not Ray, counts attempts: Ray's own restarts would retry a deterministic crash forever.
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

from actors.generator import Preempted
from actors.storage import Storage

log = logging.getLogger("sdfleet")

# One generating and one reading or writing beside it: enough to hide reads and uploads from the
# GPU, few enough that a dead actor strands at most two shards.
SHARDS_PER_ACTOR = 2
# How often the loop wakes without a result, to check shard timeouts and refresh the display.
POLL_S = 1.0
PREEMPTED = "worker preempted"
# How long workers may all wait to be placed before the driver says so (and then once a minute).
WAITING_WARN_S = 60.0
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
        log.info("connected to the Ray cluster at %s", address)
        return False
    # An embedded Ray for one machine: no dashboard (saves ~1 GB and port 8265 clashes).
    ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
    log.info("started an embedded local Ray")
    return True


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
    budget_stopped: bool = False  # resources.budget_usd was reached; the shards left were not started


class WorkerStartError(RuntimeError):
    """No worker could start (e.g. the model fails to load on the cluster)."""


class Dispatcher:
    def __init__(self, plan, storage: Storage, progress: bool = True, embedded: bool = False):
        self.plan = plan
        self.spec = plan.spec
        self.storage = storage
        self.progress = progress
        self.embedded = embedded  # an embedded Ray has no autoscaler: what it has now is all there is
        self.gpus_per_actor = 0.0

    def run(self, shard_ids: list[int], already_done_samples: int = 0, spent_gpu_seconds: float = 0.0) -> DispatchResult:
        import ray

        res = self.spec.resources
        self.result = DispatchResult()
        self.queue = deque(ShardTask(s) for s in shard_ids)
        self.refs: dict[Any, tuple[_Slot, ShardTask]] = {}
        self.slots: list[_Slot] = []
        self.init_failures = 0
        self.any_ready = False
        self.requested = -1
        self.waiting_since = time.monotonic()
        self.spent_gpu_seconds = spent_gpu_seconds

        # 1. Choose the worker kind: GPU actors (placed now, or pending until the autoscaler adds
        #    GPU nodes), or CPU actors where no GPU can ever come.
        self.actor_cls, self.max_pool, self.cpu_threads = self._actor_class()
        self.plan_ref = ray.put(self.plan)
        bar = self._progress_bar(already_done_samples)

        # 2. The pull loop: size the pool, feed ready actors, collect results, enforce timeouts.
        try:
            while self._open_queue() or self.refs:
                self._rescale()
                for slot in self.slots:
                    self._feed(slot)
                waiting = list(self.refs) + [s.ready_ref for s in self.slots if not s.ready]
                done, _ = ray.wait(waiting, num_returns=1, timeout=POLL_S)
                for ref in done:
                    self._collect(ref, bar)
                now = time.monotonic()
                for slot in list(self.slots):
                    if slot.tasks and now - slot.head_since > res.shard_timeout_s:
                        shard = self.plan.shard_name(slot.tasks[0][1].shard_id)
                        log.warning("shard %s ran past shard_timeout_s=%s; killing its worker", shard,
                                    res.shard_timeout_s)
                        self._replace(slot, f"timed out after {res.shard_timeout_s}s")
                self._report_waiting(now)
                ready = sum(s.ready for s in self.slots)
                bar.set_postfix(workers=f"{ready} running, {len(self.slots) - ready} pending",
                                quarantined=len(self.result.quarantined), refresh=False)
        finally:
            bar.close()
            # 3. Release every actor (and with them their GPUs) and withdraw the resource request,
            #    so the autoscaler can remove the nodes once they idle.
            for slot in self.slots:
                ray.kill(slot.actor, no_restart=True)
            self._request(0)
        return self.result

    # ---------------------------------------------------------------- scaling

    def _open_queue(self) -> int:
        """Shards that may still be started: none once the budget is spent."""
        res = self.spec.resources
        if res.budget_usd is not None and self.spent_gpu_seconds / 3600 * res.gpu_hour_usd >= res.budget_usd:
            if self.queue and not self.result.budget_stopped:
                log.warning("budget reached: $%.2f of resources.budget_usd=$%.2f spent; %d shard(s) not started",
                            self.spent_gpu_seconds / 3600 * res.gpu_hour_usd, res.budget_usd, len(self.queue))
                self.result.budget_stopped = True
            return 0
        return len(self.queue)

    def _desired(self) -> int:
        """Toward min(max_workers, shards not yet done), never below min_workers while work remains."""
        remaining = self._open_queue() + len(self.refs)
        if remaining == 0:
            return 0
        return min(self.max_pool, max(self.spec.resources.min_workers, remaining))

    def _rescale(self) -> None:
        import ray

        desired = self._desired()
        while len(self.slots) < desired:
            self.slots.append(self._new_slot())
        # Shrink: first actors that were never placed, then ready ones holding no shard. An actor
        # with shards in hand is never removed; it is released when it has finished them.
        for slot in sorted(self.slots, key=lambda s: s.ready):
            if len(self.slots) <= desired:
                break
            if not slot.tasks:
                ray.kill(slot.actor, no_restart=True)
                self.slots.remove(slot)
        self._request(desired)

    def _request(self, workers: int) -> None:
        """Ask the autoscaler for the GPU bundles ahead of time (it also reacts to pending actors)."""
        if self.embedded or self.gpus_per_actor == 0 or workers == self.requested:
            return
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[{"GPU": self.gpus_per_actor}] * workers)
        self.requested = workers

    def _report_waiting(self, now: float) -> None:
        if any(s.ready for s in self.slots) or not self.slots:
            self.waiting_since = now
        elif now - self.waiting_since > WAITING_WARN_S:
            self.waiting_since = now
            log.warning(
                "%d worker(s) still waiting to be placed: the cluster has no free %s. An autoscaler adds "
                "nodes for them; without one, free capacity or set resources.gpus_per_worker: 0 for CPU workers",
                len(self.slots), "GPU" if self.gpus_per_actor else "CPU")

    # ------------------------------------------------------------------ pool

    def _new_slot(self) -> _Slot:
        actor = self.actor_cls.remote(self.plan_ref, self.cpu_threads)
        return _Slot(actor=actor, ready_ref=actor.ready.remote())

    def _feed(self, slot: _Slot) -> None:
        # Only a ready actor gets shards: one that is still loading, or cannot be placed at all
        # (its node died and no GPU is free), must not hold shards hostage.
        while slot.ready and len(slot.tasks) < SHARDS_PER_ACTOR and self._open_queue():
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
            if isinstance(getattr(e, "cause", None), Preempted):
                # A termination notice (spot reclaim, pod eviction) is not the shard's fault.
                self._replace(slot, f"{PREEMPTED}: {e.cause}")
                return
            _pop(slot, ref)
            self._fail(task, _task_error(e))
            return
        _pop(slot, ref)
        self.result.committed[task.shard_id] = stats
        self.spent_gpu_seconds += stats.get("gpu_seconds", 0.0)
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
        """The slot's actor is gone or hung: its running shard fails, queued ones go back uncounted.

        The slot goes; the next rescale starts a replacement if work remains.
        """
        import ray

        ray.kill(slot.actor, no_restart=True)
        held = [self.plan.shard_name(task.shard_id) for _, task in slot.tasks]
        for i, (ref, task) in enumerate(list(slot.tasks)):
            self.refs.pop(ref, None)
            self._fail(task, reason, counted=(i == 0) and not reason.startswith(PREEMPTED))
        slot.tasks.clear()
        self.slots.remove(slot)
        if self.queue:
            log.warning("%s; shards %s go back to the queue; starting a replacement worker", reason,
                        ", ".join(held) or "none")

    def _actor_class(self):
        import ray

        from actors.generator import ShardGenerator

        res = self.spec.resources
        cluster = ray.cluster_resources()
        gpus, cpus = cluster.get("GPU", 0), int(cluster.get("CPU", 1))
        if res.gpus_per_worker > 0 and (gpus > 0 or not self.embedded):
            # One actor per GPU. On a cluster with no GPU yet, the actors wait as pending demand
            # and the autoscaler adds GPU nodes. num_cpus=0: a GPU actor that also reserves a CPU
            # can starve every other task on small nodes (a silent deadlock was seen on 2 CPUs).
            self.gpus_per_actor = res.gpus_per_worker
            if gpus == 0:
                log.info("no GPU in the cluster yet: asking the autoscaler for GPU nodes")
            placement = {"num_gpus": res.gpus_per_worker, "num_cpus": 0}
            # Threads for CPU-side torch are set per node by the actor unless the spec fixes them.
            capacity, threads = res.max_workers, res.cpu_threads
        else:
            # CPU workers: asked for (gpus_per_worker: 0), or an embedded Ray on a machine without
            # GPUs (the demo). Their threads follow from the machine's capacity, never from the work
            # left: CPU float results depend on the thread count, and a resumed shard must come out
            # byte-identical to the one an uninterrupted run would have made.
            self.gpus_per_actor = 0
            placement = {"num_cpus": 1}
            capacity = max(1, min(res.max_workers, cpus // 2 or 1))
            threads = res.cpu_threads or max(1, cpus // capacity)
            log.info("no GPUs for this job: running up to %d CPU worker(s)", capacity)
        cls = ray.remote(max_restarts=0, max_task_retries=0, max_concurrency=SHARDS_PER_ACTOR,
                         **placement)(ShardGenerator)
        return cls, capacity, threads

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
            if i == 0:
                # The next shard's clock starts now. A queued shard that finishes first (it generates
                # after the head, but may upload faster) leaves the head's clock running.
                slot.head_since = time.monotonic()
            break


def _task_error(e) -> str:
    cause = getattr(e, "cause", None)
    if cause is not None:
        return "".join(traceback.format_exception(type(cause), cause, cause.__traceback__))
    return str(e)


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__

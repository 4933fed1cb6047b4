"""`sdfleet run`: plan, check, dispatch, finalize. Exit codes: 0 complete, 1 refused, 2 quarantined."""

from __future__ import annotations

import datetime as dt
import logging
import platform
import sys
from importlib import metadata
from typing import Any

from pathlib import Path

from actors.storage import Storage, is_remote
from jobs.finalize import JOB_FILE, Finalizer, survey
from jobs.plan import Plan, Planner
from schemas.spec import JobSpec, SpecError, diff_fingerprint_fields

log = logging.getLogger("sdfleet")

EXIT_OK, EXIT_REFUSED, EXIT_QUARANTINED = 0, 1, 2

_VERSIONED = ("sdfleet", "torch", "diffusers", "transformers", "ray", "pyarrow", "fsspec", "s3fs", "pillow")


def job_record(plan: Plan) -> dict[str, Any]:
    """The contents of `_job.json`: enough to resume, audit and reproduce the job."""
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "spec": plan.spec.redacted(),
        "fingerprint": plan.fingerprint,
        "fingerprint_fields": plan.spec.fingerprint_fields(),
        "input_files": plan.input_manifest(),
        "num_samples": plan.num_samples,
        "num_shards": plan.num_shards,
        "samples_per_shard": plan.samples_per_shard,
        "sweep_points": len(plan.points),
        "key_width": plan.key_width,
        "versions": {"python": platform.python_version(), **versions},
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


class JobRunner:
    def __init__(self, spec: JobSpec, address: str | None = None, progress: bool = True):
        self.spec = spec
        self.address = address
        self.progress = progress
        self.storage = Storage(spec.output.uri, spec.output.storage_options)

    def run(self) -> int:
        # 1. Plan: lists the input and reads Parquet footers; bad input is refused here.
        plan = Planner(self.spec).plan()
        log.info("planned %d samples in %d shards from %d input file(s)", plan.num_samples, plan.num_shards,
                 len(plan.files))

        # 2. Check the model before any GPU is asked for.
        self._preflight()

        # 3. Claim the output, or resume it if it holds this very job.
        job = self._claim_output(plan)

        # 4. Dispatch every shard that is not committed yet.
        before = survey(self.storage, job)
        pending = [int(n) for n in before.pending + list(before.quarantined)]
        if pending:
            if before.committed:
                log.info("resuming: %d shards committed, %d to do", len(before.committed), len(pending))
            from jobs.dispatch import Dispatcher, WorkerStartError, connect_ray

            embedded = connect_ray(self.address)
            try:
                dispatcher = Dispatcher(plan, self.storage, self.progress, embedded=embedded)
                result = dispatcher.run(pending, before.committed_samples, before.totals()["gpu_seconds"])
            except WorkerStartError as e:
                print(f"sdfleet: error: {e}", file=sys.stderr)
            else:
                if result.quarantined:
                    self._report(plan, result.quarantined)
                if result.budget_stopped:
                    res = self.spec.resources
                    print(f"sdfleet: stopped at the budget: resources.budget_usd=${res.budget_usd:,.2f} at "
                          f"${res.gpu_hour_usd}/GPU-hour is spent. Committed shards are kept; rerun with a "
                          f"higher budget (--set resources.budget_usd=...) to go on.", file=sys.stderr)
        else:
            log.info("all %d shards already committed; nothing to generate", plan.num_shards)

        # 5. Finalize: sizes.json, the card and _SUCCESS, only if every planned sample has its row.
        after = survey(self.storage, job)
        if Finalizer(self.storage, job).finalize(after):
            t = after.totals()
            print(f"dataset complete: {t['ok']} images, {t['filtered']} filtered, {t['failed']} failed "
                  f"in {after.num_shards} shards at {self.storage.url()}", file=sys.stderr)
            return EXIT_OK
        print(f"dataset incomplete: {len(after.committed)}/{after.num_shards} shards committed, "
              f"{len(after.quarantined)} quarantined, {len(after.pending)} pending. "
              f"Rerun the same command to retry.", file=sys.stderr)
        return EXIT_QUARANTINED

    def _preflight(self) -> None:
        from actors.engine import ModelLoadError, check_model_source, check_scheduler_names

        names = {self.spec.model.scheduler, *self.spec.sweep.axes.get("scheduler", [])} - {None}
        try:
            check_model_source(self.spec.model)
            check_scheduler_names(sorted(names))
        except ModelLoadError as e:
            raise SpecError(str(e)) from None
        safety = self.spec.safety
        safety.check_runnable()
        if safety.model and not is_remote(safety.model) and safety.model.startswith((".", "/", "~")):
            if not Path(safety.model).expanduser().exists():
                raise SpecError(f"safety.model {safety.model} does not exist; give the detector's weights")

    def _claim_output(self, plan: Plan) -> dict[str, Any]:
        record = job_record(plan)
        if not self.storage.exists(JOB_FILE):
            self.storage.write_json(JOB_FILE, record)
            return record
        existing = self.storage.read_json(JOB_FILE)
        if existing.get("fingerprint") != plan.fingerprint:
            changed = diff_fingerprint_fields(existing.get("fingerprint_fields", {}), record["fingerprint_fields"])
            if existing.get("input_files") != record["input_files"]:
                changed.append("input files (names, sizes or row counts)")
            raise SpecError(
                f"{self.storage.url()} holds a different job (fingerprint {existing.get('fingerprint')}, "
                f"this spec {plan.fingerprint}); keys that differ: {', '.join(changed) or 'unknown'}. "
                "Write to a new output.uri, or restore the original spec to resume."
            )
        return existing

    def _report(self, plan: Plan, quarantined) -> None:
        print(f"{len(quarantined)} shard(s) quarantined after {self.spec.resources.max_attempts} attempts:",
              file=sys.stderr)
        for shard_id, task in sorted(quarantined.items()):
            last = task.errors[-1]["error"].strip().splitlines() if task.errors else ["?"]
            print(f"  {plan.shard_name(shard_id)}: {last[-1]}  (see {plan.shard_name(shard_id)}_failed.json)",
                  file=sys.stderr)

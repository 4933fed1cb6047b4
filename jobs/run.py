"""`sdfleet run`: plan, check, claim the output, dispatch, finalize."""

from __future__ import annotations

import datetime as dt
import logging
import platform
import sys
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

from sdfleet.actors.storage import Storage, is_remote
from sdfleet.jobs.finalize import Finalizer
from sdfleet.jobs.output import OutputReader
from sdfleet.jobs.plan import Planner
from sdfleet.schemas import layout
from sdfleet.schemas.errors import EXIT_INCOMPLETE, EXIT_OK, SpecError
from sdfleet.schemas.plan import Plan
from sdfleet.schemas.spec import JobSpec, diff_fingerprint_fields

log = logging.getLogger("sdfleet")

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
        self._claim_output(plan)
        reader = OutputReader(self.storage)

        # 4. Dispatch every shard that is not committed yet.
        before = reader.survey()
        pending = [int(n) for n in before.pending + list(before.quarantined)]
        if pending:
            if before.committed:
                log.info("resuming: %d shards committed, %d to do", len(before.committed), len(pending))
            from sdfleet.jobs.dispatch import Dispatcher
            from sdfleet.jobs.pool import connect_ray

            embedded = connect_ray(self.address)
            dispatcher = Dispatcher(plan, self.storage, pending, progress=self.progress, embedded=embedded,
                                    done_samples=before.committed_samples,
                                    spent_gpu_seconds=before.totals()["gpu_seconds"])
            result = dispatcher.run()
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
        finalizer = Finalizer(reader)
        if finalizer.finalize():
            after = reader.survey()
            t = after.totals()
            print(f"dataset complete: {t['ok']} images, {t['filtered']} filtered, {t['failed']} failed "
                  f"in {after.num_shards} shards at {self.storage.url()}", file=sys.stderr)
            return EXIT_OK
        after = reader.survey()
        print(f"dataset incomplete: {len(after.committed)}/{after.num_shards} shards committed, "
              f"{len(after.quarantined)} quarantined, {len(after.pending)} pending. "
              f"Rerun the same command to retry.", file=sys.stderr)
        return EXIT_INCOMPLETE

    def _preflight(self) -> None:
        from sdfleet.actors.engine import check_model_source, check_scheduler_names

        names = {self.spec.model.scheduler, *self.spec.sweep.axes.get("scheduler", [])} - {None}
        check_model_source(self.spec.model)
        check_scheduler_names(sorted(names))
        safety = self.spec.safety
        safety.check_runnable()
        if safety.model and not is_remote(safety.model) and safety.model.startswith((".", "/", "~")):
            if not Path(safety.model).expanduser().exists():
                raise SpecError(f"safety.model {safety.model} does not exist; give the detector's weights")

    def _claim_output(self, plan: Plan) -> dict[str, Any]:
        """Create `_job.json` exclusively, or resume the job it records if it is this one. Of two
        drivers starting different jobs on one new output, exactly one claims it."""
        record = job_record(plan)
        exists = self.storage.exists(layout.JOB_FILE)
        if not exists:
            self._check_unclaimed_output_is_empty()
        record["exclusive_create"] = self._probe_exclusive_create()
        if not exists:
            try:
                self.storage.write_json(layout.JOB_FILE, record, exclusive=True)
                return record
            except FileExistsError:
                pass  # another driver claimed it meanwhile: resume if it is this job, else refuse
        existing = self.storage.read_json(layout.JOB_FILE)
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

    def _check_unclaimed_output_is_empty(self) -> None:
        """An output without a job record must hold nothing: stray *.tar files there would be read
        as part of the dataset by every `*.tar` reader and by the card."""
        found = self.storage.listing()
        if layout.JOB_FILE in found:
            return  # another driver claimed it meanwhile; the claim decides
        strays = sorted(n for n in found if not layout.is_transient(n))
        if strays:
            raise SpecError(f"output.uri {self.storage.url()} holds {len(strays)} file(s) but no {layout.JOB_FILE} "
                            f"(e.g. {', '.join(strays[:5])}): it is not an sdfleet output. Give an empty or new "
                            "output.uri, or remove those files")

    def _probe_exclusive_create(self) -> bool:
        """Create one probe object twice: the second create must fail. Commits rely on it."""
        probe = f"{layout.PROBE_PREFIX}exclusive-create-{uuid.uuid4().hex}"
        self.storage.write_bytes(probe, b"first", exclusive=True)
        try:
            self.storage.write_bytes(probe, b"second", exclusive=True)
            honoured = False
        except FileExistsError:
            honoured = True
        finally:
            self.storage.delete(probe)
        if not honoured and not self.spec.output.allow_non_exclusive_commits:
            raise SpecError(
                f"{self.storage.url()} created an object that already existed (it ignores S3's If-None-Match: *), "
                "and sdfleet's commits rely on that refusal: two workers could both commit one shard. Use a "
                "store that honours conditional writes, or set output.allow_non_exclusive_commits: true to go "
                "on without that guarantee")
        if not honoured:
            log.warning("%s ignores conditional writes; going on as output.allow_non_exclusive_commits says: "
                        "two workers finishing one shard could both commit it", self.storage.url())
        return honoured

    def _report(self, plan: Plan, quarantined) -> None:
        print(f"{len(quarantined)} shard(s) quarantined after {self.spec.resources.max_attempts} attempts:",
              file=sys.stderr)
        for shard_id, task in sorted(quarantined.items()):
            last = task.errors[-1].error.strip().splitlines() if task.errors else ["?"]
            name = plan.shard_name(shard_id)
            print(f"  {name}: {last[-1]}  (see {layout.failed_file(name)})", file=sys.stderr)

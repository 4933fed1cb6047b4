"""`sdfleet run`: plan, check, claim the output, dispatch, finalize."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import platform
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from sdfleet.actors.storage import Storage, is_remote
from sdfleet.jobs.finalize import Finalizer
from sdfleet.jobs.output import OutputReader, curation_counts
from sdfleet.jobs.plan import Planner
from sdfleet.schemas import layout
from sdfleet.schemas.errors import EXIT_INCOMPLETE, EXIT_OK, SpecError
from sdfleet.schemas.plan import Plan
from sdfleet.schemas.spec import JobSpec, diff_fingerprint_fields

log = logging.getLogger("sdfleet")

# The driver refreshes its lease on the output this often; one silent for LEASE_STALE_S is taken
# for dead (a SIGKILLed driver releases nothing), so its job may be replaced if it committed nothing.
LEASE_REFRESH_S = 30.0
LEASE_STALE_S = 180.0
# Text-to-image size for a checkpoint whose configs give none: SD2-base's.
FALLBACK_SIZE = 512

_VERSIONED = (
    "sdfleet",
    "torch",
    "diffusers",
    "transformers",
    "ray",
    "pyarrow",
    "fsspec",
    "s3fs",
    "pillow",
)


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


@dataclass
class Verdict:
    """What `run` would do with its output: start a new job there, resume this job (N shards
    committed), or replace a job that committed no shard (a first run that never got going)."""

    action: str  # "start" | "resume" | "replace"
    url: str
    committed: int = 0
    num_shards: int = 0
    replaced: dict[str, Any] | None = None  # the job record a "replace" writes over
    changed: list[str] = field(
        default_factory=list
    )  # its keys that differ, with old and new values

    def describe(self) -> str:
        if self.action == "start":
            return f"start a new job in {self.url}"
        if self.action == "resume":
            return f"resume: {self.committed} of {self.num_shards} shards committed in {self.url}"
        return (
            f"replace the job recorded in {self.url} (fingerprint {self.replaced['fingerprint']}), which "
            f"committed no shard; {'; '.join(self.changed) or 'its input files differ'}"
        )


class Interrupted(Exception):
    """Ctrl-C or SIGTERM on the driver: the message says how far the job got; exit 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class DriverLease:
    """`_driver.json`: which driver runs the output's job, refreshed while it runs and released when
    it ends. A job that committed no shard may be replaced by a changed spec only once its driver
    is gone: released, or silent for LEASE_STALE_S (killed)."""

    def __init__(self, storage: Storage, job: dict[str, Any]):
        self.storage = storage
        self.job = job
        self.stop = threading.Event()

    def active(self) -> str | None:
        """Who holds the lease ("host pid N since T"), or None when nobody does."""
        try:
            lease = self.storage.read_json(layout.DRIVER_FILE)
        except FileNotFoundError:
            claimed = dt.datetime.fromisoformat(
                self.job.get("created_at", "1970-01-01T00:00:00+00:00")
            )
            fresh = (dt.datetime.now(dt.timezone.utc) - claimed).total_seconds() < LEASE_STALE_S
            return "the driver that claimed it just now" if fresh else None
        if lease.get("released") or lease.get("fingerprint") != self.job.get("fingerprint"):
            return None
        if time.time() - lease.get("updated_ts", 0) > LEASE_STALE_S:
            return None
        return f"{lease.get('host')} pid {lease.get('pid')} since {lease.get('started_at')}"

    @contextlib.contextmanager
    def held(self):
        record = {
            "fingerprint": self.job["fingerprint"],
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "released": False,
        }
        self._write(record)
        refresher = threading.Thread(target=self._refresh, args=(record,), daemon=True)
        refresher.start()
        try:
            yield
        finally:
            self.stop.set()
            refresher.join(timeout=5)
            try:
                self._write({**record, "released": True})
            except Exception as e:  # noqa: BLE001 -- the lease then goes stale, which is as good
                log.warning("could not release %s: %s", self.storage.url(layout.DRIVER_FILE), e)

    def _refresh(self, record: dict[str, Any]) -> None:
        while not self.stop.wait(LEASE_REFRESH_S):
            try:
                self._write(record)
            except Exception as e:  # noqa: BLE001 -- a missed refresh is retried at the next one
                log.warning("could not refresh %s: %s", self.storage.url(layout.DRIVER_FILE), e)

    def _write(self, record: dict[str, Any]) -> None:
        self.storage.write_json(layout.DRIVER_FILE, {**record, "updated_ts": round(time.time(), 3)})


class JobRunner:
    def __init__(
        self,
        spec: JobSpec,
        address: str | None = None,
        progress: bool = True,
        worker: type | None = None,
    ):
        """worker: the actor class that makes shards; ShardGenerator unless a benchmark swaps in
        a subclass with another engine."""
        self.spec = spec
        self.worker = worker
        self.address = address
        self.progress = progress
        self.storage = Storage(spec.output.uri, spec.output.storage_options)

    def check(self) -> tuple[Plan, Verdict]:
        """Everything `run` checks before any worker starts, writing nothing (what `sdfleet plan`
        runs): the input (by planning it), the model, the detector, and the output."""
        # 1. Plan: lists the input and reads Parquet footers; bad input is refused here.
        self._check_input_and_output_apart()
        plan = Planner(self.spec).plan()
        log.info(
            "planned %d samples in %d shards from %d input file(s)",
            plan.num_samples,
            plan.num_shards,
            len(plan.files),
        )
        # 2. The model (does it fit the task?) and the detector, before any GPU is asked for; the
        #    checkpoint's own image size where the spec gives none, so that the fingerprint,
        #    the estimate and every row name the size that is made.
        checkpoint = self._check_model_and_detector()
        plan.spec = self.spec = self._with_checkpoint_size(checkpoint)
        # 3. The output: empty, this job's, or a job that committed nothing.
        return plan, self._judge_output(plan)

    def run(self) -> int:
        plan, verdict = self.check()
        # 4. Claim the output (exclusively, for a new one), or resume it; hold its lease while running.
        self._claim_output(plan, verdict)
        with DriverLease(self.storage, {"fingerprint": plan.fingerprint}).held():
            reader = OutputReader(self.storage)
            # 5. Dispatch every shard that is not committed yet.
            before = reader.survey()
            pending = [int(n) for n in before.pending + list(before.quarantined)]
            if pending:
                if before.committed:
                    log.info(
                        "resuming: %d shards committed, %d to do",
                        len(before.committed),
                        len(pending),
                    )
                committed = self._dispatch(plan, pending, before)
                # The finalizer's survey takes these records from memory, not 100k GETs (S3).
                reader.remember(committed.values())
            else:
                log.info("all %d shards already committed; nothing to generate", plan.num_shards)
            # 6. Finalize: sizes.json, the card and _SUCCESS, only if every planned sample has its row.
            return self._finish(reader)

    def _dispatch(self, plan: Plan, pending: list[int], before) -> dict:
        """Make the pending shards; returns the stats of those committed, by shard id."""
        from sdfleet.jobs.dispatch import Dispatcher
        from sdfleet.jobs.pool import connect_ray

        embedded = connect_ray(self.address)
        dispatcher = Dispatcher(
            plan,
            self.storage,
            pending,
            progress=self.progress,
            embedded=embedded,
            done_samples=before.committed_samples,
            spent_gpu_seconds=before.totals()["gpu_seconds"],
            worker=self.worker,
        )
        with _signals_raise():
            try:
                result = dispatcher.run()
            except _Signalled as e:
                done = len(OutputReader(self.storage).survey().committed)
                raise Interrupted(
                    f"interrupted ({signal.Signals(e.signum).name}) after {done} of {plan.num_shards} "
                    "shards committed; rerun the same command to resume",
                    e.signum,
                ) from None
        if result.quarantined:
            self._report(plan, result.quarantined)
        if result.budget_stopped:
            res = self.spec.resources
            print(
                f"sdfleet: stopped at the budget: resources.budget_usd=${res.budget_usd:,.2f} at "
                f"${res.gpu_hour_usd}/GPU-hour is spent. Committed shards are kept; rerun with a "
                f"higher budget (--set resources.budget_usd=...) to go on.",
                file=sys.stderr,
            )
        return result.committed

    def _finish(self, reader: OutputReader) -> int:
        complete = Finalizer(reader).finalize()
        s = reader.survey()
        t = s.totals()
        if not complete:
            print(
                f"dataset incomplete: {len(s.committed)}/{s.num_shards} shards committed, "
                f"{len(s.quarantined)} quarantined, {len(s.pending)} pending. Rerun the same command to retry."
            )
            return EXIT_INCOMPLETE
        print(
            f"dataset complete: {t['ok']} images, {t['filtered']} filtered, {t['failed']} failed"
            f"{curation_counts(t)} "
            f"in {s.num_shards} shards at {self.storage.url()}"
        )
        if not t["images_in_tar"]:
            print(
                "warning: the dataset holds no image (every sample was filtered or failed): its tars are "
                "empty, and readers such as webdataset refuse empty tars unless told (empty_check=False)"
            )
        return EXIT_OK

    def _check_model_and_detector(self):
        from sdfleet.jobs.checkpoint import (
            check_model_source,
            check_scheduler_names,
            check_task,
            read_checkpoint,
        )

        names = {self.spec.model.scheduler, *self.spec.sweep.axes.get("scheduler", [])} - {None}
        check_model_source(self.spec.model)
        checkpoint = read_checkpoint(self.spec.model)
        check_task(self.spec.model.task, checkpoint)
        check_scheduler_names(sorted(names))
        safety = self.spec.safety
        safety.check_runnable()
        if safety.detector == "laion-clip-nsfw" and not safety.model.endswith(".safetensors"):
            raise SpecError(
                f"safety.model={safety.model} is not a .safetensors file; laion-clip-nsfw loads its head "
                "from safetensors only: convert the original once (see the README's Curation section)"
            )
        if (
            safety.model
            and not is_remote(safety.model)
            and safety.model.startswith((".", "/", "~"))
        ):
            if not Path(safety.model).expanduser().exists():
                raise SpecError(
                    f"safety.model {safety.model} does not exist; give the detector's weights"
                )
        self._check_curation_models()
        return checkpoint

    def _check_curation_models(self) -> None:
        """What the driver can see of curation.*'s models: heads are safetensors files, and local paths exist."""
        cur = self.spec.curation
        for key in ("clip_model", "aesthetic_model", "nsfw_model"):
            value = getattr(cur, key)
            if value is None:
                continue
            if key != "clip_model" and not value.endswith(".safetensors"):
                raise SpecError(
                    f"curation.{key}={value} is not a .safetensors file; sdfleet loads heads from "
                    "safetensors only: convert the original once (see the README's Curation section)"
                )
            if (
                not is_remote(value)
                and value.startswith((".", "/", "~"))
                and not Path(value).expanduser().exists()
            ):
                raise SpecError(f"curation.{key} {value} does not exist")

    def _with_checkpoint_size(self, checkpoint) -> JobSpec:
        """Text-to-image without a width or height makes the checkpoint's native size (512-base:
        512, 768-v: 768); the image tasks' sizes come from their inputs."""
        from sdfleet.schemas.tasks import TASKS

        gen = self.spec.generation
        if TASKS[self.spec.model.task].image or (gen.width is not None and gen.height is not None):
            return self.spec
        size = checkpoint.default_size or FALLBACK_SIZE
        if not checkpoint.default_size:
            log.warning(
                "model.source %s names no native size; making %dx%d (set generation.width and height)",
                checkpoint.source,
                size,
                size,
            )
        resolved = gen.model_copy(update={"width": gen.width or size, "height": gen.height or size})
        return self.spec.model_copy(update={"generation": resolved})

    def _check_input_and_output_apart(self) -> None:
        """An output inside the input folder would be read back as prompts (every *.parquet below
        it), and an input inside the output would be taken for stray files."""

        def folder(uri: str) -> str:
            uri = uri.removeprefix("file://")
            static = uri.split("*")[0].split("?")[0].split("[")[0]
            return (static.rsplit("/", 1)[0] if static != uri else uri).rstrip("/")

        inp, out = folder(self.spec.input.uri), folder(self.spec.output.uri)
        if inp == out or inp.startswith(out + "/") or out.startswith(inp + "/"):
            raise SpecError(
                f"input.uri {self.spec.input.uri} and output.uri {self.spec.output.uri} overlap: a run "
                "would read its own Parquet files as prompts. Give them separate folders"
            )

    def _judge_output(self, plan: Plan) -> Verdict:
        if not self.storage.exists(layout.JOB_FILE):
            self._check_unclaimed_output_is_empty()
            return Verdict("start", self.storage.url(), num_shards=plan.num_shards)
        existing = self.storage.read_json(layout.JOB_FILE)
        committed = len(self.storage.list(layout.STATS_GLOB))
        if existing.get("fingerprint") == plan.fingerprint:
            return Verdict("resume", self.storage.url(), committed, plan.num_shards)
        changed = _differences(existing, job_record(plan))
        if committed:
            raise SpecError(
                f"{self.storage.url()} holds a different job with {committed} committed shard(s) (fingerprint "
                f"{existing.get('fingerprint')}, this spec {plan.fingerprint}); what differs: "
                f"{'; '.join(changed) or 'unknown'}. Write to a new output.uri, or restore the original spec to resume"
            )
        active = DriverLease(self.storage, existing).active()
        if active:
            raise SpecError(
                f"{self.storage.url()} is being written by another driver ({active}) running a different "
                f"job ({'; '.join(changed) or 'other input files'}); wait for it, or write to a new output.uri. "
                f"If that driver was killed, its claim lapses {LEASE_STALE_S:.0f} s after its last refresh"
            )
        return Verdict(
            "replace", self.storage.url(), 0, plan.num_shards, replaced=existing, changed=changed
        )

    def _claim_output(self, plan: Plan, verdict: Verdict) -> None:
        """Create `_job.json` exclusively for a new job (of two drivers starting different jobs on one
        new output, exactly one claims it), or replace a job that committed nothing, or resume."""
        record = job_record(plan)
        record["exclusive_create"] = self._probe_exclusive_create()
        if verdict.action == "start":
            try:
                self.storage.write_json(layout.JOB_FILE, record, exclusive=True)
                return
            except (
                FileExistsError
            ):  # another driver claimed it this moment: it runs the job, or we resume
                verdict = self._judge_output(plan)
                if verdict.action != "resume":
                    raise SpecError(
                        f"{self.storage.url()} was claimed a moment ago by another driver running a "
                        f"different job ({'; '.join(verdict.changed)}); write to a new output.uri"
                    ) from None
        if verdict.action == "replace":
            old = verdict.replaced
            record["history"] = [
                {
                    "fingerprint": old.get("fingerprint"),
                    "created_at": old.get("created_at"),
                    "replaced_at": record["created_at"],
                    "changed": verdict.changed,
                },
                *old.get("history", []),
            ]
            self.storage.write_json(layout.JOB_FILE, record)
            print(
                f"sdfleet: {self.storage.url()} held job {old.get('fingerprint')}, which committed no shard; "
                f"it now holds this one ({'; '.join(verdict.changed) or 'other input files'})"
            )

    def _check_unclaimed_output_is_empty(self) -> None:
        """An output without a job record must hold nothing: stray *.tar files there would be read
        as part of the dataset by every `*.tar` reader and by the card."""
        found = self.storage.listing()
        if layout.JOB_FILE in found:
            return  # another driver claimed it meanwhile; the claim decides
        strays = sorted(n for n in found if not layout.is_transient(n))
        if strays:
            raise SpecError(
                f"output.uri {self.storage.url()} holds {len(strays)} file(s) but no {layout.JOB_FILE} "
                f"(e.g. {', '.join(strays[:5])}): it is not an sdfleet output. Give an empty or new "
                "output.uri, or remove those files"
            )

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
                "on without that guarantee"
            )
        if not honoured:
            log.warning(
                "%s ignores conditional writes; going on as output.allow_non_exclusive_commits says: "
                "two workers finishing one shard could both commit it",
                self.storage.url(),
            )
        return honoured

    def _report(self, plan: Plan, quarantined) -> None:
        print(
            f"{len(quarantined)} shard(s) quarantined after {self.spec.resources.max_attempts} attempts:",
            file=sys.stderr,
        )
        for shard_id, task in sorted(quarantined.items()):
            last = task.errors[-1].error.strip().splitlines() if task.errors else ["?"]
            name = plan.shard_name(shard_id)
            print(f"  {name}: {last[-1]}  (see {layout.failed_file(name)})", file=sys.stderr)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key: old -> new' for each fingerprinted key that differs between two job records."""
    before, after = old.get("fingerprint_fields", {}), new["fingerprint_fields"]
    out = [
        f"{k}: {json.dumps(before.get(k, '<unset>'))} -> {json.dumps(after.get(k, '<unset>'))}"
        for k in diff_fingerprint_fields(before, after)
    ]
    if old.get("input_files") != new["input_files"]:
        out.append("input files (names, sizes or row counts)")
    return out


class _Signalled(BaseException):
    """SIGTERM (or SIGINT) while dispatching; a BaseException so no `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_raise():
    """SIGINT and SIGTERM raise _Signalled in the main thread while the block runs; the dispatcher's
    own cleanup (releasing every actor) then runs on the way out. Outside the main thread (as in a
    test calling run() from a thread) signals stay as they are."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Signalled(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)

"""The output's lifecycle, written by one owner: the control files the driver keeps beside the data.

`OutputSink` has one hook per event, in the shape of Ray Data's `Datasink` (on_write_start, write,
on_write_failed, on_write_complete):

    judge           what the output holds: empty, this job's, or a job that committed nothing
                    (reads only; planning's last check, see `sdfleet.jobs.preflight`)
    start           claim it (`_job.json`, exclusively for a new output), probe that the store
                    refuses a second exclusive create, and hold the lease (`_driver.json`)
    shard_written   a worker committed a shard (the commit itself, `{shard}_stats.json` and the
                    files it names, is the worker's: `sdfleet.actors.writer.ShardCommit`)
    shard_failed    a shard ran out of attempts: `{shard}_failed.json`
    complete        every planned sample has its row: the results in `_job.json`, sizes.json, the
                    dataset card and, last, _SUCCESS (`Finalizer`)

`_index/` is not here: it is a cache of the stats files that any reader (`sdfleet status` too)
writes beside them (`sdfleet.jobs.output.OutputReader.survey`), not a step of the job.
File names come from `sdfleet.schemas.layout`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import platform
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from sdfleet.actors.record_versions import ChangedMeanwhile, read_versioned, replace_if_unchanged
from sdfleet.actors.storage import Storage, json_bytes
from sdfleet.actors.writer import withdraw_command
from sdfleet.jobs.finalize import dataset_card
from sdfleet.jobs.lease import LEASE_STALE_S, DriverLease
from sdfleet.jobs.output import OutputReader, Survey, missing_job_keys
from sdfleet.schemas import layout
from sdfleet.schemas.content import content_changes
from sdfleet.schemas.errors import SpecError, UserError, first_line
from sdfleet.schemas.fingerprint import diff_fingerprint_fields
from sdfleet.schemas.layout import FailedShard, JobTotals, ShardStats, UncommittedSpend
from sdfleet.schemas.plan import Plan

log = logging.getLogger("sdfleet")

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
        "content": plan.content.to_json() if plan.content is not None else None,
        "num_samples": plan.num_samples,
        "num_shards": plan.num_shards,
        "samples_per_shard": plan.samples_per_shard,
        "sweep_points": len(plan.points),
        "key_width": plan.key_width,
        "versions": {"python": platform.python_version(), **versions},
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


@dataclass(frozen=True)
class Verdict:
    """What `run` would do with its output: start a new job there, resume this job (N shards
    committed), or replace a job that committed no shard (a first run that never got going)."""

    action: str  # "start" | "resume" | "replace"
    url: str
    committed: int = 0
    num_shards: int = 0
    replaced: dict[str, Any] | None = None  # the job record a "replace" writes over
    replaced_version: str | None = None  # ... at the version it was read: replaced only at that one
    # Its keys that differ, with old and new values.
    changed: list[str] = field(default_factory=list)
    # A resume of a job recorded before sdfleet recorded content: its fingerprint has none.
    without_content: bool = False
    # The live driver already running this job ("host H, pid P, since T"): `run` is refused.
    driver: str | None = None

    def describe(self) -> str:
        if self.action == "start":
            return f"start a new job in {self.url}"
        if self.action == "resume" and self.driver:
            return f"nothing: a running driver holds {self.url} ({self.driver}); run is refused"
        if self.action == "resume":
            return f"resume: {self.committed} of {self.num_shards} shards committed in {self.url}"
        return (
            f"replace the job recorded in {self.url} (fingerprint {self.replaced['fingerprint']}), which "
            f"committed no shard; {'; '.join(self.changed) or 'its input files differ'}"
        )


class OutputSink:
    """One job's output, from its claim to _SUCCESS (see the module's docstring for the hooks)."""

    def __init__(self, storage: Storage):
        self.storage = storage
        # The finalizer's survey takes the committed records from memory, not 100k GETs (S3).
        self.reader = OutputReader(storage)

    # ------------------------------------------------------------------ before: the verdict

    def judge(self, plan: Plan) -> Verdict:
        """Empty (start), this job's (resume), or a job that committed nothing and whose driver is
        gone (replace); anything else is refused. Writes nothing."""
        try:
            data, version = read_versioned(self.storage, layout.JOB_FILE)
        except FileNotFoundError:
            self._check_unclaimed_output_is_empty()
            return Verdict("start", self.storage.url(), num_shards=plan.num_shards)
        existing = self._job_record(data)
        committed = len(self.storage.list(layout.STATS_GLOB))
        same = existing.get("fingerprint") == plan.fingerprint
        if same or (
            existing.get("content") is None
            and existing.get("fingerprint") == plan.fingerprint_without_content
        ):
            url, driver = self.storage.url(), DriverLease(self.storage, existing).running()
            return Verdict(
                "resume", url, committed, plan.num_shards, without_content=not same, driver=driver
            )
        changed = _differences(existing, job_record(plan))
        if committed:
            raise SpecError(
                f"{self.storage.url()} holds a different job with {committed} committed shard(s) (fingerprint "
                f"{existing.get('fingerprint')}, this spec {plan.fingerprint}); what differs: "
                f"{'; '.join(changed) or 'unknown'}. Write to a new output.uri, or restore what changed to resume"
            )
        active = DriverLease(self.storage, existing).active()
        if active:
            raise SpecError(
                f"{self.storage.url()} is being written by another driver ({active}) running a different "
                f"job ({'; '.join(changed) or 'other input files'}); wait for it, or write to a new output.uri. "
                f"If that driver was killed, its claim lapses {LEASE_STALE_S:.0f} s after its last refresh"
            )
        return Verdict(
            "replace",
            self.storage.url(),
            0,
            plan.num_shards,
            replaced=existing,
            replaced_version=version,
            changed=changed,
        )

    def _job_record(self, data: bytes) -> dict[str, Any]:
        """The output's `_job.json`, if sdfleet wrote it; one it did not is a foreign file like any
        other, never replaced."""
        try:
            record = json.loads(data)
        except ValueError:
            record = None
        if missing_job_keys(record):
            found = sorted(n for n in self.storage.listing() if not layout.is_transient(n))
            self._refuse_foreign(found, f"no {layout.JOB_FILE} that sdfleet wrote")
        return record

    def _check_unclaimed_output_is_empty(self) -> None:
        """An output without a job record must hold nothing: stray *.tar files there would be read
        as part of the dataset by every `*.tar` reader and by the card."""
        found = self.storage.listing()
        if layout.JOB_FILE in found:
            return  # another driver claimed it meanwhile; the claim decides
        strays = sorted(n for n in found if not layout.is_transient(n))
        if strays:
            self._refuse_foreign(strays, f"no {layout.JOB_FILE}")

    def _refuse_foreign(self, strays: list[str], lacking: str) -> None:
        raise SpecError(
            f"output.uri {self.storage.url()} holds {len(strays)} file(s) but {lacking} "
            f"(e.g. {', '.join(strays[:5])}): it is not an sdfleet output. Give an empty or new "
            "output.uri, or remove those files"
        )

    # ------------------------------------------------------------------ start

    @contextlib.contextmanager
    def start(self, plan: Plan, verdict: Verdict) -> Iterator[None]:
        """Claim the output as `verdict` says, and hold its lease while the block runs."""
        self.claim(plan, verdict)
        with DriverLease(self.storage, {"fingerprint": plan.fingerprint}).held():
            yield

    def claim(self, plan: Plan, verdict: Verdict) -> None:
        """Create `_job.json` exclusively for a new job (of two drivers starting different jobs on one
        new output, exactly one claims it), or replace a job that committed nothing, or resume."""
        record = job_record(plan)
        record["exclusive_create"] = self._probe_exclusive_create(
            plan.spec.output.allow_non_exclusive_commits
        )
        if verdict.action == "start":
            try:
                self.storage.write_json(layout.JOB_FILE, record, exclusive=True)
                return
            except (
                FileExistsError
            ):  # another driver claimed it this moment: it runs the job, or we resume
                verdict = self.judge(plan)
                if verdict.action != "resume":
                    raise SpecError(
                        f"{self.storage.url()} was claimed a moment ago by another driver running a "
                        f"different job ({'; '.join(verdict.changed)}); write to a new output.uri"
                    ) from None
        if verdict.action == "replace":
            self._replace(record, verdict)

    def _replace(self, record: dict[str, Any], verdict: Verdict) -> None:
        """Write this job's record over one that committed nothing, keeping the replaced ones' history."""
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
        try:
            replace_if_unchanged(
                self.storage, layout.JOB_FILE, json_bytes(record), verdict.replaced_version
            )
        except ChangedMeanwhile:
            raise SpecError(
                f"{self.storage.url(layout.JOB_FILE)} was replaced by another driver while this one "
                f"was replacing job {old.get('fingerprint')} there; this driver wrote nothing. Wait "
                "for that driver, or write to a new output.uri"
            ) from None
        print(
            f"sdfleet: {self.storage.url()} held job {old.get('fingerprint')}, which committed no shard; "
            f"it now holds this one ({'; '.join(verdict.changed) or 'other input files'})"
        )

    def _probe_exclusive_create(self, allow_non_exclusive: bool) -> bool:
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
        if not honoured and not allow_non_exclusive:
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

    # ------------------------------------------------------------------ shards

    def shard_written(self, stats: ShardStats) -> None:
        """A worker committed a shard: keep its record for the surveys to come."""
        self.reader.remember([stats])

    def attempts_spent(self, record: UncommittedSpend) -> None:
        """Attempts that committed nothing have used GPUs: their total, for the budget of the
        runs to come and for `status`."""
        self.storage.write_json(layout.SPENT_FILE, record.model_dump(mode="json"))

    def shard_failed(self, name: str, record: FailedShard) -> None:
        """A shard out of attempts: its errors, for the user and for `status`."""
        self.storage.write_json(layout.failed_file(name), record.model_dump(mode="json"))

    # ------------------------------------------------------------------ complete

    def complete(self) -> bool:
        """Declare the dataset complete if it is (see `Finalizer`). Returns completeness. A store's
        own error (one sdfleet has no words for, such as a 500 after every retry) ends it in one
        line too: every step before `_SUCCESS` is safe to repeat."""
        try:
            return Finalizer(self.reader).finalize()
        except UserError:
            raise
        except OSError as e:
            raise IncompleteOutput(
                f"{self.storage.url()}: the dataset could not be declared complete "
                f"({first_line(e)}); no {layout.SUCCESS_FILE} written. Rerun the same command to "
                "finish it"
            ) from e


class IncompleteOutput(UserError):
    """Committed shards that do not add up to the plan, or whose files are not the ones their stats
    describe: an output changed by something other than sdfleet."""


class Finalizer:
    """The files that declare a dataset complete: sizes.json, the dataset card and, last, _SUCCESS.

    They are written only when every planned sample has exactly one row (`OutputReader.survey`
    says which shards are committed; the Parquet footers are counted again here before anything
    is written)."""

    def __init__(self, reader: OutputReader):
        self.reader = reader
        self.storage = reader.storage

    def finalize(self) -> bool:
        """Write sizes.json, README.md and _SUCCESS if the dataset is complete. Returns completeness."""
        s = self.reader.survey(refresh=True)
        if not s.complete:
            return False
        # 1. Every committed file is its commit's (a commit whose writer died before publishing is
        #    published now), and the Parquet footers hold one row per planned sample (the survey has
        #    checked that the stats add up to the plan).
        self._check_files()
        self._check_rows(s)
        self._discard_leftovers(s)
        self._discard_stale_records()
        # 2. The results join the job record (its spec and fingerprint stay as they were), then
        #    sizes.json, the dataset card, and the marker last.
        job, t = self.reader.job, s.totals()
        self._record_results(job, t)
        self.storage.write_json(
            layout.SIZES_FILE,
            {
                layout.tar_file(n): st.images_in_tar
                for n, st in sorted(s.committed.items())
                if st.images_in_tar
            },
        )
        self._write_card(job, s, with_sheet=bool(t.images_in_tar))
        self.storage.write_bytes(layout.SUCCESS_FILE, b"")
        return True

    def _check_files(self) -> None:
        problems = self.reader.verify()
        if problems:
            details = "; ".join(
                f"shard {name}: {', '.join(found)}" for name, found in sorted(problems.items())
            )
            raise IncompleteOutput(
                f"{self.storage.url()}: committed shards whose files differ from their stats "
                f"({details}); no _SUCCESS written. Run `{withdraw_command(self.storage, sorted(problems))}`"
                ", then rerun to make them again"
            )

    def _check_rows(self, s: Survey) -> None:
        rows = self.reader.parquet_rows(sorted(s.committed))
        for name, stats in s.committed.items():
            n = rows[name]
            if n != stats.samples:
                raise IncompleteOutput(
                    f"{self.storage.url(layout.parquet_file(name))} has {n} rows but its "
                    f"stats say {stats.samples}"
                )

    def _discard_leftovers(self, s: Survey) -> None:
        """Staged files no commit refers to: writers that lost a commit or died before one."""
        referenced = {
            f.upload_id or f.temp for st in s.committed.values() for f in st.files.values()
        }
        discarded = self.storage.discard_leftovers(referenced)
        if discarded:
            log.info("discarded %d staged file(s) that no commit refers to", discarded)

    def _discard_stale_records(self) -> None:
        """Records that no longer describe this dataset: every shard is committed now, so each
        `{shard}_failed.json` is an earlier run's (of this job, or of a job it replaced), and a
        `_spent.json` another job wrote is that job's."""
        stale = self.storage.list(layout.FAILED_GLOB)
        if self.storage.exists(layout.SPENT_FILE):
            spent = self.reader.uncommitted_spend()
            if not spent.attempts and not spent.gpu_seconds:  # absent, or another job's
                stale.append(layout.SPENT_FILE)
        for name in stale:
            self.storage.delete(name)
        if stale:
            log.info("removed %d record(s) of earlier runs: %s", len(stale), ", ".join(stale))

    def _record_results(self, job: dict[str, Any], t: JobTotals) -> None:
        self.storage.write_json(
            layout.JOB_FILE,
            {
                **job,
                "results": {
                    "samples": t.samples,
                    "ok": t.ok,
                    "filtered": t.filtered,
                    "failed": t.failed,
                    **{k: t.count(k) for k in ("rejected", "duplicate", "skipped") if t.count(k)},
                    "safety": {
                        "detector": job["spec"]["safety"]["detector"],
                        "model_sha256": t.safety_model_sha256,
                        "flagged": t.flagged,
                        "flagged_by_class": t.flagged_by_class,
                        "action": job["spec"]["safety"]["action"],
                    },
                    "gpu_seconds": t.gpu_seconds,
                },
            },
        )

    def _write_card(self, job: dict[str, Any], s: Survey, with_sheet: bool) -> None:
        """README.md, with a small contact sheet of the images when the tars hold any."""
        sheet = None
        if with_sheet:
            from sdfleet.jobs.preview import small_contact_sheet

            sheet = layout.CARD_SHEET
            self.storage.write_bytes(sheet, small_contact_sheet(self.reader))
        self.storage.write_bytes(layout.CARD_FILE, dataset_card(job, s, sheet).encode())


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key: old -> new' for each fingerprinted key that differs between two job records."""
    before, after = old.get("fingerprint_fields", {}), new["fingerprint_fields"]
    out = [
        f"{k}: {json.dumps(before.get(k, '<unset>'))} -> {json.dumps(after.get(k, '<unset>'))}"
        for k in diff_fingerprint_fields(before, after)
    ]
    if old.get("input_files") != new["input_files"]:
        out.append("input files (names, sizes or row counts)")
    return out + content_changes(old.get("content"), new["content"])

"""`sdfleet run`: pre-flight, claim the output, dispatch, complete.

Each step has its owner: `sdfleet.jobs.preflight` plans and checks (and hands over a finished
plan), `sdfleet.jobs.sink` keeps the output's control files, `sdfleet.jobs.dispatch` decides which
shard runs where, and `sdfleet.jobs.pool` runs them on Ray. This module strings them together and
tells the user how it went.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sdfleet.actors.storage import Storage
from sdfleet.jobs.interrupts import WATCH
from sdfleet.jobs.lease import running_refusal
from sdfleet.jobs.output import Survey, curation_counts
from sdfleet.jobs.preflight import Preflight
from sdfleet.jobs.sink import OutputSink
from sdfleet.schemas import layout
from sdfleet.schemas.errors import EXIT_INCOMPLETE, EXIT_OK
from sdfleet.schemas.plan import Plan
from sdfleet.schemas.spec import JobSpec

if TYPE_CHECKING:
    from sdfleet.jobs.dispatch import Dispatcher

log = logging.getLogger("sdfleet")


@dataclass
class Progress:
    """How far this run got, for the line an interrupt prints: shards committed before it, and
    those its dispatcher has heard of since."""

    num_shards: int
    committed_before: int
    dispatcher: Dispatcher | None = None
    complete: bool = False

    def describe(self) -> str:
        since = len(self.dispatcher.result.committed) if self.dispatcher is not None else 0
        committed = min(self.committed_before + since, self.num_shards)
        whole = " (the dataset is complete)" if self.complete else ""
        return f"after {committed} of {self.num_shards} shards committed{whole}"


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

    def run(self) -> int:
        stop = WATCH  # Ctrl-C and SIGTERM: where they may raise, and how far the line says we got
        # 1. Pre-flight: plan, check the model, the detector and the output; nothing is written.
        #    Its plan is final: nothing below changes it.
        checked = Preflight(self.spec).check()
        plan = checked.plan
        sink = OutputSink(Storage(plan.spec.output.uri, plan.spec.output.storage_options))
        if checked.verdict.driver:  # one live driver per output: this run would redo its work
            raise running_refusal(checked.verdict.url, checked.verdict.driver)
        stop.progress = lambda: (
            f"before the job started, {checked.verdict.committed} of {plan.num_shards} shards "
            "committed"
        )
        stop.check()  # a signal a library swallowed while it raised
        with contextlib.ExitStack() as held:
            # 2. Claim the output (exclusively, for a new one), or resume it; hold its lease while
            #    running. Not cut half-way by a signal: the lease is released on the way out.
            with stop.deferred():
                held.enter_context(sink.start(plan, checked.verdict))
            # 3. Dispatch every shard that is not committed yet.
            before = sink.reader.survey()
            done = Progress(plan.num_shards, len(before.committed))
            stop.progress = done.describe
            pending = [int(n) for n in before.pending + list(before.quarantined)]
            if pending:
                if before.committed:
                    log.info(
                        "resuming: %d shards committed, %d to do",
                        len(before.committed),
                        len(pending),
                    )
                self._dispatch(plan, sink, pending, before, done)
            else:
                log.info("all %d shards already committed; nothing to generate", plan.num_shards)
            # 4. Complete: sizes.json, the card and _SUCCESS, only if every planned sample has its
            #    row; written whole, a signal meanwhile stops the job after it.
            with stop.deferred():
                done.complete = sink.complete()
            return self._report_outcome(done.complete, sink)

    def _dispatch(
        self, plan: Plan, sink: OutputSink, pending: list[int], before: Survey, done: Progress
    ) -> None:
        """Make the pending shards; the sink hears of each one committed or quarantined. Ray's
        calls run with signals deferred: the dispatcher stops at its next poll and releases every
        actor, and the signal is raised after."""
        from sdfleet.jobs.dispatch import Dispatcher
        from sdfleet.jobs.pool import ActorPool, connect_ray

        stop = WATCH
        with stop.ray_init():
            embedded = connect_ray(self.address)
        with stop.deferred():
            dispatcher = Dispatcher(
                plan,
                sink,
                ActorPool(plan, embedded, self.worker),
                pending,
                progress=self.progress,
                done_samples=before.committed_samples,
                spent_gpu_seconds=before.totals().gpu_seconds,
                uncommitted=sink.reader.uncommitted_spend(),
                stopping=lambda: stop.pending,
            )
            done.dispatcher = dispatcher
            result = dispatcher.run()
        if result.quarantined:
            self._report_quarantined(plan, result.quarantined)
        if result.budget_stopped:
            res = plan.spec.resources
            print(
                f"sdfleet: stopped at the budget: resources.budget_usd=${res.budget_usd:,.2f} at "
                f"${res.gpu_hour_usd}/GPU-hour is spent (every attempt counts, committed or not). "
                f"Committed shards are kept; rerun with a higher budget "
                f"(--set resources.budget_usd=...) to go on.",
                file=sys.stderr,
            )

    def _report_outcome(self, complete: bool, sink: OutputSink) -> int:
        s = sink.reader.survey()
        t = s.totals()
        if not complete:
            print(
                f"dataset incomplete: {len(s.committed)}/{s.num_shards} shards committed, "
                f"{len(s.quarantined)} quarantined, {len(s.pending)} pending. Rerun the same command to retry."
            )
            return EXIT_INCOMPLETE
        print(
            f"dataset complete: {t.ok} images, {t.filtered} filtered, {t.failed} failed"
            f"{curation_counts(t)} "
            f"in {s.num_shards} shards at {sink.storage.url()}"
        )
        if not t.images_in_tar:
            print(
                "warning: the dataset holds no image (every sample was filtered, rejected or failed): "
                "it has no tar, only each shard's rows in its Parquet file"
            )
        return EXIT_OK

    def _report_quarantined(self, plan: Plan, quarantined) -> None:
        print(
            f"{len(quarantined)} shard(s) quarantined after {plan.spec.resources.max_attempts} attempts:",
            file=sys.stderr,
        )
        for shard_id, task in sorted(quarantined.items()):
            last = task.errors[-1].error.strip().splitlines() if task.errors else ["?"]
            name = plan.shard_name(shard_id)
            print(f"  {name}: {last[-1]}  (see {layout.failed_file(name)})", file=sys.stderr)

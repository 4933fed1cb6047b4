"""The `sdfleet` command. It only parses arguments and loads the spec; heavy imports wait until needed."""

from __future__ import annotations

import argparse
import gc
import logging
import sys

from sdfleet.schemas.errors import (
    EXIT_BUSY,
    EXIT_INCOMPLETE,
    EXIT_OK,
    EXIT_REFUSED,
    DriverRunning,
    UserError,
)

log = logging.getLogger("sdfleet")


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="job spec (YAML)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec key, e.g. --set generation.guidance_scale=5 (repeatable)",
    )


EXIT_CODES = """exit codes:
  0    done: the dataset is complete (or the command did what it was asked)
  1    refused: a bad spec, input, model, detector or storage; the one line on stderr says what to fix
  2    incomplete: shards failed max_attempts times, or the budget ran out; rerun the same command
  3    busy: another driver is running this output's job (the line names its host, pid and start)
  130  interrupted by Ctrl-C (143 by SIGTERM); rerun the same command to resume"""

OUTPUT_HELP = "output folder or s3:// prefix, or the job's spec file (then its output.uri and storage_options)"


def build_parser() -> argparse.ArgumentParser:
    from importlib import metadata

    parser = argparse.ArgumentParser(
        prog="sdfleet",
        description="Prompts in Parquet -> image dataset, on Ray.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="debug logs from sdfleet and its libraries, and tracebacks with errors; -vv adds "
        "botocore's requests and response bodies (credentials masked in both)",
    )
    parser.add_argument(
        "--version", action="version", version=f"sdfleet {metadata.version('sdfleet')}"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run (or resume) a job")
    _spec_args(p)
    p.add_argument(
        "--address", help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser(
        "plan",
        help="check everything run checks and show shards, samples, cost and what run "
        "would do; starts nothing",
    )
    _spec_args(p)

    p = sub.add_parser("status", help="committed, pending and quarantined shards of an output")
    p.add_argument("output", help=OUTPUT_HELP)
    p.add_argument(
        "--verify",
        action="store_true",
        help="also read every committed file and compare its sha256 with its commit (sizes are always checked)",
    )

    p = sub.add_parser(
        "withdraw",
        help="take back the commits of shards whose files are missing or changed and can no "
        "longer be published (status names them), so a rerun makes them again; refuses good shards",
    )
    p.add_argument("output", help=OUTPUT_HELP)
    p.add_argument("shards", nargs="+", metavar="SHARD", help="shard names, e.g. 00003")

    p = sub.add_parser("demo", help="tiny models, sample prompts, local Ray, a local dataset")
    p.add_argument(
        "dir", nargs="?", default="sdfleet-demo", help="working folder (default: ./sdfleet-demo)"
    )

    from sdfleet.jobs import dedup, preview, score

    preview.add_arguments(
        sub.add_parser("preview", help="contact sheet, X/Y grid or HTML gallery of an output")
    )
    score.add_arguments(
        sub.add_parser("score", help="CLIP score per image and FID per sweep point of an output")
    )
    dedup.add_arguments(
        sub.add_parser(
            "dedup",
            help="flag near-duplicate images across the whole output, and images too close to "
            "an evaluation set, from its saved CLIP embeddings",
        )
    )

    p = sub.add_parser(
        "tiny-models",
        help="write the tiny random-weight pipelines (SD2, SDXL, SD3.5, FLUX.1) and safety "
        "detectors",
    )
    p.add_argument("dir", help="folder to write into")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command. Ctrl-C and SIGTERM, whenever they come, end it in one line saying how far the
    job got and exit 128 + the signal (`sdfleet.jobs.interrupts`); exit 1 stays a refusal."""
    from sdfleet.jobs.interrupts import WATCH, Interrupt

    with WATCH.handling(whole_process=argv is None, leave=_leave_ray):
        try:
            try:
                return _main(argv)
            finally:
                # From here on a signal changes nothing (one that comes before this line is
                # still the interrupt below).
                WATCH.decided()
                # Free Arrow objects while the interpreter is whole: left to its teardown (in a
                # traceback cycle, or a plan's schema), Arrow's threads can abort the process
                # ("terminate called without an active exception") after the work is done,
                # seen once under `ray job submit`.
                gc.collect()
        except BaseException as e:
            # An error raised while a signal is pending is the stop's doing (Ray's calls, a
            # library cut half-way), not a refusal or a bug: it ends as the interrupt it is.
            if not (WATCH.pending or isinstance(e, KeyboardInterrupt)):
                raise
            if not isinstance(e, Interrupt):
                log.debug("raised while stopping", exc_info=e)
            _leave_ray()  # its workers' forwarded log lines stop: the line below is the last
            print(f"sdfleet: {WATCH.line()}", file=sys.stderr)
            return WATCH.exit_code


def _leave_ray() -> None:
    if "ray" in sys.modules:  # no import of Ray (seconds) to leave a Ray never joined
        from sdfleet.jobs.pool import disconnect_ray

        disconnect_ray()


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    from sdfleet.actors.logs import configure_logging, mask_streams

    configure_logging(args.verbose)
    mask_streams()
    try:
        return _dispatch(args)
    except Exception as e:  # noqa: BLE001 -- every error becomes one line (a traceback with -v)
        return _refuse(e, args.verbose)


def _refuse(e: Exception, verbose: int) -> int:
    """The one error policy: a failure the user can fix is one line (the value or URI and what to
    do) and exit 1, with the traceback only under -v. Anything else is a bug and keeps its traceback."""
    from sdfleet.actors.storage_errors import storage_error

    error = e if isinstance(e, UserError) else storage_error(e, "storage")
    if error is None:
        raise e
    if verbose:
        log.error("traceback of the error below", exc_info=e)
    print(f"sdfleet: error: {error}", file=sys.stderr)
    code = EXIT_BUSY if isinstance(error, DriverRunning) else EXIT_REFUSED
    del e, error  # the failed call's frames hold Arrow objects: let main's gc.collect free them
    return code


def _load(args):
    """The spec, with its storage_options' secrets masked in every log record from now on."""
    from sdfleet.actors.logs import remember_secrets
    from sdfleet.schemas.spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    for options in spec.storage_options():
        remember_secrets(options)
    return spec


def _dispatch(args) -> int:
    if args.command == "plan":
        return _plan(_load(args))
    if args.command == "run":
        from sdfleet.jobs.run import JobRunner

        return JobRunner(_load(args), address=args.address, progress=not args.no_progress).run()
    if args.command in ("status", "preview", "score", "dedup", "withdraw"):
        args.output, args.storage_options = _output_location(args.output)
    if args.command == "status":
        return _status(args.output, args.storage_options, args.verify)
    if args.command == "withdraw":
        from sdfleet.jobs.output import OutputReader
        from sdfleet.jobs.withdraw import withdraw

        for line in withdraw(OutputReader.open(args.output, args.storage_options), args.shards):
            print(line)
        print("rerun the job to make them again")
        return EXIT_OK
    if args.command == "demo":
        from sdfleet.jobs.demo import run_demo

        return run_demo(args.dir)
    if args.command == "preview":
        from sdfleet.jobs.preview import command

        return command(args)
    if args.command == "score":
        from sdfleet.jobs.score import command

        return command(args)
    if args.command == "dedup":
        from sdfleet.jobs.dedup import command

        return command(args)
    if args.command == "tiny-models":
        from sdfleet.jobs.tiny import write_tiny_models

        for what, path in write_tiny_models(args.dir).items():
            print(f"{what:16} {path}")
        return EXIT_OK
    raise AssertionError(args.command)


def _plan(spec) -> int:
    from sdfleet.jobs.image_flops import measure_inputs
    from sdfleet.jobs.plan import estimate
    from sdfleet.jobs.preflight import Preflight
    from sdfleet.schemas.families import DEFAULT_FAMILY, family_of
    from sdfleet.schemas.loading import resolved_locations

    checked = Preflight(spec).check()
    plan, verdict = checked.plan, checked.verdict
    # The checkpoint's family, by the pipeline class pre-flight read from its model_index.json.
    pipeline_class = checked.pipeline_class
    family = family_of(pipeline_class)
    # Costed as the checkpoint's variant (SD3.5 Large, FLUX.1-schnell) where it has one.
    variant = checked.variant
    if family is not None:
        family = family.costed_as(variant)
    measured = measure_inputs(plan, family or DEFAULT_FAMILY)
    est = estimate(plan, family or DEFAULT_FAMILY, measured)
    axes = " x ".join(f"{k}[{len(v)}]" for k, v in spec.sweep.axes.items())
    seeds = spec.sweep.num_seeds() * spec.curation.candidates
    print(f"job           {spec.name}")
    print(f"input files   {len(plan.files)} ({plan.num_rows} prompt rows)")
    print(
        f"sweep         {len(plan.points)} points per prompt ({seeds} {'candidate ' if spec.curation.best_of_n else ''}seed(s){' x ' + axes if axes else ''})"
    )
    print(f"samples       {plan.num_samples}")
    print(f"shards        {plan.num_shards} of up to {plan.samples_per_shard} samples")
    # Where every path resolved (spec-file values against its folder, --set against the cwd).
    for key, value in resolved_locations(spec).items():
        print(f"{'location':14}{key:25}{value}")
    print(
        f"family        {est['family']} ({pipeline_class}"
        + (f", {variant.name} by its {family.denoiser} config)" if variant else ")")
        if family
        else f"family        unknown ({pipeline_class}): estimated as {est['family']}"
    )
    if spec.model.refiner:
        refiner = spec.model.refiner
        print(
            f"refiner       {refiner.source} ({checked.refiner_class}) from denoising_start "
            f"{refiner.denoising_start}"
        )
    cur = spec.curation
    # With best-of-N a prompt generates k to m of its m candidate slots: every figure is a range.
    k, m = (cur.images_per_prompt, cur.candidates) if cur.best_of_n else (None, None)
    if cur.best_of_n:
        per_prompt = len(plan.points) // m
        print(
            f"candidates    {m} slots per prompt and sweep point (curation.max_candidates), "
            f"{plan.num_rows * per_prompt * k} images kept at most ({k} per prompt and point)"
        )

    _print_estimate(spec, est, family, k, m, measured)
    if plan.duplicate_rows:
        print(
            f"warning       {len(plan.duplicate_rows)} row(s) repeat an earlier prompt id; they will be recorded failed"
        )
    print(f"fingerprint   {plan.fingerprint}")
    if verdict.driver:
        print(f"driver        running: {verdict.driver}")
    print(f"run would     {verdict.describe()}")
    return EXIT_OK


def _print_estimate(spec, est: dict, family, k: int | None, m: int | None, measured=None) -> None:
    """`plan`'s compute, per-image, GPU-hour and cost lines; with best-of-N (k of m candidates
    per prompt) each figure is a range."""
    from sdfleet.schemas.families import DEFAULT_FAMILY
    from sdfleet.schemas.tasks import TASKS

    def span(low, high, fmt):
        return fmt.format(high) if low == high else f"{fmt.format(low)} … {fmt.format(high)}"

    print(
        f"compute       {span(est['tflop_min'], est['tflop'], '{:,.0f}')} TFLOP"
        + (f" ({k} … {m} candidates per prompt)" if k else "")
    )
    print(
        f"per image     {span(est['tflop_per_image_min'], est['tflop_per_image_max'], '{:.4g}')} "
        + (
            "TFLOP (base to denoising_end, refiner from denoising_start, both checkpoints' text "
            "encoders, one VAE decode)"
            if spec.model.refiner
            else "TFLOP (denoiser steps, VAE decode, text encoders)"
        )
    )
    if measured is not None:
        print(
            f"task          {spec.model.task}: each image counted at its input's size (x"
            f"{TASKS[spec.model.task].scale}), from the first shard's {len(measured.input_sizes)} "
            f"inputs: {measured.sizes_text()}"
        )
    elif TASKS[spec.model.task].image:
        fallback = (family or DEFAULT_FAMILY).fallback_size
        print(
            f"task          {spec.model.task}: each image's size comes from its input, so the compute and "
            f"GPU-hours here count {est['family']} at {fallback}² per image"
        )
    print(
        f"estimate      {span(est['gpu_hours_min'], est['gpu_hours'], '{:,.2f}')} GPU-hours at "
        f"{est['sustained_tflops']:.0f} TFLOP/s sustained ({est['throughput_source']})"
    )
    if est["cost_usd"] is not None:
        budget = spec.resources.budget_usd
        print(
            f"cost          {span(est['cost_usd_min'], est['cost_usd'], '${:,.2f}')} at "
            f"${spec.resources.gpu_hour_usd}/GPU-hour"
            + (f" (budget ${budget:,.2f})" if budget is not None else "")
        )
        if budget is not None and budget < est["cost_usd"]:
            print(
                f"warning       the budget is under the {'most' if k else 'estimated'} cost: the job may stop "
                "with shards not made (rerun with a higher resources.budget_usd to go on)"
            )
    else:
        print("cost          set resources.gpu_hour_usd for a cost estimate")


def _output_location(argument: str) -> tuple[str, dict]:
    """An OUTPUT argument: a folder or prefix as given, or a spec file, whose output.uri and
    storage_options (with its secrets masked in logs) are used."""
    from pathlib import Path

    if argument.endswith((".yaml", ".yml")) and Path(argument).is_file():
        from sdfleet.actors.logs import remember_secrets
        from sdfleet.schemas.spec import load_spec

        spec = load_spec(argument)
        remember_secrets(spec.output.storage_options)
        return spec.output.uri, spec.output.storage_options
    return argument, {}


def _status(output: str, storage_options: dict, verify: bool = False) -> int:
    from sdfleet.jobs.lease import DriverLease
    from sdfleet.jobs.output import OutputReader, curation_counts
    from sdfleet.schemas import layout

    reader = OutputReader.open(output, storage_options)
    s = reader.survey()
    t = s.totals()
    print(f"output       {reader.storage.url()}")
    print(f"job          {reader.name} (fingerprint {reader.job['fingerprint']})")
    driver = DriverLease(reader.storage, reader.job).running()
    print(f"driver       {'running: ' + driver if driver else 'none running'}")
    print(
        f"shards       {len(s.committed)} committed, {len(s.pending)} pending, {len(s.quarantined)} quarantined "
        f"of {s.num_shards}"
    )
    print(
        f"samples      {s.committed_samples}/{s.num_samples} with rows: {t.ok} ok, {t.filtered} filtered, "
        f"{t.failed} failed{curation_counts(t)}"
    )
    for name, failed in sorted(s.quarantined.items()):
        print(f"  quarantined {name}: {failed.last_error_line()}")
    _print_spend(reader.job, t.gpu_seconds, reader.uncommitted_spend())
    problems = reader.verify(deep=verify)
    print(
        f"files        {'differ from their commits in ' + str(len(problems)) + ' shard(s)' if problems else 'as committed'}"
        f" ({'sha256' if verify else 'sizes'} checked)"
    )
    for name, found in sorted(problems.items()):
        print(f"  shard {name}: {'; '.join(found)}")
    if problems:
        from sdfleet.actors.writer import withdraw_command

        print(
            f"  to make them again: {withdraw_command(reader.storage, sorted(problems))}, then rerun"
        )
    complete = s.complete and not problems and reader.storage.exists(layout.SUCCESS_FILE)
    print(f"complete     {'yes' if complete else 'no'}")
    return EXIT_OK if complete else EXIT_INCOMPLETE


def _print_spend(job: dict, committed_s: float, uncommitted) -> None:
    """GPU time spent by every attempt vs in committed shards, in dollars where priced."""
    spent_s = committed_s + uncommitted.gpu_seconds
    price = job["spec"].get("resources", {}).get("gpu_hour_usd")

    def amount(seconds: float) -> str:
        return f"{seconds:.1f} GPU-s" + (f" (${seconds / 3600 * price:,.2f})" if price else "")

    print(
        f"gpu time     {amount(spent_s)} spent, {amount(committed_s)} in committed shards; "
        f"{amount(uncommitted.gpu_seconds)} in {uncommitted.attempts} attempt(s) that committed "
        "nothing"
    )


if __name__ == "__main__":
    sys.exit(main())

"""The `sdfleet` command. It only parses arguments and loads the spec; heavy imports wait until needed."""

from __future__ import annotations

import argparse
import logging
import sys

from jobs.preview import PreviewError
from schemas.spec import SpecError, load_spec


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="job spec (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec key, e.g. --set generation.guidance_scale=5 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdfleet", description="Prompts in Parquet -> image dataset, on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run (or resume) a job")
    _spec_args(p)
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("plan", help="show shards, samples and an estimate; starts nothing")
    _spec_args(p)

    p = sub.add_parser("status", help="committed, pending and quarantined shards of an output")
    p.add_argument("output", help="output folder or s3:// prefix")

    p = sub.add_parser("demo", help="tiny models, sample prompts, local Ray, a local dataset")
    p.add_argument("dir", nargs="?", default="sdfleet-demo", help="working folder (default: ./sdfleet-demo)")

    from jobs.preview import add_preview_arguments
    from jobs.score import add_arguments as add_score_arguments

    add_preview_arguments(sub.add_parser("preview", help="contact sheet, X/Y grid or HTML gallery of an output"))

    add_score_arguments(sub.add_parser("score", help="CLIP score per image and FID per sweep point of an output"))

    p = sub.add_parser("tiny-models", help="write the tiny random-weight pipeline and safety detectors")
    p.add_argument("dir", help="folder to write into")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return _dispatch(args)
    except (SpecError, PreviewError, PermissionError, FileNotFoundError) as e:
        # Refused before any work: a bad spec, bad input, or storage the driver cannot reach.
        print(f"sdfleet: error: {e}", file=sys.stderr)
        from jobs.preview import _collect

        return _collect(1)


def _dispatch(args) -> int:
    if args.command == "plan":
        return _plan(load_spec(args.spec, args.overrides))
    if args.command == "run":
        from jobs.run import JobRunner

        spec = load_spec(args.spec, args.overrides)
        return JobRunner(spec, address=args.address, progress=not args.no_progress).run()
    if args.command == "status":
        return _status(args.output)
    if args.command == "demo":
        from jobs.demo import run_demo

        return run_demo(args.dir)
    if args.command == "preview":
        from jobs.preview import run_preview

        run_preview(args.output, args.out, args.grid, args.prompt_id, args.html, args.show_filtered, args.limit)
        return 0
    if args.command == "score":
        from jobs.score import score_from_args

        return score_from_args(args)
    if args.command == "tiny-models":
        from actors.tiny import write_tiny_models

        for what, path in write_tiny_models(args.dir).items():
            print(f"{what:14} {path}")
        return 0
    raise AssertionError(args.command)


def _plan(spec) -> int:
    from jobs.plan import Planner

    plan = Planner(spec).plan()
    est = plan.estimate()
    axes = " x ".join(f"{k}[{len(v)}]" for k, v in spec.sweep.axes.items())
    seeds = spec.sweep.num_seeds()
    print(f"job           {spec.name}")
    print(f"input files   {len(plan.files)} ({plan.num_rows} prompt rows)")
    print(f"sweep         {len(plan.points)} points per prompt ({seeds} seed(s){' x ' + axes if axes else ''})")
    print(f"samples       {plan.num_samples}")
    print(f"shards        {plan.num_shards} of up to {plan.samples_per_shard} samples")
    print(f"compute       {est['tflop']:,.0f} TFLOP")
    print(f"estimate      {est['gpu_hours']:,.2f} GPU-hours at {est['sustained_tflops']:.0f} TFLOP/s sustained "
          f"({est['throughput_source']})")
    if est["cost_usd"] is not None:
        budget = spec.resources.budget_usd
        print(f"cost          ${est['cost_usd']:,.2f} at ${spec.resources.gpu_hour_usd}/GPU-hour"
              + (f" (budget ${budget:,.2f})" if budget is not None else ""))
    else:
        print("cost          set resources.gpu_hour_usd for a cost estimate")
    if plan.duplicate_rows:
        print(f"warning       {len(plan.duplicate_rows)} row(s) repeat an earlier prompt id; they will be recorded failed")
    print(f"fingerprint   {plan.fingerprint}")
    return 0


def _status(output: str) -> int:
    from actors.storage import Storage
    from jobs.finalize import JOB_FILE, SUCCESS_FILE, survey

    storage = Storage(output)
    if not storage.exists(JOB_FILE):
        raise SpecError(f"{output} has no {JOB_FILE}: it is not an sdfleet output (or the job never started)")
    job = storage.read_json(JOB_FILE)
    s = survey(storage, job)
    t = s.totals()
    print(f"output       {storage.url()}")
    print(f"job          {job['spec']['name']} (fingerprint {job['fingerprint']})")
    print(f"shards       {len(s.committed)} committed, {len(s.pending)} pending, {len(s.quarantined)} quarantined "
          f"of {s.num_shards}")
    print(f"samples      {s.committed_samples}/{s.num_samples} with rows: {t['ok']} ok, {t['filtered']} filtered, "
          f"{t['failed']} failed")
    for name, failed in sorted(s.quarantined.items()):
        last = failed["errors"][-1]["error"].strip().splitlines()[-1] if failed.get("errors") else "?"
        print(f"  quarantined {name}: {last}")
    complete = s.complete and storage.exists(SUCCESS_FILE)
    print(f"complete     {'yes' if complete else 'no'}")
    return 0 if complete else 2


if __name__ == "__main__":
    sys.exit(main())

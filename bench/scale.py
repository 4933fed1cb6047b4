"""The driver at fleet scale: its CPU per shard, planning 100M prompts, and reading huge outputs.

    .venv/bin/python bench/scale.py [--workers 2 4 8] [--shards 400] [--plan-rows 100000000]
                                    [--outputs 10000 100000] [--s3-outputs 10000] [--work DIR]

1. Driver CPU per committed shard: `sdfleet run`'s driver in this process, a null engine (images
   at once, bench/synthetic.py) in N Ray GPU actors (logical GPUs), tiny shards (2 samples, 64²,
   JPEG, no detector) read from and committed to moto's S3 server over HTTP. CPU is the driver
   process's own (getrusage), over the span from its first to its last commit; peak RSS likewise.
   One core at 10 ms per shard feeds 100 shards/s: 1,000 GPUs committing a 1,000-sample shard
   every 84 s (11.9 images/s each) need 12.
2. Planning 100M prompts (bench/plan.py's input: unique ids, 10 files): time and peak RSS.
3. Outputs of 10k and 100k committed shards in a local folder and 10k on moto, made by cloning
   one real shard (the real writer's files and stats): `sdfleet status`, the resume listing
   (`OutputReader.survey`, what `run` reads before it dispatches) and the finalizer, each in a
   fresh process, with its time and peak RSS. S3 at 100k is projected from 10k (said so).

The last line printed is one JSON object of all figures (keys in the README).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from plan import PEAK_RSS, PLAN_CODE, write_input  # noqa: E402  (bench/ is on the path now)

LINKS_PER_COPY = 50_000
TARGETS = {"driver_cpu_ms_per_shard": 10.0, "plan_100m_peak_gb": 2.0, "status_100k_s": 60.0}


# ------------------------------------------------------------------ 1. the driver


def drive(args, work: Path, s3, workers: int) -> dict:
    """One job of `args.shards` tiny shards on `workers` null-engine actors; the driver's own CPU."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from sdfleet.actors.storage import Storage
    from sdfleet.jobs.run import JobRunner
    from sdfleet.schemas import layout
    from sdfleet.schemas.layout import ShardStats
    from sdfleet.schemas.spec import parse_spec
    from synthetic import register_for_ray, synthetic_worker

    per_shard = 2
    n = args.shards * per_shard
    prefix = f"{args.bucket}/drive-{workers}"
    with s3.open(f"{prefix}/prompts/p.parquet", "wb") as f:
        pq.write_table(
            pa.table(
                {
                    "prompt_id": [f"p{i}" for i in range(n)],
                    "prompt": [f"a small photo number {i}" for i in range(n)],
                }
            ),
            f,
            row_group_size=64,
        )
    (work / "model").exists() or _tiny_model(work / "model")
    out = f"s3://{prefix}/out"
    spec = parse_spec(
        {
            "name": f"scale-{workers}",
            "model": {"source": str(work / "model")},
            "input": {"uri": f"s3://{prefix}/prompts/"},
            "generation": {"num_inference_steps": 2, "width": 64, "height": 64},
            "output": {"uri": out, "samples_per_shard": per_shard},
            "safety": {"detector": "none"},
            "resources": {
                "batch_size": 2,
                "max_workers": workers,
                "gpus_per_worker": 1,
                "max_attempts": 2,
            },
        }
    )
    ray.init(
        num_cpus=os.cpu_count(),
        num_gpus=workers,
        include_dashboard=False,
        logging_level="WARNING",
        _temp_dir=tempfile.mkdtemp(prefix="sdf-sc-", dir="/tmp"),
    )
    register_for_ray()
    samples = []
    stop = threading.Event()

    def sample():  # the driver's own CPU (all its threads, Ray's core worker included), 4 times a second
        while not stop.is_set():
            usage = resource.getrusage(resource.RUSAGE_SELF)
            samples.append((time.time(), usage.ru_utime + usage.ru_stime))
            stop.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        code = JobRunner(spec, progress=False, worker=synthetic_worker(None)).run()
    finally:
        stop.set()
        sampler.join()
        ray.shutdown()
    if code != 0:
        sys.exit(f"the scale job with {workers} workers exited {code}")
    storage = Storage(out)
    stats = sorted(
        (
            ShardStats.model_validate(storage.read_json(name))
            for name in storage.list(layout.STATS_GLOB)
        ),
        key=lambda s: s.finished_ts,
    )
    # Steady state: from the commit of the first 10% of shards to the last commit.
    start, end = stats[len(stats) // 10].finished_ts, stats[-1].finished_ts
    committed = sum(1 for s in stats if start < s.finished_ts <= end)
    a = min(samples, key=lambda s: abs(s[0] - start))
    b = min(samples, key=lambda s: abs(s[0] - end))
    # Per second too: if the driver's CPU is a background cost per second rather than per shard,
    # this stays flat while shards/s changes, and a faster fleet pays less per shard.
    return {
        "workers": workers,
        "shards": len(stats),
        "shards_per_s": round(committed / (end - start), 2),
        "driver_cpu_ms_per_shard": round(1000 * (b[1] - a[1]) / committed, 3),
        "driver_cpu_ms_per_s": round(1000 * (b[1] - a[1]) / (b[0] - a[0]), 1),
    }


def wait_cost(in_flight: int = 2000) -> float:
    """CPU ms of the one driver step whose cost grows with the fleet: `ray.wait` over every call in
    flight (1,000 GPUs x 2 shards each), here on real calls that are queued and never run."""
    import ray

    ray.init(
        num_cpus=1,
        include_dashboard=False,
        logging_level="WARNING",
        _temp_dir=tempfile.mkdtemp(prefix="sdf-sw-", dir="/tmp"),
    )
    try:

        @ray.remote(num_cpus=1)
        def held() -> None:
            time.sleep(3600)

        refs = [held.remote() for _ in range(in_flight)]
        time.sleep(1)
        t0, calls = time.process_time(), 200
        for _ in range(calls):
            ray.wait(refs, num_returns=1, timeout=0)
        return round(1000 * (time.process_time() - t0) / calls, 3)
    finally:
        ray.shutdown()


def _tiny_model(path: Path) -> None:
    from sdfleet.jobs.tiny import write_tiny_pipeline

    write_tiny_pipeline(path)


# ------------------------------------------------------------------ 3. huge outputs


def make_output(folder: Path, shards: int, template: Path) -> Path:
    """An output of `shards` committed one-sample shards: `_job.json` of a real plan, and per shard
    the template shard's tar and Parquet (hard links) and its stats with this shard's names."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sdfleet.jobs.plan import Planner
    from sdfleet.jobs.sink import job_record
    from sdfleet.schemas import layout
    from sdfleet.schemas.layout import ShardStats
    from sdfleet.schemas.spec import parse_spec

    inputs = folder / "in"
    out = folder / "out"
    inputs.mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "prompt_id": [f"p{i}" for i in range(shards)],
                "prompt": [f"a small photo number {i}" for i in range(shards)],
            }
        ),
        inputs / "p.parquet",
    )
    spec = parse_spec(
        {
            "name": f"clone-{shards}",
            "model": {"source": str(template.parent / "model")},
            "input": {"uri": str(inputs)},
            "output": {"uri": str(out), "samples_per_shard": 1},
            "generation": {"num_inference_steps": 2, "width": 64, "height": 64},
            "safety": {"detector": "none"},
        }
    )
    plan = Planner(spec).plan()
    out.mkdir()
    (out / layout.JOB_FILE).write_text(json.dumps({**job_record(plan), "exclusive_create": True}))
    base = ShardStats.model_validate_json((template / layout.stats_file("00000")).read_text())
    for i in range(shards):
        name = plan.shard_name(i)
        if i % LINKS_PER_COPY == 0:  # a file system allows ~65,000 links to one file
            copy = folder / f"template-{i}"
            shutil.copytree(template, copy)
        for src, dst in (
            (layout.tar_file("00000"), layout.tar_file(name)),
            (layout.parquet_file("00000"), layout.parquet_file(name)),
        ):
            os.link(copy / src, out / dst)
        files = {
            layout.tar_file(name): base.files[layout.tar_file("00000")],
            layout.parquet_file(name): base.files[layout.parquet_file("00000")],
        }
        stats = base.model_copy(
            update={"shard": name, "shard_id": i, "fingerprint": plan.fingerprint, "files": files}
        )
        (out / layout.stats_file(name)).write_text(stats.model_dump_json(indent=2))
    return out


def template_shard(work: Path) -> Path:
    """One real committed shard (the worker's own code, without Ray): a one-sample 64² JPEG shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sdfleet.jobs.plan import Planner
    from sdfleet.schemas.spec import parse_spec
    from synthetic import synthetic_worker

    _tiny_model(work / "model")
    (work / "template-in").mkdir()
    pq.write_table(
        pa.table({"prompt_id": ["p0"], "prompt": ["a small photo number 0"]}),
        work / "template-in" / "p.parquet",
    )
    out = work / "template"
    spec = parse_spec(
        {
            "model": {"source": str(work / "model")},
            "input": {"uri": str(work / "template-in")},
            "output": {"uri": str(out), "samples_per_shard": 1},
            "safety": {"detector": "none"},
            "generation": {"num_inference_steps": 2, "width": 64, "height": 64},
        }
    )
    synthetic_worker(None)(Planner(spec).plan(), cpu_threads=1).run(0)
    return out


# What each output measurement runs, in a fresh process: argv[1] the output, argv[2] what.
MEASURE = (
    PEAK_RSS
    + """
import json, sys, time
t0 = time.perf_counter()
what = sys.argv[2]
if what == "status":
    from sdfleet.jobs.cli import main
    code = main(["status", sys.argv[1]])
elif what == "survey":
    from sdfleet.jobs.output import OutputReader
    survey = OutputReader.open(sys.argv[1]).survey()
    code = 0 if len(survey.committed) == survey.num_shards else 1
else:
    from sdfleet.jobs.sink import Finalizer
    from sdfleet.jobs.output import OutputReader
    code = 0 if Finalizer(OutputReader.open(sys.argv[1])).finalize() else 1
print(json.dumps({"seconds": round(time.perf_counter() - t0, 2), "code": code,
                  "peak_rss_mb": peak_rss_mb()}))
"""
)


def measure(output: str, what: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, output, what], cwd=REPO, capture_output=True, text=True
    )
    if out.returncode not in (0, 2):
        sys.exit(f"{what} of {output} failed: {out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if r["code"] != 0:
        sys.exit(f"{what} of {output} did not see a complete output:\n{out.stdout[-2000:]}")
    return {"seconds": r["seconds"], "peak_rss_mb": r["peak_rss_mb"]}


def output_figures(out: str) -> dict:
    """The resume listing, the finalizer (it writes _SUCCESS), then status (which needs it)."""
    return {what: measure(out, what) for what in ("survey", "finalize", "status")}


# ------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--workers", type=int, nargs="*", default=[2, 4, 8], help="actors per driver measurement"
    )
    parser.add_argument("--shards", type=int, default=400, help="shards per driver measurement")
    parser.add_argument("--plan-rows", type=int, default=100_000_000)
    parser.add_argument(
        "--outputs", type=int, nargs="*", default=[10_000, 100_000], help="local outputs (shards)"
    )
    parser.add_argument(
        "--s3-outputs", type=int, nargs="*", default=[10_000], help="outputs on moto (shards)"
    )
    parser.add_argument(
        "--work", help="working folder, kept (default: a temp dir, removed); reuses a plan input"
    )
    args = parser.parse_args()

    from synthetic import S3Server

    work = Path(args.work or tempfile.mkdtemp(prefix="sdfleet-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    figures: dict = {"driver": [], "plan": None, "outputs": {}}
    server = S3Server()
    try:
        args.bucket = f"scale-{int(time.time())}"
        s3 = server.bucket(args.bucket)

        # 1. The driver's CPU per shard.
        for workers in args.workers:
            r = drive(args, work, s3, workers)
            figures["driver"].append(r)
            print(
                f"driver: {workers} workers, {r['shards']} shards at {r['shards_per_s']} shards/s: "
                f"{r['driver_cpu_ms_per_shard']} ms driver CPU per shard ({r['driver_cpu_ms_per_s']} ms per second)",
                flush=True,
            )
        figures["driver_peak_rss_mb"] = round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        )
        if args.workers:
            figures["wait_2000_calls_ms"] = wait_cost()
            print(
                f"ray.wait over 2,000 calls in flight (1,000 GPUs): {figures['wait_2000_calls_ms']} ms CPU",
                flush=True,
            )

        # 2. Planning.
        if args.plan_rows:
            prompts = work / f"plan-{args.plan_rows}" / "prompts"
            if not list(prompts.glob("*.parquet")):
                prompts.mkdir(parents=True, exist_ok=True)
                write_input(prompts, args.plan_rows, 10)
            done = subprocess.run(
                [sys.executable, "-c", PLAN_CODE, str(prompts), str(work / "plan-out")],
                cwd=REPO,
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(done.stdout.strip().splitlines()[-1])
            figures["plan"] = {
                "rows": r["rows"],
                "seconds": round(r["seconds"], 1),
                "peak_rss_mb": round(r["peak_rss_mb"]),
            }
            print(
                f"plan: {r['rows']:,} prompts in {r['seconds']:.1f}s, peak RSS {r['peak_rss_mb']:.0f} MB",
                flush=True,
            )

        # 3. Huge outputs.
        template = (
            template_shard(work / "template-work") if args.outputs or args.s3_outputs else None
        )
        for shards in args.outputs:
            t0 = time.perf_counter()
            out = make_output(work / f"local-{shards}", shards, template)
            print(
                f"made a local output of {shards:,} shards in {time.perf_counter() - t0:.0f}s",
                flush=True,
            )
            figures["outputs"][f"local {shards}"] = r = output_figures(str(out))
            print(
                f"  local {shards:,}: "
                + ", ".join(f"{k} {v['seconds']}s ({v['peak_rss_mb']} MB)" for k, v in r.items()),
                flush=True,
            )
        for shards in args.s3_outputs:
            t0 = time.perf_counter()
            local = make_output(work / f"s3-{shards}", shards, template)
            s3.put(str(local), f"{args.bucket}/s3-{shards}", recursive=True)
            print(
                f"made an S3 output of {shards:,} shards in {time.perf_counter() - t0:.0f}s",
                flush=True,
            )
            figures["outputs"][f"s3 {shards}"] = r = output_figures(
                f"s3://{args.bucket}/s3-{shards}"
            )
            print(
                f"  s3 {shards:,}: "
                + ", ".join(f"{k} {v['seconds']}s ({v['peak_rss_mb']} MB)" for k, v in r.items()),
                flush=True,
            )
    finally:
        server.stop()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    # Targets, and the S3 figure at 100k projected from the largest S3 output (reads scale linearly).
    worst = max((r["driver_cpu_ms_per_shard"] for r in figures["driver"]), default=None)
    # At 1,000 GPUs: the worst measured per-shard cost, plus the one step that grows with the fleet.
    figures["driver_cpu_ms_per_shard_1000_gpus_projected"] = (
        round(worst + figures["wait_2000_calls_ms"], 3) if worst is not None else None
    )
    s3_sizes = sorted(int(k.split()[1]) for k in figures["outputs"] if k.startswith("s3"))
    projection = None
    if s3_sizes:
        status = figures["outputs"][f"s3 {s3_sizes[-1]}"]["status"]["seconds"]
        projection = round(status * 100_000 / s3_sizes[-1], 1)
    local_100k = figures["outputs"].get("local 100000", {}).get("status", {}).get("seconds")
    figures["status_100k_s3_projected_s"] = projection
    figures["targets"] = {
        "driver_cpu_ms_per_shard": {
            "target": TARGETS["driver_cpu_ms_per_shard"],
            "worst": worst,
            "projected_1000_gpus": figures["driver_cpu_ms_per_shard_1000_gpus_projected"],
        },
        "plan_100m_peak_gb": {
            "target": TARGETS["plan_100m_peak_gb"],
            "measured": round(figures["plan"]["peak_rss_mb"] / 1024, 2)
            if figures["plan"]
            else None,
        },
        "status_100k_s": {
            "target": TARGETS["status_100k_s"],
            "local": local_100k,
            "s3_projected": projection,
        },
    }
    print(
        f"\ndriver CPU per shard: worst {worst} ms measured; at 1,000 GPUs projected "
        f"{figures['driver_cpu_ms_per_shard_1000_gpus_projected']} ms (target <= {TARGETS['driver_cpu_ms_per_shard']})"
    )
    if figures["plan"]:
        print(
            f"planning {figures['plan']['rows']:,} prompts: {figures['plan']['seconds']}s, peak "
            f"{figures['plan']['peak_rss_mb']} MB (target < {TARGETS['plan_100m_peak_gb']} GB)"
        )
    print(
        f"status on 100k shards: local {local_100k}s; S3 projected from {s3_sizes[-1] if s3_sizes else '-'} "
        f"shards: {projection}s (target < {TARGETS['status_100k_s']} s; a projection, not a measurement)"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

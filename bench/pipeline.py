"""The whole job at GPU rates: does anything but the GPU limit a worker?

    .venv/bin/python bench/pipeline.py [--rates 6 11.9 23.1 35 50 60] [--png-rates 11.9 23.1 35]
                                       [--curation-rates 11.9] [--seconds 30]

An H100 at the FLOP limit makes 11.9 SD2-base images/s at 512² and 50 steps (83 TFLOP each), 23.1
at 25 steps. Here a synthetic engine (bench/synthetic.py: the real engine's interface and batching,
each pipeline call taking batch/rate seconds and returning crops of real photographs) stands in for
the GPU, and everything else is the real thing: `sdfleet run`'s driver, one Ray GPU actor
(logical GPU, the node's 2 CPUs) with its threads, nsfw-detector with the full-size MobileNetV2 1.4
architecture (random weights; safety.action `score`, so every image is encoded), JPEG q95 or PNG,
the writer, and the commit to moto's S3 server over HTTP (in a process of its own). Input prompts
are read from that S3 server too.

For each rate it reports the steady-state images/s (images committed per second between the
first and the last shard's commit), its ratio to the rate, the stand-in GPU's busy share, and
CPU-seconds per image of the worker, the driver, Ray's own processes and moto. Before the jobs it
measures each stage's CPU-seconds per image alone in a fresh process (score, encode, hash, write,
upload), with the same code the worker runs. The knee is the lowest rate whose ratio falls
below 0.97. The last line printed is one JSON object of all figures (keys in the README).

The curation rows run the same JPEG job with curation on: a CLIP embedding per image, the
aesthetic and NSFW heads, best-of-N (1 kept of 2 candidates, a min_aesthetic gate at the photos'
median, so about half the prompts need a second round). Their CLIP is the tiny one on the CPU:
the row measures curation's CPU side (CLIPImageProcessor per 512² image, the prompt embeddings)
and the GPU's wait between rounds. ViT-L/14's own forward (~0.16 TFLOP per image, 0.2% of an
SD2-base image at 50 steps) runs on the GPU in a real job and is not in it. The ratio counts every
candidate generated (kept, rejected or filtered) against the stand-in GPU's rate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

TARGET_RATIO = 0.97


def measure_stages(
    detector_path: str, size: int, batch: int, threads: int, bucket: str
) -> dict[str, float]:
    """CPU-seconds per image of each stage the worker runs beside the pipeline, alone in this process."""
    import datetime
    import hashlib
    import uuid

    import pyarrow as pa

    from sdfleet.actors.safety import load_detector
    from sdfleet.actors.storage import Storage
    from sdfleet.actors.writer import ShardWriter, encode_image
    from sdfleet.schemas import layout
    from sdfleet.schemas.rows import output_schema
    from sdfleet.schemas.spec import SafetySpec
    from synthetic import photographs

    photos = photographs(size, size)
    images = (
        (photos * (batch // len(photos) + 1))[:batch] if batch > len(photos) else photos[:batch]
    )

    def cpu(fn, repeats: int = 3) -> float:
        fn()  # warm-up
        t0 = time.process_time()
        for _ in range(repeats):
            fn()
        return (time.process_time() - t0) / repeats

    detector = load_detector(
        SafetySpec(detector="nsfw-detector", model=detector_path), "cpu", threads
    )
    out = {"score": cpu(lambda: detector.score(images)) / len(images)}
    encoded = {}
    for fmt in ("jpeg", "png"):
        out[f"encode_{fmt}"] = cpu(
            lambda fmt=fmt: encoded.__setitem__(fmt, [encode_image(im, fmt, 95) for im in photos])
        )
        out[f"encode_{fmt}"] /= len(photos)
    jpegs = (encoded["jpeg"] * 40)[:96]
    out["hash"] = cpu(lambda: [hashlib.sha256(b).hexdigest() for b in jpegs]) / len(jpegs)
    # A 96-image JPEG shard: rows, tar and Parquet on local disk, then staged and published on S3.
    storage = Storage(f"s3://{bucket}/stages")
    writer = ShardWriter(storage, "jpeg")
    now = datetime.datetime.now(datetime.UTC)
    rows = [
        {  # an ok row as the worker writes it: every column filled
            "key": f"00000{i:04d}",
            "sample_id": uuid.uuid4().hex,
            "shard_id": 0,
            "status": "ok",
            "prompt_id": f"p{i}",
            "prompt": f"a photograph of a harbour at dusk, variation {i}",
            "negative_prompt": "",
            "prompt_tokens": 14,
            "prompt_truncated": False,
            "seed": 2**62 + i,
            "generator_device": "cpu",
            "model_source": "/models/sd2",
            "scheduler": "EulerDiscreteScheduler",
            "num_inference_steps": 50,
            "guidance_scale": 7.5,
            "width": size,
            "height": size,
            "dtype": "float16",
            "image_format": "jpeg",
            "image_sha256": hashlib.sha256(jpegs[i]).hexdigest(),
            "nsfw_score": 0.1,
            "nsfw_scores": [
                {"label": c, "score": 0.2}
                for c in ("drawings", "hentai", "neutral", "porn", "sexy")
            ],
            "safety_detector": "nsfw-detector",
            "safety_threshold": 0.5,
            "safety_action": "score",
            "safety_model_sha256": "0" * 64,
            "safety_flagged": False,
            "device": "cuda:0",
            "worker_node": "0" * 56,
            "worker_id": "0" * 32,
            "gpu_id": "0",
            "gen_seconds": 0.08,
            "created_at": now,
        }
        for i in range(96)
    ]
    tars = {r["key"]: b for r, b in zip(rows, jpegs)}
    schema = output_schema(pa.schema([]))
    spooled = []
    out["write"] = cpu(lambda: spooled.append(writer.spool("00000", rows, tars, schema))) / len(
        rows
    )

    def upload():
        s = spooled.pop()
        writer_id = uuid.uuid4().hex
        for final, path in s.files.items():
            storage.publish(
                final,
                storage.stage(
                    path, final, writer_id, layout.content_type(final), sha256=s.sha256[final]
                ),
            )
        s.close()

    out["upload"] = cpu(upload, repeats=2) / len(rows)
    return {k: round(v, 5) for k, v in out.items()}


class CpuSampler:
    """Samples, twice a second, the CPU seconds of this process (the driver), of each of its
    descendants (Ray's processes, the worker among them) and of moto."""

    def __init__(self, moto_pid: int):
        self.moto_pid = moto_pid
        self.samples: list[
            tuple[float, float, dict[int, float], float]
        ] = []  # ts, driver, per pid, moto
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _descendants(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry))
        found, todo = [], [os.getpid()]
        while todo:
            for child in children.get(todo.pop(), []):
                found.append(child)
                todo.append(child)
        return found

    def _run(self) -> None:
        import resource

        from synthetic import process_cpu_seconds

        while not self.stop.is_set():
            own = resource.getrusage(resource.RUSAGE_SELF)
            others = {}
            for pid in self._descendants():
                if pid != self.moto_pid:
                    with contextlib.suppress(OSError):  # the process ended meanwhile
                        others[pid] = process_cpu_seconds(pid)
            self.samples.append(
                (
                    time.time(),
                    own.ru_utime + own.ru_stime,
                    others,
                    process_cpu_seconds(self.moto_pid),
                )
            )
            self.stop.wait(0.5)

    def between(self, start: float, end: float, worker_pid: int) -> tuple[float, float, float]:
        """CPU seconds of (driver, Ray's processes but the worker, moto) from the sample nearest
        `start` to the one nearest `end`."""
        a = min(self.samples, key=lambda s: abs(s[0] - start))
        b = min(self.samples, key=lambda s: abs(s[0] - end))
        ray_cpu = sum(cpu - a[2].get(pid, 0.0) for pid, cpu in b[2].items() if pid != worker_pid)
        return b[1] - a[1], ray_cpu, b[3] - a[3]

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def run_job(
    args,
    work: Path,
    s3,
    model: Path,
    detector: Path,
    fmt: str,
    rate: float,
    curation: dict | None = None,
) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sdfleet.actors.storage import Storage
    from sdfleet.jobs.run import JobRunner
    from sdfleet.schemas import layout
    from sdfleet.schemas.layout import ShardStats
    from sdfleet.schemas.spec import parse_spec
    from synthetic import synthetic_worker

    tag = f"{fmt}-{rate}" + ("-curated" if curation else "")
    per_shard = max(args.batch, round(rate * args.seconds / args.shards / args.batch) * args.batch)
    n = per_shard * args.shards
    rows = n // (
        curation["max_candidates"] if curation else 1
    )  # each prompt owns its candidate slots
    with s3.open(f"{args.bucket}/prompts-{tag}/p.parquet", "wb") as f:
        pq.write_table(
            pa.table(
                {
                    "prompt_id": [f"p{i}" for i in range(rows)],
                    "prompt": [
                        f"a photograph of a harbour at dusk, variation {i}" for i in range(rows)
                    ],
                }
            ),
            f,
        )
    out = f"s3://{args.bucket}/out-{tag}"
    spec = parse_spec(
        {
            "name": f"pipeline-{tag}",
            "model": {"source": str(model), "scheduler": "EulerDiscreteScheduler"},
            "input": {"uri": f"s3://{args.bucket}/prompts-{tag}/"},
            "generation": {"num_inference_steps": 50, "width": args.size, "height": args.size},
            "output": {
                "uri": out,
                "image_format": fmt,
                "quality": 95,
                "samples_per_shard": per_shard,
            },
            "safety": {"detector": "nsfw-detector", "model": str(detector), "action": "score"},
            "resources": {"batch_size": args.batch, "max_workers": 1, "gpus_per_worker": 1},
            "curation": curation or {},
        }
    )
    cpu_log = work / f"cpu-{tag}"
    cpu_log.mkdir()
    runner = JobRunner(spec, progress=False, worker=synthetic_worker(rate, str(cpu_log)))
    code = runner.run()
    if code != 0:
        sys.exit(f"the {tag} job exited {code}")
    storage = Storage(out)
    stats = sorted(
        (
            ShardStats.model_validate(storage.read_json(name))
            for name in storage.list(layout.STATS_GLOB)
        ),
        key=lambda s: s.finished_ts,
    )
    # Steady state, as the GPU sees it: the images made from the second shard's end of generation
    # (the hand-over to the third) to the last shard's, over that span. A gap in
    # that span is the GPU waiting: for a shard not yet fed because the shard two ahead of it has
    # not committed, or for the pipeline turn. The first two shards are warm-up (the detector's
    # first calls build its graph; the post thread starts behind).
    first, last = stats[1], stats[-1]
    if args.timeline:
        t0 = stats[0].generate_started_ts
        for s in stats:
            print(
                f"  {s.shard}: gen {s.generate_started_ts - t0:7.2f} -> {s.generate_finished_ts - t0:7.2f}  "
                f"commit {s.finished_ts - t0:7.2f}  stages {s.stage_seconds}"
            )
    # How long a shard's scoring, encoding and upload outlast its generation, over its generation
    # time: at 1 or more, the next shard but one is fed too late and the GPU waits.
    lag = [
        (s.finished_ts - s.generate_finished_ts) / (s.generate_finished_ts - s.generate_started_ts)
        for s in stats[1:]
    ]
    # The stand-in GPU's rate, busy share and the worker's own CPU over the steady window, from the
    # engine's log of its pipeline calls: with best-of-N, neighbouring shards' rounds interleave on
    # the pipeline, so per-shard times would count the overlap twice.
    (log_file,) = cpu_log.glob("cpu-*.jsonl")
    entries = [json.loads(line) for line in log_file.read_text().splitlines()]
    inside = [
        e for e in entries if first.generate_finished_ts <= e["ts"] <= last.generate_finished_ts
    ]
    if len(inside) < 2:  # a window with one call (a tiny run on a loaded machine) has no length
        inside = entries
    made = (
        inside[-1]["images"] - inside[0]["images"]
    )  # every image the GPU made: kept, rejected or filtered
    window = inside[-1]["ts"] - inside[0]["ts"]
    achieved = made / window
    busy = sum(e["ts"] - e["started"] for e in inside[1:]) / window
    worker_cpu = (inside[-1]["cpu"] - inside[0]["cpu"]) / max(1, made)
    worker_pid = int(log_file.stem.split("-")[1])
    driver, ray_cpu, moto = SAMPLER.between(
        first.generate_finished_ts, last.generate_finished_ts, worker_pid
    )
    stage_totals: dict[str, float] = {}
    for s in stats[1:]:
        for k, v in s.stage_seconds.items():
            stage_totals[k] = stage_totals.get(k, 0.0) + v
    return {
        "format": fmt,
        "curation": bool(curation),
        "rate": rate,
        "images": n,
        "kept_per_s": round(
            achieved
            * sum(s.ok for s in stats)
            / sum(s.samples - s.skipped - s.failed for s in stats),
            3,
        ),
        "shards": len(stats),
        "samples_per_shard": per_shard,
        "achieved": round(achieved, 3),
        "ratio": round(achieved / rate, 4),
        "gpu_busy": round(busy, 4),
        "commit_lag": round(sum(lag) / len(lag), 3),
        "cpu_s_per_image": {
            "worker": round(worker_cpu, 5),
            "driver": round(driver / made, 5),
            "ray": round(ray_cpu / made, 5),
            "moto": round(moto / made, 5),
        },
        "worker_thread_s_per_image": {
            k: round(v / made, 5) for k, v in sorted(stage_totals.items())
        },
    }


SAMPLER: CpuSampler


def curation_spec(work: Path, size: int) -> dict:
    """Tiny CLIP and heads, best-of-N 1 of 2, and a min_aesthetic gate at the median aesthetic
    score of the photographs the stand-in GPU returns, so about half the first candidates fail."""
    import statistics

    from sdfleet.actors.curation import Curator
    from sdfleet.jobs.tiny import write_tiny_aesthetic_head, write_tiny_clip, write_tiny_nsfw_head
    from sdfleet.schemas.curation_spec import CurationSpec
    from synthetic import photographs

    models = {
        "clip_model": str(write_tiny_clip(work / "clip")),
        "aesthetic_model": str(write_tiny_aesthetic_head(work / "aesthetic.safetensors")),
        "nsfw_model": str(write_tiny_nsfw_head(work / "nsfw.safetensors")),
    }
    photos = photographs(size, size)
    scores = Curator(CurationSpec(**models), "cpu").score(photos, ["a photograph"] * len(photos))
    median = statistics.median(s.aesthetic_score for s in scores)
    return {**models, "min_aesthetic": median, "images_per_prompt": 1, "max_candidates": 2}


def main() -> None:
    global SAMPLER
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--rates",
        type=float,
        nargs="+",
        default=[6, 11.9, 23.1, 35, 50, 60],
        help="stand-in GPU rates (images/s) for JPEG jobs",
    )
    parser.add_argument("--png-rates", type=float, nargs="*", default=[11.9, 23.1, 35])
    parser.add_argument(
        "--curation-rates",
        type=float,
        nargs="*",
        default=[11.9],
        help="stand-in GPU rates for JPEG jobs with curation and best-of-N on",
    )
    parser.add_argument(
        "--seconds", type=float, default=30, help="generation time per job at its rate"
    )
    parser.add_argument(
        "--shards", type=int, default=6, help="shards per job (at least 3: two are warm-up)"
    )
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16, help="images per pipeline call")
    parser.add_argument(
        "--timeline", action="store_true", help="print each shard's generate and commit times"
    )
    parser.add_argument(
        "--tiny-detector", action="store_true", help="the tiny nsfw model (tests only)"
    )
    parser.add_argument("--work", help="working folder (default: a temp dir)")
    parser.add_argument(
        "--measure-stages",
        nargs=3,
        metavar=("DETECTOR", "BUCKET", "THREADS"),
        help=argparse.SUPPRESS,
    )
    args = parser.parse_args()
    if args.measure_stages:  # the fresh process measure_stages runs in
        detector, bucket, threads = args.measure_stages
        print(json.dumps(measure_stages(detector, args.size, args.batch, int(threads), bucket)))
        return

    from synthetic import S3Server, register_for_ray

    work = Path(args.work or tempfile.mkdtemp(prefix="sdfleet-pipeline-"))
    server = S3Server()
    try:
        args.bucket = f"pipeline-{int(time.time())}"
        s3 = server.bucket(args.bucket)
        from sdfleet.jobs.tiny import write_tiny_nsfw_model, write_tiny_pipeline

        # The driver checks the model folder before any worker starts; the synthetic engine loads nothing.
        model = write_tiny_pipeline(work / "model")
        detector = work / "nsfw.h5"
        if args.tiny_detector:
            write_tiny_nsfw_model(detector)
        else:
            from safety import keras_model

            keras_model("mobilenet_v2_140_224", detector)
        threads = os.cpu_count() or 1  # one GPU on this node: the worker's share is every CPU
        measured = subprocess.run(
            [
                sys.executable,
                __file__,
                "--size",
                str(args.size),
                "--batch",
                str(args.batch),
                "--measure-stages",
                str(detector),
                args.bucket,
                str(threads),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
        if measured.returncode:
            sys.exit(measured.stderr[-3000:])
        stages = json.loads(measured.stdout.strip().splitlines()[-1])

        curation = curation_spec(work, args.size) if args.curation_rates else None

        import ray

        ray.init(
            num_cpus=threads,
            num_gpus=1,
            include_dashboard=False,
            logging_level="WARNING",
            _temp_dir=tempfile.mkdtemp(prefix="sdf-pl-", dir="/tmp"),
        )
        register_for_ray()
        SAMPLER = CpuSampler(server.proc.pid)
        results = {}
        try:
            for fmt, rates, cur in (
                ("jpeg", args.rates, None),
                ("png", args.png_rates, None),
                ("jpeg", args.curation_rates, curation),
            ):
                for rate in rates:
                    r = run_job(args, work, s3, model, detector, fmt, rate, cur)
                    results[f"{fmt} {rate:g}" + (" curated" if cur else "")] = r
                    print(
                        f"{fmt:4} {rate:6.1f} img/s{' curated' if cur else ''}: achieved {r['achieved']:6.2f}  ratio {r['ratio']:.3f}  "
                        f"commit lag {r['commit_lag']:.2f}  CPU s/img {r['cpu_s_per_image']}",
                        flush=True,
                    )
        finally:
            SAMPLER.close()
            ray.shutdown()
    finally:
        server.stop()

    jpeg = sorted(
        (r for r in results.values() if r["format"] == "jpeg" and not r["curation"]),
        key=lambda r: r["rate"],
    )
    below = [r["rate"] for r in jpeg if r["ratio"] < TARGET_RATIO]
    kept = [
        r["rate"]
        for r in jpeg
        if r["ratio"] >= TARGET_RATIO and (not below or r["rate"] < below[0])
    ]
    knee = {
        "last_rate_at_target": kept[-1] if kept else None,
        "first_rate_below": below[0] if below else None,
    }
    # Where the CPUs would run out: every core over the CPU one image costs (worker, driver, Ray).
    at = next((r for r in jpeg if r["rate"] == 11.9), jpeg[0])
    per_image = sum(v for k, v in at["cpu_s_per_image"].items() if k != "moto")
    knee["cpu_bound_rate"] = round(threads / per_image, 1) if per_image else None

    print(
        f"\nstage CPU-seconds per image, each alone (nsfw-detector on {threads} threads, 512² photos): "
        + ", ".join(f"{k} {1000 * v:.1f} ms" for k, v in stages.items())
    )
    print(
        f"{'job':14} {'rate':>6} {'achieved':>9} {'ratio':>6} {'GPU busy':>8} {'lag':>5}  "
        "CPU ms/img: worker driver ray moto"
    )
    for r in results.values():
        c = r["cpu_s_per_image"]
        print(
            f"{r['format'] + (' curated' if r['curation'] else ''):14} {r['rate']:6.1f} {r['achieved']:9.2f} {r['ratio']:6.3f} {r['gpu_busy']:8.3f} "
            f"{r['commit_lag']:5.2f}  "
            f"{1000 * c['worker']:7.1f} {1000 * c['driver']:6.1f} {1000 * c['ray']:4.1f} {1000 * c['moto']:5.1f}"
        )
    at_target = next((r for r in jpeg if r["rate"] == 11.9), None)
    if at_target:
        print(
            f"target: ratio >= {TARGET_RATIO} at 11.9 img/s (JPEG, nsfw-detector) -> "
            f"{'met' if at_target['ratio'] >= TARGET_RATIO else 'MISSED'} ({at_target['ratio']:.3f})"
        )
    curated = next((r for r in results.values() if r["curation"] and r["rate"] == 11.9), None)
    if curated:
        print(
            f"target: ratio >= {TARGET_RATIO} at 11.9 img/s with curation and best-of-N -> "
            f"{'met' if curated['ratio'] >= TARGET_RATIO else 'MISSED'} ({curated['ratio']:.3f}; "
            f"{curated['kept_per_s']:.2f} kept images/s)"
        )
    print(
        f"knee: ratio >= {TARGET_RATIO} up to {knee['last_rate_at_target']} img/s; first below: "
        f"{knee['first_rate_below']}; CPUs would saturate near {knee['cpu_bound_rate']} img/s"
    )
    print(
        json.dumps(
            {
                "rates": {
                    k: {
                        x: r[x]
                        for x in (
                            "achieved",
                            "kept_per_s",
                            "ratio",
                            "gpu_busy",
                            "commit_lag",
                            "cpu_s_per_image",
                            "worker_thread_s_per_image",
                            "images",
                            "shards",
                        )
                    }
                    for k, r in results.items()
                },
                "stage_cpu_s_per_image": stages,
                "knee": knee,
                "cores": threads,
            }
        )
    )


if __name__ == "__main__":
    main()

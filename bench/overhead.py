"""Pipeline overhead on the CPU: bare engine loop vs the full `sdfleet run` on the same samples.

    .venv/bin/python bench/overhead.py [--prompts 40] [--steps 4] [--size 256] [--width 0.25]

torch is pinned to one thread (standing in for the GPU); the other core is left for everything
else sdfleet does: Ray, reading prompts, safety scoring, encoding, writing. The model is SD2-base's
architecture at a quarter of its channels (random weights). Both sides generate the same samples
with the same batch size; each side's first batch is warm-up. Ratio = job images/s / bare images/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--width", type=float, default=0.25, help="channel multiplier of SD2-base")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--per-shard", type=int, default=8)
    parser.add_argument("--safety", default="nsfw-detector", choices=["nsfw-detector", "none"])
    parser.add_argument(
        "--work", help="folder for the model, prompts and outputs (default: a temp dir)"
    )
    args = parser.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from sd2_base import build_pipeline
    from sdfleet.jobs.tiny import write_tiny_nsfw_model

    work = Path(args.work or tempfile.mkdtemp(prefix="sdfleet-overhead-"))
    model = work / f"sd2-w{args.width}"
    if not (model / "model_index.json").exists():
        build_pipeline(model, width=args.width, text_layers=4)
    detector = work / "nsfw.h5"
    if args.safety == "nsfw-detector" and not detector.exists():
        write_tiny_nsfw_model(detector)
    prompts = [f"a photo of a mountain lake, variation {i}" for i in range(args.prompts)]
    (work / "in").mkdir(exist_ok=True)
    pq.write_table(
        pa.table({"prompt_id": [f"p{i}" for i in range(args.prompts)], "prompt": prompts}),
        work / "in" / "p.parquet",
    )

    # 1. The bare loop: the engine alone, in this process, one torch thread.
    import torch

    from sdfleet.actors.engine import Engine
    from sdfleet.schemas.samples import GenerationParams, derive_seed
    from sdfleet.schemas.spec import ModelSpec

    torch.set_num_threads(1)
    engine = Engine(ModelSpec(source=str(model), scheduler="EulerDiscreteScheduler"), cpu_threads=1)
    params = [
        GenerationParams(
            p, "", derive_seed(0, f"p{i}", 0), args.steps, 7.5, args.size, args.size, None
        )
        for i, p in enumerate(prompts)
    ]
    list(engine.generate(params[: args.batch], args.batch))  # warm-up

    def bare_loop() -> float:
        t0 = time.perf_counter()
        for _ in engine.generate(params, args.batch):
            pass
        return len(params) / (time.perf_counter() - t0)

    bare_before = bare_loop()

    # 2. The full job: CLI, embedded Ray, one CPU worker with one torch thread, safety and encoding on.
    spec = {
        "name": "overhead",
        "model": {"source": str(model), "scheduler": "EulerDiscreteScheduler"},
        "input": {"uri": str(work / "in")},
        "generation": {"num_inference_steps": args.steps, "width": args.size, "height": args.size},
        "output": {"uri": str(work / f"out-{time.time_ns()}"), "samples_per_shard": args.per_shard},
        "safety": {
            "detector": args.safety,
            **({"model": str(detector)} if args.safety != "none" else {}),
        },
        "resources": {"batch_size": args.batch, "max_workers": 1, "cpu_threads": 1},
    }
    (work / "job.yaml").write_text(yaml.safe_dump(spec))
    t0 = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "sdfleet.jobs.cli", "run", str(work / "job.yaml"), "--no-progress"],
        cwd=REPO,
        env={**os.environ, "RAY_ADDRESS": ""},
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if run.returncode:
        sys.exit(run.stderr[-3000:])
    # The bare loop again, after the job: a 2-core machine's speed drifts by a few percent from one
    # minute to the next, so the job is compared with the mean of a loop before and one after it.
    bare_after = bare_loop()
    bare = (bare_before + bare_after) / 2
    from sdfleet.actors.storage import Storage

    out = Storage(spec["output"]["uri"])
    stats = sorted(
        (out.read_json(n) for n in out.list("*_stats.json")), key=lambda s: s["generate_started_ts"]
    )
    images = sum(s["images_in_tar"] for s in stats)
    # Steady state, like the bare loop after its warm-up: from the moment the first shard hands over
    # the pipeline (the next shard generates while it uploads) until every later shard is written.
    end = max(s["finished_ts"] for s in stats)
    steady = sum(s["images_in_tar"] for s in stats[1:]) / (end - stats[0]["generate_finished_ts"])
    whole = images / (end - min(s["started_ts"] for s in stats))
    print(
        f"model: SD2-base x{args.width} channels ({args.size}px, {args.steps} steps, batch {args.batch}), "
        f"{len(params)} images, safety {args.safety}, torch on 1 thread"
    )
    print(
        f"bare engine loop:      {bare:.3f} images/s  (before the job {bare_before:.3f}, after {bare_after:.3f})"
    )
    print(
        f"sdfleet run (steady):  {steady:.3f} images/s   ratio {steady / bare:.3f}  (target >= 0.95)"
    )
    print(
        f"sdfleet run (all shards, first-batch warm-up included): {whole:.3f} images/s   ratio {whole / bare:.3f}"
    )
    print(f"sdfleet run wall time incl. Ray start and model load: {wall:.1f}s")
    print(
        json.dumps(
            {
                "bare_images_per_s": round(bare, 4),
                "job_images_per_s": round(steady, 4),
                "ratio": round(steady / bare, 4),
                "ratio_with_warm_up": round(whole / bare, 4),
                "wall_s": round(wall, 1),
            }
        )
    )


if __name__ == "__main__":
    main()

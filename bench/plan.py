"""Planning cost at scale: a 10M-prompt input, planned from Parquet footers plus the id column.

    .venv/bin/python bench/plan.py [--rows 10000000] [--files 10] [--keep DIR]

Writes the prompt table once (10 files, 64k-row groups), then plans it in a fresh process and
reports wall time and that process's peak RSS. Target: under 60 s with memory bounded by the ids
(the planner never materializes samples; a shard is a range of sample indices).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# For the measured child process: its own peak RSS. Not getrusage's ru_maxrss, which Linux carries
# over an exec from the parent's size at fork (a large bench process would inflate every figure).
PEAK_RSS = """
def peak_rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024)
"""

PLAN_CODE = (
    PEAK_RSS
    + """
import json, sys, time
from sdfleet.jobs.plan import Planner, estimate
from sdfleet.schemas.spec import parse_spec
t0 = time.perf_counter()
spec = parse_spec({"input": {"uri": sys.argv[1]}, "output": {"uri": sys.argv[2]},
                   "sweep": {"seeds": 4, "axes": {"guidance_scale": [3.0, 7.5]}},
                   "output": {"uri": sys.argv[2], "samples_per_shard": 10000}})
plan = Planner(spec).plan()
est = estimate(plan)
elapsed = time.perf_counter() - t0
print(json.dumps({"seconds": elapsed, "peak_rss_mb": peak_rss_mb(),
                  "rows": plan.num_rows, "samples": plan.num_samples, "shards": plan.num_shards,
                  "duplicates": len(plan.duplicate_rows), "gpu_hours": est["gpu_hours"]}))
"""
)


def write_input(folder: Path, rows: int, files: int) -> None:
    """`files` Parquet files of unique ids (coco-000000042) and templated prompts, built with
    Arrow's string kernels (a Python string per row would take minutes at 100M)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    def text(values) -> pa.Array:
        return pc.cast(pa.array(values), pa.string())

    per_file = rows // files
    for f in range(files):
        with pq.ParquetWriter(
            folder / f"part-{f:03d}.parquet",
            pa.schema([("prompt_id", pa.string()), ("prompt", pa.string())]),
        ) as w:
            for start in range(f * per_file, (f + 1) * per_file, 1 << 20):
                n = np.arange(start, min(start + (1 << 20), (f + 1) * per_file))
                ids = pc.binary_join_element_wise("coco-", pc.utf8_lpad(text(n), 9, "0"), "")
                prompts = pc.binary_join_element_wise(
                    "a photo of object ",
                    text(n % 1000),
                    " in scene ",
                    text(n % 977),
                    ", high detail",
                    "",
                )
                w.write_table(pa.table({"prompt_id": ids, "prompt": prompts}), row_group_size=65536)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--keep", help="reuse/keep the generated input in this folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp) / "prompts"
        folder.mkdir(parents=True, exist_ok=True)
        if not list(folder.glob("*.parquet")):
            t0 = time.perf_counter()
            write_input(folder, args.rows, args.files)
            print(
                f"wrote {args.rows:,} prompts in {args.files} files in {time.perf_counter() - t0:.1f}s",
                flush=True,
            )
        out = subprocess.run(
            [sys.executable, "-c", PLAN_CODE, str(folder), str(Path(tmp) / "out")],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"planned {r['rows']:,} prompts -> {r['samples']:,} samples in {r['shards']:,} shards "
            f"({r['duplicates']} duplicate ids) in {r['seconds']:.1f}s, peak RSS {r['peak_rss_mb']:.0f} MB"
        )
        print(
            f"target: under 60 s -> {'met' if r['seconds'] < 60 else 'MISSED'} "
            f"(ratio to target {r['seconds'] / 60:.2f})"
        )
        print(
            json.dumps(
                {
                    "rows": r["rows"],
                    "samples": r["samples"],
                    "shards": r["shards"],
                    "seconds": round(r["seconds"], 2),
                    "peak_rss_mb": r["peak_rss_mb"],
                }
            )
        )


if __name__ == "__main__":
    main()

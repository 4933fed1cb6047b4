"""Are a checkout's job outputs byte-identical to a baseline's? (issue 27's acceptance check)

A standalone script, not a pytest module. It runs five small jobs through the real CLI, each in a
fresh process on an embedded local Ray with local output folders:

    demo        `sdfleet demo`: nsfw-detector (drop), PNG, a guidance_scale sweep, 2 workers
    jpeg-clip   JPEG with safety.detector: clip-checker
    webp-sweep  WebP with sweep.axes num_inference_steps x scheduler
    inpaint     model.task: inpaint, photos and masks inline in the prompt table
    best-of-n   curation.images_per_prompt / max_candidates with a min_clip_score gate,
                aesthetic scores and save_embeddings

The tiny models come from `sdfleet tiny-models` (sdfleet's own random-weight writers, seeded), the
prompt tables and input images from this file. Then it writes one JSON of digests per output file:

    *.tar, quarantine/*.tar, img_emb/*.npy, sizes.json, preview/*.png   sha256 of the bytes
    *.parquet (and quarantine/, metadata/)   sha256 of the rows less RUN_COLUMNS (below), with the
                                             schema, in file order; plus one digest per column, so
                                             a difference names its column
    README.md (the card)                     sha256 with the lines in CARD_MASKS blanked

Left out, as run records rather than the dataset: _job.json, _driver.json, *_stats.json, _index/,
_SUCCESS (empty). Any other file is digested raw, so a new kind of output shows up as a difference.

Rows and tars record the model's absolute path (model_source), so two runs compare only when made
in the same work folder: keep the default --work (or pass the same one to both).

    python tests/output_identity.py --out digests.json [--work DIR] [--jobs a,b] [--no-run]
    python tests/output_identity.py --compare BASELINE.json NEW.json    # exit 1 on any difference

tests/output_identity_baseline.json holds the digests made once SD3.5 and FLUX.1 had landed: its
tars, rows and previews equal those of 43ef8ac (the first baseline, compared then); its cards were
digested again with the fingerprint line masked; the T5 tokenizers' tokenizer.json again once
the tiny T5 tokenizer was written instead of trained (the trainer's piece order varied by run),
and tiny-flux-fill's files added. Run with the checkout's own venv, e.g. `.venv/bin/python tests/...`, so the
installed `sdfleet` is that checkout's code.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Row columns that differed between two runs of the same code: which worker made a sample, when,
# and how long it took. schemas.rows.RUN_COLUMNS at 43ef8ac also names device and gpu_id, but they
# held the same values in both runs on this machine ("cpu", null), so they are compared. Spelled
# out here so that a refactor of that tuple cannot hide a difference.
RUN_COLUMNS = ("worker_node", "worker_id", "gen_seconds", "created_at", "model_hash")
# model_hash is the checkpoint's content identity, which for a local folder includes its files'
# mtimes (actors/model_content.py); this script writes the tiny models afresh for every run.
# Card lines that differ between two runs of the same code: the job fingerprint, which holds the
# models' content identity (model_hash's, above). "GPU-hours" reads 0.0000 without a GPU; on a GPU
# that line would need masking too: re.compile(r"^\| GPU-hours \|.*$", re.MULTILINE).
CARD_MASKS: tuple[re.Pattern, ...] = (re.compile(r"^- job fingerprint: .*$", re.MULTILINE),)
# Run records, not the dataset; their content is timings, leases and listing caches.
SKIPPED = re.compile(r"^(_job\.json|_driver\.json|_SUCCESS|\d+_stats\.json|_index/.*)$")

DEFAULT_WORK = Path(tempfile.gettempdir()) / "sdfleet-output-identity"
MARKER = ".sdfleet-output-identity"  # a work folder this script made, and may empty
SIDE = 64
STEPS = 2
PROMPTS = [
    "a lighthouse at dusk",
    "a red fox in the snow",
    "a bowl of ramen",
    "a city at night, rain",
]

# ------------------------------------------------------------------------------ running


def environment(ray_tmp: Path) -> dict:
    """This environment, offline, with an embedded Ray of its own (temp dir, no token auth)."""
    env = {
        **os.environ,
        "AWS_EC2_METADATA_DISABLED": "true",
        "HF_HUB_OFFLINE": "1",
        "RAY_TMPDIR": str(ray_tmp),
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("RAY_ADDRESS", None)
    return env


def sdfleet(work: Path, env: dict, *args: str) -> float:
    """Run `sdfleet ARGS` in a fresh process; its wall time. Stops the script if it fails."""
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "sdfleet.jobs.cli", *args],
        check=False,
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0:
        sys.exit(
            f"sdfleet {' '.join(args)} exited {done.returncode}\n"
            f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        )
    return time.monotonic() - start


def fresh_work(work: Path) -> None:
    if work.exists():
        if not (work / MARKER).exists() and any(work.iterdir()):
            sys.exit(f"{work} is not empty and was not made by this script; give another --work")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / MARKER).write_text("made by tests/output_identity.py; emptied by its next run\n")


# ------------------------------------------------------------------------------ the jobs


def write_prompts(folder: Path, **columns) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    table = {"prompt_id": [f"p{i}" for i in range(len(PROMPTS))], "prompt": PROMPTS, **columns}
    pq.write_table(pa.table(table), folder / "prompts.parquet", row_group_size=2)


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def inpaint_inputs() -> dict:
    """scikit-image's photos at the tiny model's size, and a mask over a different quarter of each."""
    import pyarrow as pa
    from PIL import Image
    from skimage import data

    images, masks = [], []
    for i, name in enumerate(("astronaut", "chelsea", "coffee", "rocket")):
        photo = Image.fromarray(getattr(data, name)()).convert("RGB")
        images.append(png(photo.resize((SIDE, SIDE), Image.LANCZOS)))
        mask = Image.new("L", (SIDE, SIDE), 0)
        x, y = (i % 2) * SIDE // 2, (i // 2 % 2) * SIDE // 2
        mask.paste(255, (x, y, x + SIDE // 2, y + SIDE // 2))
        masks.append(png(mask))
    return {"image": pa.array(images, pa.binary()), "mask": pa.array(masks, pa.binary())}


# The tiny CLIP scores these prompts' candidates (seeds 0-2) about 36, 36, 45 (p0), under 6 (p1,
# p2) and 57-61 (p3): a gate at 40 keeps p3's first candidate (its other slots skipped), p0's third
# after two rejected rounds, and none of p1's or p2's. It sits over 4 points from every score, so
# float noise from batching cannot move an image across it. (The tiny aesthetic head scores every
# image about -0.107: recorded, but no use as a gate.)
MIN_CLIP_SCORE = 40.0


def job_specs(work: Path) -> dict[str, dict]:
    """Each job's spec (besides the demo, whose spec is `sdfleet demo`'s own)."""
    models = work / "models"

    def spec(name: str, out_format: str, samples_per_shard: int, **sections) -> dict:
        job = {
            "name": f"identity-{name}",
            "model": {"source": str(models / "tiny-sd2"), "scheduler": "EulerDiscreteScheduler"},
            "input": {"uri": str(work / name / "in")},
            "generation": {"num_inference_steps": STEPS, "width": SIDE, "height": SIDE},
            "sweep": {"seeds": 2},
            "output": {
                "uri": str(work / name / "out"),
                "image_format": out_format,
                "samples_per_shard": samples_per_shard,
            },
            "safety": {"detector": "none"},
            "resources": {"batch_size": 2, "max_workers": 1},
        }
        for section, values in sections.items():
            job[section] = {**job.get(section, {}), **values}
        if job["model"].get("task") == "inpaint":  # it makes each image at its input's size
            job["generation"] = {"num_inference_steps": STEPS}
        return job

    return {
        "jpeg-clip": spec(
            "jpeg-clip",
            "jpeg",
            4,
            safety={"detector": "clip-checker", "model": str(models / "tiny-clip-checker")},
        ),
        "webp-sweep": spec(
            "webp-sweep",
            "webp",
            4,
            sweep={
                "seeds": 1,
                "axes": {
                    "num_inference_steps": [2, 3],
                    "scheduler": ["EulerDiscreteScheduler", "DDIMScheduler"],
                },
            },
        ),
        "inpaint": spec(
            "inpaint",
            "png",
            4,
            model={"source": str(models / "tiny-sd2-inpaint"), "task": "inpaint"},
            input={"image_column": "image", "mask_column": "mask"},
        ),
        "best-of-n": spec(
            "best-of-n",
            "png",
            6,
            sweep={"seeds": 1},
            curation={
                "clip_model": str(models / "tiny-clip"),
                "aesthetic_model": str(models / "tiny-aesthetic.safetensors"),
                "min_clip_score": MIN_CLIP_SCORE,
                "images_per_prompt": 1,
                "max_candidates": 3,
                "save_embeddings": True,
            },
        ),
    }


def run_jobs(work: Path, env: dict, only: list[str] | None) -> dict[str, Path]:
    """Run the jobs; their output folders by job name."""
    import yaml

    timings = {}
    timings["tiny-models"] = sdfleet(work, env, "tiny-models", str(work / "models"))
    outputs = {}
    if not only or "demo" in only:
        # `sdfleet demo DIR` finds DIR/models made, writes DIR/prompts and DIR/demo.yaml, runs.
        timings["demo"] = sdfleet(work, env, "demo", str(work))
        outputs["demo"] = work / "output"
    for name, spec in job_specs(work).items():
        if only and name not in only:
            continue
        inputs = inpaint_inputs() if name == "inpaint" else {}
        write_prompts(work / name / "in", **inputs)
        path = work / name / "job.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        timings[name] = sdfleet(work, env, "run", str(path), "--no-progress")
        outputs[name] = work / name / "out"
    for what, seconds in timings.items():
        print(f"{what:12} {seconds:6.1f} s", file=sys.stderr)
    return outputs


# ------------------------------------------------------------------------------ digests


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical(value):
    """A JSON-able form of a cell that keeps every bit: floats by repr, bytes by hex."""
    if isinstance(value, float):
        return {"float": repr(value)}
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [canonical(v) for v in value]
    if hasattr(value, "isoformat"):
        return {"time": value.isoformat()}
    return value


def rows_digest(path: Path) -> dict:
    """The rows less the run columns, in file order, with their schema; and one digest per column."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    # Recorded to show which run columns vary, never compared.
    run = {
        name: sha256(json.dumps(canonical(table.column(name).to_pylist())).encode())
        for name in table.column_names
        if name in RUN_COLUMNS
    }
    kept = [name for name in table.column_names if name not in RUN_COLUMNS]
    table = table.select(kept)
    schema = [str(field) for field in table.schema]
    columns = {
        name: sha256(json.dumps(canonical(table.column(name).to_pylist())).encode())
        for name in kept
    }
    rows = canonical(table.to_pylist())
    whole = sha256(json.dumps({"schema": schema, "rows": rows}, sort_keys=True).encode())
    return {"rows": whole, "num_rows": table.num_rows, "columns": columns, "run_columns": run}


def card_digest(path: Path) -> dict:
    text = path.read_text()
    for mask in CARD_MASKS:
        text = mask.sub("<masked: varies between runs>", text)
    return {"masked_sha256": sha256(text.encode()), "lines": len(text.splitlines())}


def output_digests(out: Path) -> dict[str, dict]:
    digests = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        name = path.relative_to(out).as_posix()
        if SKIPPED.match(name):
            continue
        if name.endswith(".parquet"):
            digests[name] = rows_digest(path)
        elif name == "README.md":
            digests[name] = card_digest(path)
        else:
            digests[name] = {"sha256": sha256(path.read_bytes()), "bytes": path.stat().st_size}
    return digests


def model_digests(models: Path) -> dict[str, str]:
    """The tiny models' files: a difference here explains any difference in the outputs."""
    return {
        p.relative_to(models).as_posix(): model_file_digest(p)
        for p in sorted(models.rglob("*"))
        if p.is_file()
    }


def model_file_digest(path: Path) -> str:
    """sha256 of the file; of a .safetensors file, of its header's JSON with sorted keys and its
    data, because safetensors writes its header's keys (the metadata's too) in hash-map order,
    which varies from one write to the next."""
    data = path.read_bytes()
    if path.suffix != ".safetensors":
        return sha256(data)
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    return sha256(json.dumps(header, sort_keys=True).encode() + data[8 + size :])


def make_digests(work: Path, only: list[str] | None, run: bool = True) -> dict:
    start = time.monotonic()
    if run:
        fresh_work(work)
        ray_tmp = Path(tempfile.mkdtemp(prefix="sdf-oi-", dir="/tmp"))  # short: Ray's socket paths
        try:
            outputs = run_jobs(work, environment(ray_tmp), only)
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)
    else:
        outputs = {
            "demo": work / "output",
            **{name: work / name / "out" for name in job_specs(work)},
        }
        outputs = {name: out for name, out in outputs.items() if not only or name in only}
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"],
        check=False,
        cwd=Path(__file__).resolve().parent,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "meta": {
            "work": str(work),
            "commit": commit,
            "python": sys.executable,
            "seconds": round(time.monotonic() - start, 1),
            "run_columns_left_out": list(RUN_COLUMNS),
            "card_masks": [m.pattern for m in CARD_MASKS],
        },
        "models": model_digests(work / "models"),
        "jobs": {name: output_digests(out) for name, out in outputs.items()},
    }


# ------------------------------------------------------------------------------ comparing


def differences(a: dict, b: dict) -> list[str]:
    found = []
    if a["meta"]["work"] != b["meta"]["work"]:
        found.append(
            f"made in different work folders ({a['meta']['work']} vs {b['meta']['work']}): "
            "model paths in rows and tars differ for that alone; rerun with the same --work"
        )
    for group in ("models", "jobs"):
        for name in sorted(set(a[group]) | set(b[group])):
            if group == "jobs" and (name not in a["jobs"] or name not in b["jobs"]):
                found.append(f"job {name}: only in {'A' if name in a['jobs'] else 'B'}")
                continue
            if group == "models":
                # A model that only one side writes (a family added since the baseline) is no
                # job's input here; a model both write must be the same bytes.
                if (
                    name in a["models"]
                    and name in b["models"]
                    and a["models"][name] != b["models"][name]
                ):
                    found.append(f"models/{name}: differs")
                continue
            found += file_differences(name, a["jobs"][name], b["jobs"][name])
    return found


def compared(digest: dict) -> dict:
    return {k: v for k, v in digest.items() if k != "run_columns"}


def file_differences(job: str, a: dict, b: dict) -> list[str]:
    found = []
    for name in sorted(set(a) | set(b)):
        where = f"{job}: {name}"
        if name not in a or name not in b:
            found.append(f"{where}: only in {'A' if name in a else 'B'}")
        elif compared(a[name]) != compared(b[name]):
            if "columns" in a[name]:
                cols = sorted(
                    c
                    for c in set(a[name]["columns"]) | set(b[name]["columns"])
                    if a[name]["columns"].get(c) != b[name]["columns"].get(c)
                )
                rows = (a[name]["num_rows"], b[name]["num_rows"])
                found.append(
                    f"{where}: rows differ (rows {rows[0]} vs {rows[1]}; columns: "
                    f"{', '.join(cols) or 'none; schema or order'})"
                )
            else:
                found.append(f"{where}: differs ({a[name]} vs {b[name]})")
    return found


def compare(path_a: str, path_b: str) -> int:
    a, b = (json.loads(Path(p).read_text()) for p in (path_a, path_b))
    found = differences(a, b)
    files = sum(len(files) for files in a["jobs"].values())
    for line in found:
        print(line)
    if found:
        print(f"{len(found)} difference(s) between {path_a} and {path_b}")
        return 1
    print(
        f"identical: {len(a['jobs'])} jobs ({', '.join(a['jobs'])}), {files} files, "
        f"{len(a['models'])} model files"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the digests of a fresh run here")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"(default {DEFAULT_WORK})")
    parser.add_argument("--jobs", help="comma-separated subset of the jobs (default: all)")
    parser.add_argument(
        "--no-run", action="store_true", help="digest the outputs already in --work; run nothing"
    )
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two digest files")
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        parser.error("give --out FILE or --compare A B")
    only = args.jobs.split(",") if args.jobs else None
    digests = make_digests(args.work.absolute(), only, run=not args.no_run)
    Path(args.out).write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out} ({digests['meta']['seconds']} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

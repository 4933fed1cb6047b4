"""The whole path through the CLI: prompts on S3 (moto over HTTP) -> Ray with 2 logical GPUs -> dataset on S3."""

import hashlib
import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import job_dict, run_cli, write_prompts, write_spec

pytestmark = pytest.mark.slow

N_ROWS = (5, 4)  # two files, several row groups each
SAMPLES = sum(N_ROWS) * 2 * 2  # 2 seeds x 2 guidance scales


def read_rows(s3, prefix):
    tables = []
    for path in sorted(s3.glob(f"{prefix}/*.parquet")):
        with s3.open(path, "rb") as f:
            tables.append(pq.read_table(f))
    return [row for t in tables for row in t.to_pylist()]


def tar_members(s3, path):
    with tarfile.open(fileobj=io.BytesIO(s3.cat_file(path))) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_model, ray_cluster, s3_endpoint):
    """Upload prompts and the model to S3, run the job once through the CLI, return what a user has."""
    import uuid

    import s3fs

    s3 = s3fs.S3FileSystem()
    bucket = f"e2e-{uuid.uuid4().hex[:8]}"
    s3.mkdir(bucket)
    n = 0
    for i, size in enumerate(N_ROWS):
        prompts = [f"a photo of scene {n + j}, detailed" for j in range(size)]
        write_prompts(
            f"{bucket}/prompts/part-{i}.parquet",
            prompts,
            [f"scene-{n + j}" for j in range(size)],
            storage=s3,
            topic=[f"t{(n + j) % 3}" for j in range(size)],
        )
        n += size
    s3.put(str(tiny_model), f"{bucket}/models/tiny-sd2", recursive=True)

    tmp = tmp_path_factory.mktemp("e2e")
    spec = job_dict(
        f"s3://{bucket}/models/tiny-sd2",
        f"s3://{bucket}/prompts/",
        f"s3://{bucket}/out/run1",
        name="e2e",
        model={"scheduler": "EulerDiscreteScheduler"},
        input={"passthrough_columns": ["topic"]},
        generation={"num_inference_steps": 3, "width": 64, "height": 64},
        sweep={"seeds": 2, "axes": {"guidance_scale": [3.0, 7.5]}},
        output={"image_format": "png", "samples_per_shard": 6},
        resources={"batch_size": 3, "max_workers": 4},
    )
    spec_path = write_spec(tmp, spec, "job.yaml")
    env = {}
    first = run_cli(
        "run", str(spec_path), "--address", ray_cluster.address, "--no-progress", env=env
    )
    return {
        "s3": s3,
        "bucket": bucket,
        "spec": spec_path,
        "env": env,
        "first": first,
        "tmp": tmp,
        "address": ray_cluster.address,
        "model_cache": ray_cluster.model_cache,
    }


def test_job_succeeds_and_writes_the_layout(job):
    s3, out = job["s3"], f"{job['bucket']}/out/run1"
    assert job["first"].returncode == 0, job["first"].stderr[-3000:]
    names = {p.rsplit("/", 1)[-1] for p in s3.ls(out)}
    shards = [f"{i:05d}" for i in range(-(-SAMPLES // 6))]
    for shard in shards:
        assert {f"{shard}.tar", f"{shard}.parquet", f"{shard}_stats.json"} <= names
    assert {"_job.json", "sizes.json", "README.md", "_SUCCESS"} <= names
    stats = json.loads(s3.cat_file(f"{out}/00000_stats.json"))
    # What the engine did in fact: the spec's batch of 3, the CPU-safe speed-ups (compile is CUDA-only).
    assert stats["batch_size"] == 3
    assert stats["engine_speed_ups"] == ["channels_last", "fuse_qkv", "uint8_on_device"]
    assert (
        stats["started_ts"]
        <= stats["generate_started_ts"]
        <= stats["generate_finished_ts"]
        <= stats["finished_ts"]
    )
    sizes = json.loads(s3.cat_file(f"{out}/sizes.json"))
    assert sum(sizes.values()) == SAMPLES and set(sizes) == {f"{s}.tar" for s in shards}
    record = json.loads(s3.cat_file(f"{out}/_job.json"))
    assert record["num_samples"] == SAMPLES and len(record["input_files"]) == 2
    assert record["versions"]["diffusers"] and record["fingerprint"]


def test_every_planned_sample_has_exactly_one_row_and_both_gpus_worked(job):
    rows = read_rows(job["s3"], f"{job['bucket']}/out/run1")
    assert len(rows) == SAMPLES
    assert len({r["key"] for r in rows}) == SAMPLES
    assert len({r["sample_id"] for r in rows}) == SAMPLES
    assert {r["status"] for r in rows} == {"ok"}
    assert {r["gpu_id"] for r in rows} == {"0", "1"}
    assert len({r["worker_id"] for r in rows}) == 2
    r = rows[0]
    assert r["generator_device"] == "cpu" and r["device"] == "cpu" and r["dtype"] == "float32"
    assert r["scheduler"] == "EulerDiscreteScheduler" and r["num_inference_steps"] == 3
    assert r["topic"] == "t0" and r["prompt_id"] == "scene-0"
    assert r["nsfw_score"] is None and r["safety_detector"] is None  # no detector ran
    from sdfleet.schemas.rows import OUTPUT_COLUMNS

    assert set(OUTPUT_COLUMNS) <= set(r)


def test_tars_open_with_webdataset_and_match_the_parquet(job, tmp_path):
    import webdataset as wds

    s3, out = job["s3"], f"{job['bucket']}/out/run1"
    local = []
    for path in sorted(s3.glob(f"{out}/*.tar")):
        dest = tmp_path / path.rsplit("/", 1)[-1]
        s3.get(path, str(dest))
        local.append(str(dest))
    samples = list(wds.WebDataset(local, shardshuffle=False))
    rows = {r["key"]: r for r in read_rows(s3, out) if r["status"] == "ok"}
    assert {s["__key__"] for s in samples} == set(rows)
    for s in samples:
        row = rows[s["__key__"]]
        assert hashlib.sha256(s["png"]).hexdigest() == row["image_sha256"]
        assert s["txt"].decode() == row["prompt"]
        meta = json.loads(s["json"])
        assert meta["seed"] == row["seed"] and meta["sample_id"] == row["sample_id"]
        assert "worker_id" not in meta  # run-specific columns stay in the Parquet only

    import datasets

    ds = datasets.load_dataset("webdataset", data_files={"train": local}, split="train")
    assert len(ds) == SAMPLES and ds[0]["png"].size == (64, 64)


def test_images_match_plain_diffusers(job, tiny_model):
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    s3, out = job["s3"], f"{job['bucket']}/out/run1"
    rows = read_rows(s3, out)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, use_safetensors=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for row in (rows[0], rows[7], rows[-1]):
        ref = pipe(
            row["prompt"],
            negative_prompt=row["negative_prompt"],
            num_inference_steps=row["num_inference_steps"],
            guidance_scale=row["guidance_scale"],
            width=row["width"],
            height=row["height"],
            generator=torch.Generator(row["generator_device"]).manual_seed(row["seed"]),
        ).images[0]
        members = tar_members(s3, f"{out}/{row['shard_id']:05d}.tar")
        ours = np.asarray(Image.open(io.BytesIO(members[f"{row['key']}.png"])))
        assert np.abs(ours.astype(int) - np.asarray(ref).astype(int)).max() <= 2


def test_rerun_generates_nothing(job):
    s3, out = job["s3"], f"{job['bucket']}/out/run1"
    before = {p: s3.info(p)["LastModified"] for p in s3.glob(f"{out}/*_stats.json")}
    again = run_cli(
        "run", str(job["spec"]), "--address", job["address"], "--no-progress", env=job["env"]
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to generate" in again.stderr
    s3.invalidate_cache()
    assert {p: s3.info(p)["LastModified"] for p in s3.glob(f"{out}/*_stats.json")} == before
    status = run_cli("status", f"s3://{out}")
    assert status.returncode == 0 and "complete     yes" in status.stdout


def test_new_output_is_byte_identical(job):
    s3, bucket = job["s3"], job["bucket"]
    second = run_cli(
        "run",
        str(job["spec"]),
        "--address",
        job["address"],
        "--no-progress",
        "--set",
        f"output.uri=s3://{bucket}/out/run2",
        env=job["env"],
    )
    assert second.returncode == 0, second.stderr[-3000:]
    tars1 = sorted(s3.glob(f"{bucket}/out/run1/*.tar"))
    tars2 = sorted(s3.glob(f"{bucket}/out/run2/*.tar"))
    assert [p.rsplit("/", 1)[-1] for p in tars1] == [p.rsplit("/", 1)[-1] for p in tars2]
    for a, b in zip(tars1, tars2):
        assert s3.cat_file(a) == s3.cat_file(b)
    # The s3:// model was copied to the node's cache once (two actors, two jobs), then reused. The
    # cache is the session cluster's, so other tests' models may be in it beside this one.
    model = f"s3://{bucket}/models/tiny-sd2"
    manifests = (job["model_cache"] / "models").glob("*/.sdfleet-manifest.json")
    copies = [m.parent for m in manifests if json.loads(m.read_text())["source"] == model]
    assert len(copies) == 1 and (copies[0] / "model_index.json").exists()


def test_resume_with_changed_spec_is_refused(job):
    out = run_cli(
        "run",
        str(job["spec"]),
        "--address",
        job["address"],
        "--no-progress",
        "--set",
        "generation.num_inference_steps=4",
        env=job["env"],
    )
    assert out.returncode == 1
    assert "generation.num_inference_steps" in out.stderr and "different job" in out.stderr


def test_metrics_are_exported_to_prometheus(job, ray_cluster):
    """ray.util.metrics from the actors reach the node's Prometheus endpoint."""
    import time
    import urllib.request

    port = ray_cluster.metrics_port
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        )
        if "sdfleet_shards_committed" in text:
            break
        time.sleep(2)
    values = {}
    for line in text.splitlines():
        if line.startswith("ray_sdfleet_") and 'job="e2e"' in line:
            name = line.split("{", 1)[0]
            values[name] = values.get(name, 0) + float(line.rsplit(" ", 1)[1])
    assert (
        values.get("ray_sdfleet_images_generated_total", values.get("ray_sdfleet_images_generated"))
        >= SAMPLES
    )
    assert any(k.startswith("ray_sdfleet_shard_seconds") for k in values)


def test_openclip_pandas_and_datasets_read_the_output(job, tmp_path):
    """OpenCLIP's webdataset loader counts samples from sizes.json by tar basename and reads .txt
    captions; the Parquet loads with pandas and with datasets."""
    import glob
    import os

    import datasets
    import pandas as pd

    s3, out = job["s3"], f"{job['bucket']}/out/run1"
    s3.get(f"{out}/", str(tmp_path), recursive=True)
    tars = sorted(glob.glob(str(tmp_path / "*.tar")))
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    assert (
        sum(int(sizes[os.path.basename(t)]) for t in tars) == SAMPLES
    )  # open_clip's get_dataset_size
    parquet = sorted(glob.glob(str(tmp_path / "*.parquet")))
    frame = pd.concat(map(pd.read_parquet, parquet))
    assert len(frame) == SAMPLES and frame["key"].is_unique
    ds = datasets.load_dataset("parquet", data_files=parquet, split="train")
    assert len(ds) == SAMPLES and set(ds.column_names) >= {"key", "prompt", "seed", "nsfw_scores"}

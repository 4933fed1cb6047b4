"""`sdfleet run` as a Ray job: `ray job submit --working-dir` to a head started with `ray start`.

The job's driver runs on the cluster, from the uploaded working dir, and reads and writes S3 with the
endpoint and credentials the head was started with.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
import uuid

import pytest

from clusters import VENV_BIN, Sampler, make_temp_dir, start_head
from helpers import REPO, TINY_GENERATION, job_dict, rows_of, wait_for, write_prompts, write_spec

pytestmark = pytest.mark.slow

N_PROMPTS, SEEDS, PER_SHARD = 8, 2, 3  # 16 samples in 6 shards
# What the working dir must not carry to the cluster. Ray honours .gitignore (which lists .venv/),
# but not .git, and RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 would turn .gitignore off: say it outright.
EXCLUDES = [
    ".git",
    ".venv",
    "**/__pycache__",
    ".pytest_cache",
    "sdfleet-demo",
    "*.egg-info",
    "build",
]


@pytest.fixture
def job_head(s3_endpoint):
    """A head with 2 logical GPUs and the dashboard (job submission needs it), with the S3 settings in
    its environment (from s3_endpoint), so every process of the cluster, the job's driver included,
    reaches the test's S3 server."""
    temp_dir = make_temp_dir("sdf-js-")
    head = start_head(
        "--num-cpus=2",
        "--num-gpus=2",
        "--object-store-memory=200000000",
        temp_dir=temp_dir,
        env={"SDFLEET_CACHE": str(temp_dir / "cache")},
    )
    try:
        yield head
    finally:
        head.stop()


def ray_cli(head, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "ray"), *args],
        cwd=REPO,
        env=head.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def jobs_api_up(head) -> bool:
    try:
        with urllib.request.urlopen(f"{head.dashboard_url}/api/jobs/", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def job_status(head, job_id: str) -> str:
    """The status `ray job status` prints. It words the end states its own way: "Job 'x' succeeded",
    "Job 'x' failed", "Job 'x' was stopped"; anything else as "Status for job 'x': RUNNING"."""
    done = ray_cli(
        head,
        "job",
        "status",
        "--address",
        head.dashboard_url,
        "--log-style",
        "record",
        "--log-color",
        "false",
        job_id,
    )
    text = done.stdout + done.stderr
    for word, status in (
        ("succeeded", "SUCCEEDED"),
        ("failed", "FAILED"),
        ("was stopped", "STOPPED"),
    ):
        if f"Job '{job_id}' {word}" in text:
            return status
    found = re.search(rf"Status for job '{re.escape(job_id)}': (\w+)", text)
    return found.group(1) if found else ""


def test_ray_job_submit_runs_a_job_to_completion(tmp_path, tiny_model, s3_endpoint, job_head):
    import s3fs

    head = job_head
    t0 = time.monotonic()
    fs = s3fs.S3FileSystem()
    bucket = f"job-submit-{uuid.uuid4().hex[:10]}"
    fs.mkdir(bucket)
    write_prompts(
        f"{bucket}/prompts/p.parquet",
        [f"a harbour in the rain, variation {i}" for i in range(N_PROMPTS)],
        storage=fs,
        row_group_size=3,
    )
    out = f"s3://{bucket}/dataset"
    spec = job_dict(
        tiny_model,
        f"s3://{bucket}/prompts/",
        out,
        name="job-submit",
        model={"scheduler": "EulerDiscreteScheduler"},
        generation=TINY_GENERATION,
        sweep={"seeds": SEEDS},
        output={"image_format": "png", "samples_per_shard": PER_SHARD},
        resources={"batch_size": 3},
    )
    # Same machine: the driver reads the spec where it is.
    spec_path = write_spec(tmp_path, spec, "job.yaml")

    wait_for(lambda: jobs_api_up(head), 60, "the dashboard's job API")
    job_id = f"sdfleet-{uuid.uuid4().hex[:8]}"
    with Sampler(head) as sampler:
        submit = ray_cli(
            head,
            "job",
            "submit",
            "--address",
            head.dashboard_url,
            "--submission-id",
            job_id,
            "--working-dir",
            str(REPO),
            "--runtime-env-json",
            json.dumps({"excludes": EXCLUDES}),
            "--no-wait",
            "--",
            "sdfleet",
            "run",
            str(spec_path),
            "--no-progress",
        )
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        status, deadline = "", time.monotonic() + 240
        while status not in ("SUCCEEDED", "FAILED", "STOPPED") and time.monotonic() < deadline:
            time.sleep(2)
            status = job_status(head, job_id)
        job_s = time.monotonic() - t0
    logs = ray_cli(head, "job", "logs", "--address", head.dashboard_url, job_id)
    assert status == "SUCCEEDED", (
        f"job {job_id} is {status or 'unknown'}:\n{logs.stdout[-4000:]}{logs.stderr[-2000:]}"
    )
    assert "dataset complete: 16 images" in logs.stdout, logs.stdout[-3000:]

    # The job's working dir (its cwd, first on its PYTHONPATH) is the source tree, without venv or git store.
    unpacked = [
        p
        for p in head.temp_dir.glob("session_latest/runtime_resources/working_dir_files/*")
        if p.is_dir()
    ]
    assert len(unpacked) == 1 and (unpacked[0] / "jobs" / "cli.py").exists(), unpacked
    assert not (unpacked[0] / ".venv").exists() and not (unpacked[0] / ".git").exists()
    size = sum(f.stat().st_size for f in unpacked[0].rglob("*") if f.is_file())
    assert size < 10 * 2**20, f"{size} bytes uploaded"

    # Every planned sample has exactly one row; the dataset is marked complete.
    from sdfleet.actors.storage import Storage

    storage = Storage(out)
    rows = rows_of(out)
    samples = N_PROMPTS * SEEDS
    assert len(rows) == samples
    assert (
        len({r["key"] for r in rows}) == samples and len({r["sample_id"] for r in rows}) == samples
    )
    assert all(r["status"] == "ok" for r in rows)
    assert storage.list("*_stats.json") == [
        f"{i:05d}_stats.json" for i in range(-(-samples // PER_SHARD))
    ]
    assert storage.exists("_SUCCESS")
    assert sum(json.loads(storage.read_bytes("sizes.json")).values()) == samples
    # Made by GPU actors on the head's logical GPUs.
    assert {r["gpu_id"] for r in rows} <= {"0", "1"}, {r["gpu_id"] for r in rows}
    print(
        f"\n[job submit] job finished {job_s:.1f}s after submission ({size / 2**10:.0f} KiB uploaded); "
        f"{sampler.summary()}"
    )

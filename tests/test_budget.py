"""resources.budget_usd counts every attempt's GPU-seconds, committed or not (issue 29, item 5):
through the CLI, Ray with 2 logical GPUs, and S3 over HTTP behind the fault-injecting proxy."""

from __future__ import annotations

import re

from helpers import committed, job_spec, output_storage, run_cli
from s3proxy import Rule, S3Proxy
from sdfleet.schemas import layout


def test_shards_that_fail_after_generating_stop_at_the_budget(
    tmp_path, tiny_model, ray_cluster, bucket, s3_endpoint
):
    """Every commit is refused (403 on the stats file, after the images are made). At $1 per
    GPU-second and a $0.001 budget the job stops after the attempts in the worker's hands, not
    after 8 shards x 3 attempts; status says what was spent; a rerun starts nothing."""
    proxy = S3Proxy(
        s3_endpoint, [Rule(path=r"/failing/\d+_stats\.json", action="403", methods=("PUT",))]
    )
    try:
        out = f"s3://{bucket.bucket}/failing"
        spec = job_spec(
            tmp_path,
            tiny_model,
            bucket,
            out,
            resources={"max_workers": 1, "budget_usd": 0.001, "gpu_hour_usd": 3600.0},
        )
        run = ("run", str(spec), "--address", ray_cluster.address, "--no-progress")
        env = {"AWS_ENDPOINT_URL": proxy.url}
        done = run_cli(*run, env=env)
        assert done.returncode == 2, done.stderr[-3000:]
        assert "stopped at the budget" in done.stderr
        attempts = proxy.rules[0].fired
        assert 1 <= attempts <= 2  # one worker holds two shards at most
        assert committed(out) == []
        spent = output_storage(out).read_json(layout.SPENT_FILE)
        assert spent["attempts"] == attempts and spent["gpu_seconds"] > 0

        status = run_cli("status", out)
        [line] = [line for line in status.stdout.splitlines() if line.startswith("gpu time")]
        assert "0.0 GPU-s ($0.00) in committed shards" in line
        assert f"in {attempts} attempt(s) that committed nothing" in line
        shown = float(re.search(r"gpu time\s+([\d.]+) GPU-s", line).group(1))
        assert shown == round(spent["gpu_seconds"], 1)

        again = run_cli(*run, env=env)
        assert again.returncode == 2 and "stopped at the budget" in again.stderr
        assert proxy.rules[0].fired == attempts  # nothing started
    finally:
        proxy.close()

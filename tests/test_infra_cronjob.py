"""The nightly CronJob (infra/kuberay/cronjob.yaml): its manifest, and its submit script run for real
against a local Ray head with token auth.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from zoneinfo import ZoneInfo

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clusters import make_temp_dir, start_head
from helpers import check_sdfleet_command, cron_pod_spec, job_dict, wait_for, write_spec

CRON_FIELDS = [
    (0, 59, {}),
    (0, 23, {}),
    (1, 31, {}),
    (
        1,
        12,
        {
            m: i + 1
            for i, m in enumerate(
                ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
            )
        },
    ),
    (0, 7, {d: i for i, d in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])}),
]


def valid_cron(expr: str) -> bool:
    """A standard 5-field cron expression, as Kubernetes' CronJob parses them (no macros)."""
    fields = expr.split()
    if len(fields) != 5:
        return False
    for field, (lo, hi, names) in zip(fields, CRON_FIELDS):
        for part in field.split(","):
            m = re.fullmatch(r"(\*|\?|[a-z0-9]+(?:-[a-z0-9]+)?)(?:/(\d+))?", part.lower())
            if not m or (m.group(2) is not None and int(m.group(2)) == 0):
                return False
            if m.group(1) in ("*", "?"):
                continue
            bounds = [names.get(x, x) for x in m.group(1).split("-")]
            if not all(isinstance(b, int) or b.isdigit() for b in bounds):
                return False
            bounds = [int(b) for b in bounds]
            if not all(lo <= b <= hi for b in bounds) or bounds != sorted(bounds):
                return False
    return True


@pytest.mark.parametrize(
    "expr,ok",
    [
        ("0 2 * * *", True),
        ("*/15 0-6 * * mon-fri", True),
        ("30 1 1,15 * *", True),
        ("0 2 * *", False),
        ("60 2 * * *", False),
        ("0 24 * * *", False),
        ("@nightly", False),
        ("0 2 * * 8", False),
        ("*/0 * * * *", False),
        ("0 5-2 * * *", False),
    ],
)
def test_the_cron_check_accepts_standard_schedules_only(expr, ok):
    assert valid_cron(expr) is ok


def test_cronjob_submits_one_run_at_a_time_to_the_raycluster_with_its_token(
    cronjob, raycluster, configmap, service_account
):
    assert cronjob["apiVersion"] == "batch/v1"
    assert cronjob["kind"] == "CronJob"
    spec = cronjob["spec"]
    assert valid_cron(spec["schedule"]), spec["schedule"]
    ZoneInfo(spec.get("timeZone", "Etc/UTC"))
    assert spec["concurrencyPolicy"] == "Forbid"
    assert isinstance(spec["startingDeadlineSeconds"], int) and spec["startingDeadlineSeconds"] > 0
    job = spec["jobTemplate"]["spec"]
    assert isinstance(job["backoffLimit"], int) and job["backoffLimit"] >= 0
    # A daily schedule under Forbid: a pod that could live past the next run would skip it.
    assert job["activeDeadlineSeconds"] < 24 * 3600
    pod = cron_pod_spec(cronjob)
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    assert pod["serviceAccountName"] == service_account["metadata"]["name"]
    [c] = pod["containers"]
    command = c["command"] + c.get("args", [])
    entries = [w for w in command if w.startswith("sdfleet run")]
    assert len(entries) == 1, (
        f"the CronJob's command/args should hold one `sdfleet run` entrypoint: {c.get('args')}"
    )
    [entry] = entries
    check_sdfleet_command(entry)
    assert "--no-progress" in entry

    env = {e["name"]: e for e in c["env"]}
    # It submits to the RayCluster's head service (KubeRay names it <cluster>-head-svc) ...
    url = env["RAY_API_SERVER_ADDRESS"]["value"]
    assert url == f"http://{raycluster['metadata']['name']}-head-svc:8265"
    # ... with the cluster's token, from the Secret KubeRay creates for authOptions: token.
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    secret = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert secret == {"name": raycluster["metadata"]["name"], "key": "auth_token"}
    # ... shipping the ConfigMap's spec, which the entrypoint names relative to the working_dir.
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    [name] = [n for n, path in mounts.items() if path == env["SDFLEET_SPEC_DIR"]["value"]]
    assert volumes[name]["configMap"]["name"] == configmap["metadata"]["name"]
    assert shlex.split(entry)[2] in configmap["data"]
    compile(c["command"][2], "cronjob.yaml", "exec")


@pytest.fixture
def token_ray_head(tmp_path):
    """A Ray head with its dashboard (the job API) and token auth (`clusters.start_head`)."""
    home = tmp_path / "home"  # the token stays out of the real ~/.ray
    home.mkdir()
    token = "sdfleet-test-" + os.urandom(16).hex()
    head = start_head(
        "--num-cpus=2",
        "--num-gpus=0",
        temp_dir=make_temp_dir("sdf-infra-"),
        env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "HOME": str(home)},
    )
    try:
        wait_for(head.dashboard_answers, 120, "the dashboard")
        yield head
    finally:
        head.stop()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cronjob_script_submits_follows_and_reports(cronjob, token_ray_head, tmp_path, tiny_model):
    # The CronJob's own script, run against a real Ray job API with token auth. The entrypoint is
    # `sdfleet plan` (no GPU here); everything else is what the pod does.
    url, cluster_env = token_ray_head.dashboard_url, token_ray_head.env
    [c] = cron_pod_spec(cronjob)["containers"]
    script = c["command"][2]
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt_id": ["a", "b", "c"], "prompt": ["x", "y", "z"]}), prompts)
    specs = tmp_path / "specs"
    specs.mkdir()
    write_spec(
        specs, job_dict(tiny_model, prompts, tmp_path / "out", name="cron-check"), "job.yaml"
    )
    (specs / "..data").mkdir()  # as in a ConfigMap volume: not shipped
    env = {
        **cluster_env,
        "RAY_API_SERVER_ADDRESS": url,
        "SDFLEET_SPEC_DIR": str(specs),
        "SDFLEET_POLL_S": "0.5",
        "SDFLEET_RETRY_S": "60",
    }

    def run(entrypoint: str, **extra) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", script, entrypoint],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=180,
        )

    # 1. Submits with the spec as working_dir, prints the job's log, exits 0 on success.
    r = run("sdfleet plan job.yaml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "submitted sdfleet-nightly-" in r.stdout
    assert "job           cron-check" in r.stdout and "samples       3" in r.stdout
    assert r.stdout.rstrip().endswith("SUCCEEDED")

    # 2. A failing job makes the pod fail (and the CronJob's backoffLimit retry it).
    r = run("sdfleet plan missing.yaml")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "cannot read spec 'missing.yaml'" in r.stdout and r.stdout.rstrip().endswith("FAILED")

    # 3. While an earlier run is still going, it follows that run instead of starting a second driver.
    pre = subprocess.run(
        [
            sys.executable,
            "-c",
            "from ray.job_submission import JobSubmissionClient as C\n"
            "print(C().submit_job(entrypoint='sleep 3; echo earlier-run-done',"
            " submission_id='sdfleet-nightly-00000000-000000'))",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert pre.returncode == 0, pre.stderr
    r = run("sdfleet plan job.yaml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sdfleet-nightly-00000000-000000 is still running: following it" in r.stdout
    assert "earlier-run-done" in r.stdout and "submitted" not in r.stdout

    # 4. Without the cluster's token it is refused, at once (a wrong token is not worth retrying).
    t0 = time.monotonic()
    r = run("sdfleet plan job.yaml", RAY_AUTH_MODE="disabled", RAY_AUTH_TOKEN="")
    assert r.returncode != 0
    assert time.monotonic() - t0 < 30
    assert "Unauthorized" in r.stderr or "authentication" in r.stderr.lower()

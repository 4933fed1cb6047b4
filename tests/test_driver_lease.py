"""One live driver per output (`_driver.json`), and a finished dataset free of earlier runs' records.

The fast tests take the lease directly (local folder and the S3 server); the slow ones run
`sdfleet run` twice through the CLI on one output, and complete a job that replaced another.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time

import pytest

from helpers import (
    assert_exactly_once,
    job_spec,
    output_storage,
    run_cli,
    start_cli,
    wait_for,
)
from sdfleet.actors.storage import Storage
from sdfleet.jobs.lease import LEASE_STALE_S, DriverLease
from sdfleet.schemas import layout
from sdfleet.schemas.errors import DriverRunning


def finished(proc) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> Storage:
    if request.param == "local":
        return Storage(str(tmp_path / "out"))
    return Storage(f"s3://{request.getfixturevalue('s3').bucket}/out")


def test_a_second_driver_is_refused_naming_the_first_until_it_releases(output):
    job = {"fingerprint": "f" * 32}
    with DriverLease(output, job).held():
        holder = DriverLease(output, job).running()
        assert holder and f"host {socket.gethostname()}, pid {os.getpid()}, since " in holder
        with pytest.raises(DriverRunning) as refused, DriverLease(output, job).held():
            pytest.fail("a second driver held a live lease")
        assert f"{output.url()} is being written by a running driver ({holder})" in str(
            refused.value
        )
    assert DriverLease(output, job).running() is None  # released
    with DriverLease(output, job).held():  # and taken again
        assert DriverLease(output, job).running()


def test_a_killed_driver_s_lease_lapses_and_is_taken_over(output):
    """A lease silent for LEASE_STALE_S (a SIGKILLed driver releases nothing) is nobody's."""
    silent = {
        "fingerprint": "f" * 32,
        "host": "gone",
        "pid": 1,
        "started_at": "2026-01-01T00:00:00+00:00",
        "released": False,
        "updated_ts": time.time() - LEASE_STALE_S - 1,
    }
    output.write_json(layout.DRIVER_FILE, silent)
    lease = DriverLease(output, {"fingerprint": "f" * 32})
    assert lease.running() is None
    with lease.held():
        assert output.read_json(layout.DRIVER_FILE)["pid"] == os.getpid()


def test_a_lease_of_a_gone_process_on_this_host_is_nobody_s(output):
    """A driver SIGKILLed on this host: its rerun goes on at once, not after LEASE_STALE_S. On
    another host the process cannot be looked at, so only the lease's age counts."""
    gone = subprocess.Popen(["true"])
    gone.wait()  # exited and reaped: its pid names no process
    fresh = {"fingerprint": "f" * 32, "started_at": "2026-12-07T00:00:00+00:00", "pid": gone.pid}
    output.write_json(
        layout.DRIVER_FILE, {**fresh, "host": socket.gethostname(), "updated_ts": time.time()}
    )
    assert DriverLease(output, fresh).running() is None
    output.write_json(layout.DRIVER_FILE, {**fresh, "host": "elsewhere", "updated_ts": time.time()})
    assert DriverLease(output, fresh).running() == (
        f"host elsewhere, pid {gone.pid}, since {fresh['started_at']}"
    )


# ------------------------------------------------------------------------------ through the CLI


@pytest.mark.slow
def test_a_second_run_on_a_live_driver_s_output_is_refused_and_the_first_completes(
    tmp_path, tiny_model, bucket, ray_cluster
):
    """A nightly job that overruns: the second `sdfleet run` exits 3 naming the first driver's
    host, pid and start, before any worker starts; `status` and `plan` show the driver; the first
    completes with every row once."""
    out = str(tmp_path / "out")
    lease_file = tmp_path / "out" / layout.DRIVER_FILE
    spec = str(job_spec(tmp_path, tiny_model, bucket, out, steps=100))
    args = ("--address", ray_cluster.address, "--no-progress")
    first = start_cli("run", spec, *args)
    try:
        wait_for(lease_file.exists, 120, "the first driver's lease")
        lease = json.loads(lease_file.read_text())
        assert lease["pid"] == first.pid and not lease["released"]
        holder = f"host {lease['host']}, pid {first.pid}, since {lease['started_at']}"

        # All three at once, while the first driver surely still runs.
        procs = [
            start_cli(*command)
            for command in (("run", spec, *args), ("status", out), ("plan", spec))
        ]
        second, status, plan = [finished(proc) for proc in procs]
        _, first_err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert second.returncode == 3, second.stderr[-3000:]
    [line] = [x for x in second.stderr.splitlines() if x.startswith("sdfleet: error:")]
    assert f"{out} is being written by a running driver ({holder})" in line
    assert "Traceback" not in second.stderr and not second.stdout.strip()
    assert f"driver       running: {holder}" in status.stdout
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert f"driver        running: {holder}" in plan.stdout
    assert re.search(r"run would +nothing: a running driver holds .*; run is refused", plan.stdout)

    assert first.returncode == 0, first_err[-3000:]
    assert_exactly_once(out)
    assert json.loads(lease_file.read_text())["released"]
    after = run_cli("status", out)
    assert "driver       none running" in after.stdout and after.returncode == 0


@pytest.mark.slow
def test_a_job_that_replaced_another_leaves_none_of_its_records(
    tmp_path, tiny_model, bucket, ray_cluster
):
    """The replaced job quarantined shards and spent GPU time, committing nothing: its
    `_failed.json` files and `_spent.json` are gone from the finished dataset."""
    out = tmp_path / "out"
    storage = output_storage(str(out))
    old = "0" * 32
    storage.write_json(
        layout.JOB_FILE,
        {
            "spec": {"name": "old"},
            "fingerprint": old,
            "fingerprint_fields": {},
            "input_files": [],
            "num_shards": 8,
            "num_samples": 24,
            "key_width": 5,
            "created_at": "2026-01-01T00:00:00+00:00",
        },
    )
    for shard in ("00002", "00005"):
        error = {"attempt": 1, "error": "RuntimeError: the old job's", "at": 0.0}
        storage.write_json(
            layout.failed_file(shard),
            {"shard_id": int(shard), "attempts": 1, "errors": [error], "fingerprint": old},
        )
    storage.write_json(layout.SPENT_FILE, {"fingerprint": old, "gpu_seconds": 9.0, "attempts": 3})

    spec = job_spec(tmp_path, tiny_model, bucket, str(out))
    done = run_cli("run", str(spec), "--address", ray_cluster.address, "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"held job {old}, which committed no shard" in done.stdout
    assert_exactly_once(str(out))
    assert storage.list(layout.FAILED_GLOB) == [] and not storage.exists(layout.SPENT_FILE)
    status = run_cli("status", str(out))
    assert status.returncode == 0 and "0 attempt(s) that committed nothing" in status.stdout

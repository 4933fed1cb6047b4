"""Kill anything, anytime: the rerun gives exactly the dataset an uninterrupted run gives.

Every fault is real or injected at the boundary only: a node of a real Ray cluster killed, actor and
driver processes killed with SIGKILL, S3 errors and hangs from an HTTP proxy in front of the local
S3 server, a shard whose output path cannot be written.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import re
import signal
import tarfile
import time

import pyarrow.parquet as pq
import pytest

from clusters import FAST_HEALTH_CHECKS, actor_pids, make_temp_dir, start_head
from helpers import (
    assert_exactly_once,
    bucket_with_prompts,
    committed,
    job_spec,
    output_storage,
    run_cli,
    same_dataset,
    start_cli,
    wait_for,
)
from s3proxy import Rule, S3Proxy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, ray_cluster, s3_endpoint):
    """One uninterrupted run, the dataset every fault test must reproduce exactly."""
    fs = bucket_with_prompts("reference")
    tmp = tmp_path_factory.mktemp("reference")
    out = f"s3://{fs.bucket}/reference"
    spec = job_spec(tmp, tiny_model, fs, out)
    done = run_cli("run", str(spec), "--address", ray_cluster.address, "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    return {"fs": fs, "out": out, "bucket": fs, "spec": spec, "tmp": tmp}


@pytest.fixture
def two_gpu_nodes(s3_endpoint):
    """A head without GPUs that notices a dead node within about a second, and two 1-GPU worker nodes."""
    head = start_head(
        "--num-cpus=2",
        "--num-gpus=0",
        "--object-store-memory=150000000",
        FAST_HEALTH_CHECKS,
        temp_dir=make_temp_dir("sdf-nd-"),
    )
    try:
        for _ in range(2):
            head.add_worker("--num-cpus=1", "--num-gpus=1", "--object-store-memory=150000000")
        yield head
    finally:
        head.stop()


def test_node_death_mid_run_finishes_on_the_surviving_node(
    tmp_path, tiny_model, bucket, two_gpu_nodes
):
    """A node holding a GPU actor dies mid-job; the job finishes on the other node."""
    head = two_gpu_nodes
    doomed, survivor = head.workers
    wait_for(head.dashboard_answers, 60, "the dashboard")
    wait_for(lambda: len(head.alive_nodes()) == 3, 60, "both worker nodes in the state API")
    survivor_id = head.node_id(survivor)
    out = f"s3://{bucket.bucket}/node-death"
    # Slow enough shards (60 steps, 2 samples each) that most start after the node is gone.
    spec = job_spec(tmp_path, tiny_model, bucket, out, steps=60, output={"samples_per_shard": 2})
    proc = start_cli("run", str(spec), "--address", head.address, "--no-progress")
    wait_for(lambda: committed(out), 120, "a first committed shard")
    assert doomed.kill()
    removed_at = time.time()
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    rows = assert_exactly_once(out, shards=12)
    assert survivor_id in {r["worker_node"] for r in rows}
    # Every shard started after the node was gone ran on the survivor. (The dead node's actor
    # may still commit the shard it was writing; its retry then finds it committed.)
    stats = [output_storage(out).read_json(n) for n in committed(out)]
    later = [s for s in stats if s["started_ts"] > removed_at + 0.5]
    assert later and {s["worker_node"] for s in later} == {survivor_id}


def run_and_signal_an_actor(
    tiny_model, ray_cluster, reference, name: str, sig: int
) -> tuple[str, str]:
    """The reference job into a new output; `sig` goes to the first actor seen running a shard.

    The moment is taken from the actor's process title (slower steps would change the images)."""
    out = f"s3://{reference['fs'].bucket}/{name}"
    spec = job_spec(reference["tmp"], tiny_model, reference["fs"], out)
    proc = start_cli("run", str(spec), "--address", ray_cluster.address, "--no-progress")
    pid = wait_for(
        lambda: actor_pids(ray_cluster, running_only=True), 120, "an actor running a shard"
    )[0]
    os.kill(pid, sig)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    return out, stderr


def test_actor_death_is_retried_and_replaced(tiny_model, ray_cluster, reference):
    out, stderr = run_and_signal_an_actor(
        tiny_model, ray_cluster, reference, "actor-death", signal.SIGKILL
    )
    assert_exactly_once(out)
    attempts = [output_storage(out).read_json(n)["attempt"] for n in committed(out)]
    if max(attempts) == 1:
        pytest.skip(
            "the killed actor had finished its shard before the signal landed"
        )  # pragma: no cover
    assert sorted(attempts)[-1] == 2 and attempts.count(2) == 1
    assert "worker died" in stderr and "starting a replacement worker" in stderr
    same_dataset(reference["out"], out)


def test_preempted_worker_requeues_its_shard_without_counting_an_attempt(
    tiny_model, ray_cluster, reference
):
    """SIGTERM, as spot reclaims and Kubernetes evictions send: the shard goes back uncounted."""
    out, stderr = run_and_signal_an_actor(
        tiny_model, ray_cluster, reference, "preempted", signal.SIGTERM
    )
    if "worker preempted" not in stderr:
        pytest.skip("the signalled actor had no shard left to abandon")  # pragma: no cover
    assert "starting a replacement worker" in stderr
    assert_exactly_once(out)
    assert [output_storage(out).read_json(n)["attempt"] for n in committed(out)] == [1] * 8
    same_dataset(reference["out"], out)


def test_budget_cap_stops_cleanly_and_a_higher_cap_completes(tiny_model, ray_cluster, reference):
    # $3600 per GPU-hour is $1 per GPU-second: the first committed shard spends the $0.005 budget (a
    # shard's GPU time is its turn on the pipeline, ~0.05 s here), and only the shards already handed
    # out (two per actor) finish after it.
    budget = 0.005
    out = f"s3://{reference['fs'].bucket}/budget"
    spec = job_spec(
        reference["tmp"],
        tiny_model,
        reference["fs"],
        out,
        resources={"gpu_hour_usd": 3600.0, "budget_usd": budget},
    )
    done = run_cli("run", str(spec), "--address", ray_cluster.address, "--no-progress")
    assert done.returncode == 2
    assert "stopped at the budget" in done.stderr and "budget_usd" in done.stderr
    first = committed(out)
    assert 1 <= len(first) <= 4
    assert not output_storage(out).exists("_SUCCESS")
    spent = sum(output_storage(out).read_json(n)["gpu_seconds"] for n in first)
    assert spent >= budget  # it stopped because the budget was spent, not before
    again = run_cli(
        "run",
        str(spec),
        "--set",
        "resources.budget_usd=100000",
        "--address",
        ray_cluster.address,
        "--no-progress",
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert_exactly_once(out)
    same_dataset(reference["out"], out)


def test_poison_shard_is_quarantined_and_the_rest_finish(tmp_path, tiny_model, bucket, ray_cluster):
    # A credential planted in the error's text (the output's path holds one): masked everywhere.
    secret = "hunter2hunter2"
    out = tmp_path / f"password={secret}" / "poison"
    (out / "00002.tar").mkdir(parents=True)  # every attempt to write shard 2's tar fails
    spec = job_spec(tmp_path, tiny_model, bucket, str(out), resources={"max_attempts": 2})
    done = run_cli("-v", "run", str(spec), "--address", ray_cluster.address, "--no-progress")
    assert done.returncode == 2
    assert "00002" in done.stderr and "IsADirectoryError" in done.stderr
    # -v: the worker's traceback, its own frames included, for each failed attempt.
    assert "shard 00002 attempt 1 failed: IsADirectoryError" in done.stderr
    worker_frame = re.compile(r'File "[^"]*/actors/\w+\.py", line \d+')
    assert "the worker's traceback" in done.stderr and worker_frame.search(done.stderr)
    failed = json.loads((out / "00002_failed.json").read_text())
    assert failed["attempts"] == 2 and len(failed["errors"]) == 2
    for attempt in failed["errors"]:
        error = attempt["error"]
        assert "ShardGenerator.run_attempt" in error and worker_frame.search(error), error
        assert error.strip().splitlines()[-1].startswith("IsADirectoryError")
        assert "password=***" in error
    assert secret not in done.stderr and secret not in (out / "00002_failed.json").read_text()
    assert len(committed(str(out))) == 7 and not (out / "00002_stats.json").exists()
    # Incomplete: neither the marker nor sizes.json, so no reader takes it for a dataset.
    assert not (out / "_SUCCESS").exists() and not (out / "sizes.json").exists()
    status = run_cli("status", str(out))
    assert status.returncode == 2
    assert (
        "7 committed, 0 pending, 1 quarantined" in status.stdout
        and "complete     no" in status.stdout
    )
    # Fix the cause and rerun the same command: only shard 2 is made, and the dataset completes.
    (out / "00002.tar").rmdir()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*_stats.json")}
    again = run_cli("run", str(spec), "--address", ray_cluster.address, "--no-progress")
    assert again.returncode == 0, again.stderr[-3000:]
    assert {
        p.name: p.stat().st_mtime_ns for p in out.glob("*_stats.json") if p.name in before
    } == before
    assert_exactly_once(str(out))


def test_driver_killed_then_rerun_is_byte_identical(tiny_model, ray_cluster, reference):
    out = f"s3://{reference['fs'].bucket}/driver-killed"
    spec = job_spec(reference["tmp"], tiny_model, reference["fs"], out)
    proc = start_cli("run", str(spec), "--address", ray_cluster.address, "--no-progress")
    wait_for(lambda: committed(out), 120, "a first committed shard")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    # The driver's actors go with it: Ray ends a dead job's actors.
    wait_for(lambda: not actor_pids(ray_cluster), 60, "the dead driver's actors to exit", poll=0.5)
    assert not output_storage(out).exists("_SUCCESS")
    again = run_cli("run", str(spec), "--address", ray_cluster.address, "--no-progress")
    assert again.returncode == 0, again.stderr[-3000:]
    assert_exactly_once(out)
    same_dataset(reference["out"], out)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_driver_says_how_far_it_got_and_a_rerun_resumes(
    sig, code, tiny_model, ray_cluster, reference
):
    """Ctrl-C (or a scheduler's SIGTERM): one line, exit 128 + signal, the job's actors released,
    nothing half-committed; the same command resumes into the dataset an uninterrupted run makes."""
    out = f"s3://{reference['fs'].bucket}/interrupted-{sig.name}"
    spec = job_spec(reference["tmp"], tiny_model, reference["fs"], out, steps=20)
    proc = start_cli("run", str(spec), "--address", ray_cluster.address, "--no-progress")
    wait_for(lambda: committed(out), 120, "a first committed shard")
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr[-3000:]
    [line] = [line for line in stderr.splitlines() if line.startswith("sdfleet: interrupted")]
    assert (
        f"interrupted ({sig.name}) after" in line
        and "of 8 shards committed; rerun the same command" in line
    )
    assert "Traceback" not in stderr
    wait_for(
        lambda: not actor_pids(ray_cluster), 60, "the interrupted job's actors to exit", poll=0.5
    )
    again = run_cli("run", str(spec), "--address", ray_cluster.address, "--no-progress")
    assert again.returncode == 0, again.stderr[-3000:]
    assert_exactly_once(out)
    if sig == signal.SIGINT:  # 20 steps, not the reference's 2: compare with a run of its own
        uninterrupted = f"s3://{reference['fs'].bucket}/uninterrupted"
        assert (
            run_cli(
                "run",
                str(
                    job_spec(reference["tmp"], tiny_model, reference["fs"], uninterrupted, steps=20)
                ),
                "--address",
                ray_cluster.address,
                "--no-progress",
            ).returncode
            == 0
        )
        same_dataset(uninterrupted, out)


def test_crash_between_images_and_commit_is_redone(tiny_model, ray_cluster, reference):
    """A shard whose tar and Parquet exist but whose stats do not is not done, and is redone."""
    fs, out = reference["fs"], f"s3://{reference['fs'].bucket}/crash"
    src = reference["out"].removeprefix("s3://")
    fs.copy(f"{src}/", f"{out.removeprefix('s3://')}/", recursive=True)
    storage = output_storage(out)
    # The state a crash leaves behind: shard 1's data written, its commit marker not; no final files.
    for name in ("00001_stats.json", "_SUCCESS", "sizes.json", "README.md"):
        storage.fs.rm(storage.path(name))
    storage.write_bytes("00001.tar", b"partial garbage from the crashed attempt")
    status = run_cli("status", out)
    assert status.returncode == 2 and "7 committed, 1 pending" in status.stdout
    before = {n: storage.fs.info(storage.path(n))["LastModified"] for n in committed(out)}
    again = run_cli(
        "run",
        str(reference["spec"]),
        "--set",
        f"output.uri={out}",
        "--address",
        ray_cluster.address,
        "--no-progress",
    )
    assert again.returncode == 0, again.stderr[-3000:]
    storage.fs.invalidate_cache()
    assert {
        n: storage.fs.info(storage.path(n))["LastModified"] for n in before
    } == before  # only shard 1 redone
    assert_exactly_once(out)
    same_dataset(reference["out"], out)


def test_two_writers_commit_one_consistent_shard(tmp_path, tiny_model, bucket):
    """A slow worker presumed dead finishes the same shard as its replacement."""
    import threading

    from sdfleet.actors.generator import ShardGenerator
    from sdfleet.actors.writer import ShardWriter, committed_file_problems
    from sdfleet.jobs.plan import Planner
    from sdfleet.schemas.layout import ShardStats
    from sdfleet.schemas.spec import load_spec

    out = f"s3://{bucket.bucket}/two-writers"
    plan = Planner(load_spec(job_spec(tmp_path, tiny_model, bucket, out))).plan()
    workers = [ShardGenerator(plan, cpu_threads=1) for _ in range(2)]
    results = [None, None]
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, workers[i].run(0)))
        for i in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    storage = output_storage(out)
    stats = storage.read_json("00000_stats.json")
    rows = pq.read_table(io.BytesIO(storage.read_bytes("00000.parquet"))).to_pylist()
    assert len(rows) == 3 and len({r["key"] for r in rows}) == 3
    assert (
        hashlib.sha256(storage.read_bytes("00000.parquet")).hexdigest() == stats["parquet_sha256"]
    )
    assert {r["worker_id"] for r in rows} == {stats["worker_id"]}  # rows and stats from one writer
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes("00000.tar"))) as tar:
        assert len(tar.getnames()) == 9

    # A late writer with other bytes (another batch size, another GPU) loses the commit and leaves the
    # winner's files as they are: the stats still describe, byte for byte, what is on storage.
    late_rows = [{**r, "worker_id": "late-writer"} for r in rows]
    writer = ShardWriter(storage, "png")
    spooled = writer.spool(
        "00000", late_rows, {r["key"]: b"other bytes" for r in rows}, plan.output_schema()
    )
    try:
        late = writer.commit(
            "00000", spooled, ShardStats.model_validate({**stats, "worker_id": "late-writer"})
        )
    finally:
        spooled.close()
    assert late.worker_id == stats["worker_id"] and storage.read_json("00000_stats.json") == stats
    assert committed_file_problems(storage, late, deep=True) == []
    # And a writer that finds the shard already committed leaves it alone.
    mtime = storage.fs.info(storage.path("00000_stats.json"))["LastModified"]
    assert workers[0].run(0).parquet_sha256 == stats["parquet_sha256"]
    storage.fs.invalidate_cache()
    assert storage.fs.info(storage.path("00000_stats.json"))["LastModified"] == mtime


def test_transient_s3_errors_are_retried(
    tmp_path, tiny_model, bucket, ray_cluster, s3_endpoint, reference
):
    proxy = S3Proxy(
        s3_endpoint,
        [
            Rule(path=r"/transient/", action="503", methods=("PUT",), every=3),
            Rule(path=r"/prompts/", action="503", methods=("GET",), every=2),
        ],
    )
    try:
        out = f"s3://{reference['fs'].bucket}/transient"
        spec = job_spec(reference["tmp"], tiny_model, reference["fs"], out)
        done = run_cli(
            "run",
            str(spec),
            "--address",
            ray_cluster.address,
            "--no-progress",
            env={"AWS_ENDPOINT_URL": proxy.url},
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert proxy.rules[0].fired >= 5 and proxy.rules[1].fired >= 1
        assert_exactly_once(out)
        same_dataset(reference["out"], out)
        attempts = [output_storage(out).read_json(n)["attempt"] for n in committed(out)]
        assert attempts == [1] * 8  # retried inside the S3 client, not by failing shards
    finally:
        proxy.close()


def test_a_lost_answer_to_a_stats_commit_is_resolved_and_the_run_completes(
    tmp_path, tiny_model, bucket, ray_cluster, s3_endpoint
):
    """The first conditional PUT of a stats file reaches S3 and its answer is lost (the proxy closes
    the connection unanswered); the client's retry gets 412. The writer reads the stats, finds its
    own id and publishes: the run completes with every shard committed at its first attempt."""
    proxy = S3Proxy(
        s3_endpoint,
        [
            Rule(
                path=r"/ambiguous/\d+_stats\.json$",
                action="drop_response",
                methods=("PUT",),
                header="If-None-Match",
                times=1,
            )
        ],
    )
    try:
        out = f"s3://{bucket.bucket}/ambiguous"
        done = run_cli(
            "run",
            str(job_spec(tmp_path, tiny_model, bucket, out)),
            "--address",
            ray_cluster.address,
            "--no-progress",
            env={"AWS_ENDPOINT_URL": proxy.url},
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert proxy.rules[0].fired == 1
    finally:
        proxy.close()
    assert_exactly_once(out)
    assert [output_storage(out).read_json(n)["attempt"] for n in committed(out)] == [1] * 8
    status = run_cli("status", out, "--verify")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "as committed (sha256 checked)" in status.stdout


def test_a_commit_that_can_no_longer_be_published_is_named_with_the_command_that_clears_it(
    tmp_path, tiny_model, bucket, ray_cluster
):
    """A committed shard's tar is gone and so is the upload its commit names (what an upload
    aborted by a wedged writer, or expired by a lifecycle rule, leaves). The rerun cannot roll it
    forward: it says so in one line naming `sdfleet withdraw`, which takes back that commit (and
    refuses a good one); the next rerun remakes the shard and the dataset is whole."""
    out = f"s3://{bucket.bucket}/gone"
    spec = str(job_spec(tmp_path, tiny_model, bucket, out))
    args = ("--address", ray_cluster.address, "--no-progress")
    assert run_cli("run", spec, *args).returncode == 0
    storage = output_storage(out)
    storage.delete("00003.tar")
    storage.delete("_SUCCESS")
    command = f"sdfleet withdraw {out} 00003"
    again = run_cli("run", spec, *args)
    assert again.returncode == 1, again.stderr[-3000:]
    [line] = [x for x in again.stderr.splitlines() if x.startswith("sdfleet: error:")]
    assert f"{out}/00003.tar is missing" in line and f"`{command}`" in line
    assert "Traceback" not in again.stderr
    good = run_cli("withdraw", out, "00002")
    assert good.returncode == 1 and "a good commit is never withdrawn" in good.stderr
    withdrawn = run_cli("withdraw", out, "00003")
    assert withdrawn.returncode == 0, withdrawn.stderr
    last = run_cli("run", spec, *args)
    assert last.returncode == 0, last.stderr[-3000:]
    assert_exactly_once(out)
    status = run_cli("status", out, "--verify")
    assert status.returncode == 0 and "as committed (sha256 checked)" in status.stdout


# Loaded at start-up by every Python process of the run (the driver, the embedded Ray's workers)
# through PYTHONPATH: the first `link` that makes a stats file succeeds and then answers EEXIST,
# as a retransmitted NFS LINK whose first reply was lost does. The seam is os.link itself.
LINK_THEN_EEXIST = """
import errno
import os

_marker = os.environ.get("SDFLEET_TEST_LINK_EEXIST")
if _marker:
    _real_link = os.link

    def _link_then_eexist(src, dst, *args, **kwargs):
        _real_link(src, dst, *args, **kwargs)
        if not str(dst).endswith("_stats.json"):
            return
        try:  # once per run, across processes
            fd = os.open(_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, str(dst).encode())
        os.close(fd)
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))

    os.link = _link_then_eexist
"""


def test_a_local_link_answered_eexist_after_success_is_resolved_and_the_run_completes(
    tmp_path, tiny_model, bucket
):
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(LINK_THEN_EEXIST)
    marker = tmp_path / "link-fault-fired"
    out = str(tmp_path / "out")
    done = run_cli(
        "run",
        str(job_spec(tmp_path, tiny_model, bucket, out)),
        "--no-progress",
        env={
            "RAY_ADDRESS": "",
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(inject), os.environ.get("PYTHONPATH")])
            ),
            "SDFLEET_TEST_LINK_EEXIST": str(marker),
        },
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert marker.read_text().endswith("_stats.json")  # the fault fired, in a worker
    assert_exactly_once(out)
    assert [output_storage(out).read_json(n)["attempt"] for n in committed(out)] == [1] * 8
    status = run_cli("status", out, "--verify")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "as committed (sha256 checked)" in status.stdout


def test_two_drivers_racing_to_replace_one_job_record_one_wins_the_other_exits_1(
    tmp_path, tiny_model, bucket, ray_cluster, s3_endpoint
):
    """An output holds a job that committed nothing and whose driver is gone. Driver A judges it
    replaceable and sends its new record; the proxy holds that PUT while driver B, with another
    spec, judges, replaces the record and runs its job. Then A's PUT goes on, conditional on the
    version A read: refused, A exits 1 naming the record, and the record is B's whole."""
    import threading

    out = f"s3://{bucket.bucket}/race"
    old = {
        "spec": {"name": "old"},
        "fingerprint": "0" * 32,
        "fingerprint_fields": {},
        "input_files": [],
        "num_shards": 1,
        "num_samples": 1,
        "key_width": 5,
        "created_at": "2026-01-01T00:00:00+00:00",
    }
    output_storage(out).write_json("_job.json", old)
    held = threading.Event()
    proxy = S3Proxy(
        s3_endpoint,
        [
            Rule(
                path=r"/race/_job\.json$",
                action="hang",
                methods=("PUT",),
                header="If-Match",
                times=1,
                hold=held,
                hang_s=120,
            )
        ],
    )
    env = {"AWS_ENDPOINT_URL": proxy.url}
    args = ("--address", ray_cluster.address, "--no-progress")
    try:
        spec_a = job_spec(tmp_path, tiny_model, bucket, out, generation={"guidance_scale": 3.0})
        driver_a = start_cli("run", str(spec_a), *args, env=env)
        wait_for(lambda: proxy.rules[0].fired == 1, 120, "driver A's replace to reach the proxy")
        spec_b = job_spec(tmp_path, tiny_model, bucket, out)
        driver_b = start_cli("run", str(spec_b), *args, env=env)
        wait_for(
            lambda: output_storage(out).read_json("_job.json")["fingerprint"] != old["fingerprint"],
            120,
            "driver B's record",
        )
        held.set()
        _, a_err = driver_a.communicate(timeout=120)
        b_out, b_err = driver_b.communicate(timeout=300)
    finally:
        held.set()
        proxy.close()
    assert driver_a.returncode == 1, a_err[-3000:]
    [line] = [x for x in a_err.splitlines() if x.startswith("sdfleet: error:")]
    assert f"{out}/_job.json was replaced by another driver" in line and "Traceback" not in a_err
    assert driver_b.returncode == 0, b_err[-3000:]
    assert f"held job {old['fingerprint']}, which committed no shard" in b_out
    job = output_storage(out).read_json("_job.json")
    assert [h["fingerprint"] for h in job["history"]] == [old["fingerprint"]]
    assert job["spec"]["generation"]["guidance_scale"] != 3.0  # B's spec, not A's
    assert_exactly_once(out)


def test_a_local_output_on_a_multi_node_cluster_is_refused_before_any_worker_starts(
    tmp_path, tiny_model, bucket
):
    """First a lone head without GPUs (its GPU workers could only run on nodes an autoscaler adds),
    then the same with a GPU node joined: each time exit 1 naming output.uri, no worker started."""
    head = start_head(
        "--num-cpus=1",
        "--num-gpus=0",
        "--object-store-memory=100000000",
        "--include-dashboard=false",
        temp_dir=make_temp_dir("sdf-ln-"),
    )
    out = tmp_path / "out"
    spec = str(job_spec(tmp_path, tiny_model, bucket, str(out)))

    def refused() -> str:
        done = run_cli("run", spec, "--address", head.address, "--no-progress")
        assert done.returncode == 1, done.stderr[-3000:]
        [line] = [x for x in done.stderr.splitlines() if x.startswith("sdfleet: error:")]
        assert f"output.uri {out} is a local path, and " in line
        assert "s3://" in line and "output.shared_filesystem: true" in line
        assert actor_pids(head) == []  # no worker was started
        assert not list(out.glob("*_stats.json")) and not list(out.glob("_probe-worker-*"))
        return line

    try:
        assert "the driver's node has no GPU" in refused()
        head.add_worker("--num-cpus=1", "--num-gpus=1", "--object-store-memory=100000000")
        assert "the Ray cluster has 2 nodes" in refused()
    finally:
        head.stop()


def test_a_worker_on_another_node_than_the_drivers_is_refused_for_a_local_output(tmp_path):
    """The check behind a cluster that grows after the start: a worker that started elsewhere."""
    from sdfleet.jobs.output_reach import worker_node_refusal
    from sdfleet.schemas.spec import OutputSpec

    local = OutputSpec(uri=str(tmp_path / "out"))
    refusal = worker_node_refusal(local, "node-b", "node-a")
    assert f"output.uri {tmp_path / 'out'} is a local path" in str(refusal)
    assert "node node-b, not the driver's (node-a)" in str(refusal)
    assert worker_node_refusal(local, "node-a", "node-a") is None
    shared = OutputSpec(uri=str(tmp_path / "out"), shared_filesystem=True)
    assert worker_node_refusal(shared, "node-b", "node-a") is None
    assert worker_node_refusal(OutputSpec(uri="s3://b/out"), "node-b", "node-a") is None


def test_persistent_403_and_404_fail_fast_naming_the_uri(tmp_path, tiny_model, bucket, s3_endpoint):
    proxy = S3Proxy(s3_endpoint, [Rule(path=r"/denied/", action="403")])
    try:
        out = f"s3://{bucket.bucket}/denied"
        t0 = time.monotonic()
        done = run_cli(
            "run",
            str(job_spec(tmp_path, tiny_model, bucket, out)),
            env={"AWS_ENDPOINT_URL": proxy.url, "RAY_ADDRESS": ""},
        )
        assert done.returncode == 1
        assert f"S3 denied s3:GetObject on {out}/_job.json: grant it" in done.stderr
        assert time.monotonic() - t0 < 60
    finally:
        proxy.close()
    missing = run_cli(
        "run",
        str(
            job_spec(
                tmp_path,
                tiny_model,
                bucket,
                str(tmp_path / "o"),
                input={"uri": f"s3://{bucket.bucket}/no-such-prefix/"},
            )
        ),
    )
    assert missing.returncode == 1 and f"s3://{bucket.bucket}/no-such-prefix/" in missing.stderr


def test_a_store_that_ignores_conditional_writes_is_refused_unless_the_spec_allows_it(
    tmp_path, tiny_model, bucket, s3_endpoint
):
    proxy = S3Proxy(s3_endpoint, [Rule(path=r"/lax/", action="unconditional")])
    try:
        out = f"s3://{bucket.bucket}/lax"
        env = {"AWS_ENDPOINT_URL": proxy.url, "RAY_ADDRESS": ""}
        done = run_cli("run", str(job_spec(tmp_path, tiny_model, bucket, out)), env=env)
        assert done.returncode == 1, done.stderr[-3000:]
        assert f"{out} created an object that already existed" in done.stderr
        assert (
            "output.allow_non_exclusive_commits" in done.stderr and "Traceback" not in done.stderr
        )
        assert output_storage(out).listing() == {}  # refused before anything was written
        allowed = run_cli(
            "run",
            str(
                job_spec(
                    tmp_path, tiny_model, bucket, out, output={"allow_non_exclusive_commits": True}
                )
            ),
            env=env,
        )
        assert allowed.returncode == 0, allowed.stderr[-3000:]
        job = output_storage(out).read_json("_job.json")
        assert (
            job["exclusive_create"] is False
            and job["spec"]["output"]["allow_non_exclusive_commits"] is True
        )
    finally:
        proxy.close()


def test_a_worker_that_cannot_write_the_output_fails_the_job_at_once(
    tmp_path, tiny_model, bucket, s3_endpoint
):
    """The driver may write (it claims the output), the workers may not: the first worker's write
    probe fails the job with exit 1, naming the URI and the node, before any shard is generated."""
    proxy = S3Proxy(
        s3_endpoint, [Rule(path=r"/readonly/_probe-worker-", action="403", methods=("PUT",))]
    )
    try:
        out = f"s3://{bucket.bucket}/readonly"
        t0 = time.monotonic()
        done = run_cli(
            "run",
            str(job_spec(tmp_path, tiny_model, bucket, out)),
            "--no-progress",
            env={"AWS_ENDPOINT_URL": proxy.url, "RAY_ADDRESS": ""},
        )
        seconds = time.monotonic() - t0
        assert done.returncode == 1, done.stderr[-3000:]
        [line] = [line for line in done.stderr.splitlines() if line.startswith("sdfleet: error:")]
        assert (
            f"S3 denied s3:PutObject on {out}/_probe-worker-" in line
            and "sdfleet-s3-policy.json" in line
            and "on node" in line
        )
        assert proxy.rules[0].fired == 1  # no worker was tried again
        assert committed(out) == [] and output_storage(out).list("*_failed.json") == []
        print(f"\n[write probe] refused after {seconds:.1f}s")
    finally:
        proxy.close()


def test_two_worker_processes_with_different_batch_sizes_commit_one_consistent_shard(
    tmp_path, tiny_model, bucket
):
    """Two real processes make shard 0 at once with batch sizes 1 and 3, so their PNG bytes differ
    (batching moves a few pixels by one): one commits, and its files are the ones on storage."""
    import subprocess
    import sys

    from sdfleet.actors.writer import committed_file_problems
    from sdfleet.schemas.layout import ShardStats

    out = f"s3://{bucket.bucket}/batch-sizes"
    worker = (
        "import sys, time; from sdfleet.actors.generator import ShardGenerator; "
        "from sdfleet.jobs.plan import Planner; from sdfleet.schemas.spec import load_spec; "
        "g = ShardGenerator(Planner(load_spec(sys.argv[1])).plan(), cpu_threads=1); "
        "time.sleep(max(0, float(sys.argv[2]) - time.time())); print(g.run(0).worker_id)"
    )
    # Each batch size alone first, into its own output: the bytes do differ.
    alone = {}
    for batch in (1, 3):
        spec = job_spec(
            tmp_path, tiny_model, bucket, f"{out}-alone-{batch}", resources={"batch_size": batch}
        )
        subprocess.run(
            [sys.executable, "-c", worker, str(spec), "0"],
            check=True,
            capture_output=True,
            timeout=300,
        )
        alone[batch] = output_storage(f"{out}-alone-{batch}").read_json("00000_stats.json")[
            "tar_sha256"
        ]
    assert alone[1] != alone[3]
    start_at = str(time.time() + 20)  # both load their models first, then start the shard together
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                worker,
                str(job_spec(tmp_path, tiny_model, bucket, out, resources={"batch_size": b})),
                start_at,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for b in (1, 3)
    ]
    winners = {p.communicate(timeout=300)[0].strip().splitlines()[-1] for p in procs}
    storage = output_storage(out)
    stats = ShardStats.model_validate(storage.read_json("00000_stats.json"))
    assert winners == {stats.worker_id}  # both report the one commit
    assert stats.tar_sha256 in alone.values()
    assert committed_file_problems(storage, stats, deep=True) == []
    rows = pq.read_table(io.BytesIO(storage.read_bytes("00000.parquet"))).to_pylist()
    assert len(rows) == 3 and {r["worker_id"] for r in rows} == {stats.worker_id}


def test_hung_actor_is_killed_and_its_shard_retried(
    tiny_model, ray_cluster, s3_endpoint, reference
):
    # The first upload of shard 3's tar hangs, as a stuck connection would.
    proxy = S3Proxy(
        s3_endpoint,
        [Rule(path=r"/hung/00003\.tar", action="hang", methods=("PUT",), times=1, hang_s=120)],
    )
    try:
        out = f"s3://{reference['fs'].bucket}/hung"
        spec = job_spec(
            reference["tmp"], tiny_model, reference["fs"], out, resources={"shard_timeout_s": 10}
        )
        done = run_cli(
            "run",
            str(spec),
            "--address",
            ray_cluster.address,
            "--no-progress",
            env={"AWS_ENDPOINT_URL": proxy.url},
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert "00003 ran past shard_timeout_s=10" in done.stderr
        assert output_storage(out).read_json("00003_stats.json")["attempt"] == 2
        assert_exactly_once(out)
        same_dataset(reference["out"], out)
    finally:
        proxy.close()


def test_a_queued_shard_finishing_first_does_not_restart_the_heads_timeout():
    """A worker's second shard may commit before its first (whose upload hangs): the first one's
    shard_timeout_s clock must keep running, or a hung upload would never time out."""
    from sdfleet.jobs.dispatch import ShardTask
    from sdfleet.jobs.pool import Slot

    slot = Slot(actor=None, ready_ref=None, ready=True, head_since=100.0)
    slot.tasks.extend([("head", ShardTask(1)), ("queued", ShardTask(2))])
    slot.pop("queued")
    assert slot.head_since == 100.0 and [r for r, _ in slot.tasks] == ["head"]
    slot.pop("head")
    assert slot.head_since > 100.0 and not slot.tasks


def test_slow_uploads_overlap_the_next_shards_generation(
    tiny_model, ray_cluster, s3_endpoint, reference
):
    """Every tar upload takes 0.5 s longer (a slow link): one worker goes on generating meanwhile.

    Shards take ~1 s to generate here (40 steps), longer than their upload, as real shards do."""
    proxy = S3Proxy(
        s3_endpoint, [Rule(path=r"/slow/\d+\.tar", action="hang", methods=("PUT",), hang_s=0.5)]
    )
    try:
        out = f"s3://{reference['fs'].bucket}/slow"
        spec = job_spec(
            reference["tmp"],
            tiny_model,
            reference["fs"],
            out,
            steps=40,
            resources={"max_workers": 1},
        )
        done = run_cli(
            "run",
            str(spec),
            "--address",
            ray_cluster.address,
            "--no-progress",
            env={"AWS_ENDPOINT_URL": proxy.url},
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert proxy.rules[0].fired == 8
        assert_exactly_once(out)
        stats = sorted(
            (output_storage(out).read_json(n) for n in committed(out)),
            key=lambda s: s["generate_started_ts"],
        )
        assert len({s["worker_id"] for s in stats}) == 1
        # The second shard read its prompts while the first one was generating ...
        assert stats[1]["started_ts"] < stats[0]["generate_finished_ts"]
        for before, after in itertools.pairwise(stats):
            # ... every shard had the pipeline to itself ...
            assert after["generate_started_ts"] >= before["generate_finished_ts"]
            # ... and started generating before the shard ahead of it had finished uploading.
            assert after["generate_started_ts"] < before["finished_ts"], (before, after)
    finally:
        proxy.close()


def test_resume_with_changed_spec_is_refused_and_nothing_is_deleted(
    tiny_model, ray_cluster, reference
):
    storage = output_storage(reference["out"])
    files = lambda: {p: storage.fs.cat_file(p) for p in storage.fs.find(storage.root)}  # noqa: E731
    before = files()
    for change in ("generation.guidance_scale=3", "sweep.seeds=3", "output.image_format=jpeg"):
        done = run_cli(
            "run", str(reference["spec"]), "--set", change, "--address", ray_cluster.address
        )
        assert done.returncode == 1
        assert change.split("=")[0] in done.stderr and "different job" in done.stderr
    storage.fs.invalidate_cache()
    assert files() == before

"""Kill anything, anytime: the rerun gives exactly the dataset an uninterrupted run gives.

Every fault is real or injected at the boundary only: nodes removed from a real Ray cluster, actor
and driver processes killed with SIGKILL, S3 errors and hangs from an HTTP proxy in front of the
local S3 server, a shard whose output path cannot be written.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import REPO, SDFLEET, free_port, run_cli, wait_for, write_prompts
from s3proxy import Rule, S3Proxy
from schemas.rows import RUN_COLUMNS

pytestmark = pytest.mark.slow

N_PROMPTS = 12  # x 2 seeds = 24 samples in 8 shards of 3


# ------------------------------------------------------------------------------------ helpers


def bucket_with_prompts(prefix: str):
    """A new bucket holding the fault tests' prompt table; an s3fs filesystem with `.bucket` set."""
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.bucket = f"{prefix}-{uuid.uuid4().hex[:10]}"
    fs.mkdir(fs.bucket)
    write_prompts(f"{fs.bucket}/prompts/p.parquet", [f"a landscape, variation {i}" for i in range(N_PROMPTS)],
                  storage=fs, row_group_size=4)
    return fs


@pytest.fixture
def bucket(s3_endpoint):
    return bucket_with_prompts("faults")


def job_spec(tmp_path, tiny_model, bucket, out: str, steps: int = 2, **sections) -> Path:
    spec = {
        "name": "faults",
        "model": {"source": str(tiny_model), "scheduler": "EulerDiscreteScheduler"},
        "input": {"uri": f"s3://{bucket.bucket}/prompts/"},
        "generation": {"num_inference_steps": steps, "width": 64, "height": 64},
        "sweep": {"seeds": 2},
        "output": {"uri": out, "image_format": "png", "samples_per_shard": 3},
        "safety": {"detector": "none"},
        "resources": {"batch_size": 3, "max_attempts": 3},
    }
    for section, values in sections.items():
        spec.setdefault(section, {}).update(values)
    path = tmp_path / f"job-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def start_cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([*SDFLEET, *args], cwd=REPO, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def output_fs(out: str):
    from actors.storage import Storage

    return Storage(out)


def committed(out: str) -> list[str]:
    return output_fs(out).list("*_stats.json")


def rows_of(out: str) -> list[dict]:
    storage = output_fs(out)
    rows = []
    for name in storage.list("*.parquet"):
        rows += pq.read_table(io.BytesIO(storage.read_bytes(name))).to_pylist()
    return rows


def assert_exactly_once(out: str, samples: int = N_PROMPTS * 2, shards: int = 8) -> list[dict]:
    storage = output_fs(out)
    assert committed(out) == [f"{i:05d}_stats.json" for i in range(shards)]
    rows = rows_of(out)
    assert len(rows) == samples and len({r["key"] for r in rows}) == samples
    assert len({r["sample_id"] for r in rows}) == samples
    assert sum(json.loads(storage.read_bytes("sizes.json")).values()) == samples
    assert storage.exists("_SUCCESS")
    for name in storage.list("*_stats.json"):
        stats = storage.read_json(name)
        parquet = storage.read_bytes(name.replace("_stats.json", ".parquet"))
        assert hashlib.sha256(parquet).hexdigest() == stats["parquet_sha256"]  # one consistent commit
    return rows


def same_dataset(a: str, b: str) -> None:
    """Byte-identical tars; identical rows apart from the run columns (worker, time)."""
    sa, sb = output_fs(a), output_fs(b)
    assert sa.list("*.tar") == sb.list("*.tar")
    for name in sa.list("*.tar"):
        assert sa.read_bytes(name) == sb.read_bytes(name), name
    strip = lambda rows: sorted(({k: v for k, v in r.items() if k not in RUN_COLUMNS} for r in rows),  # noqa: E731
                                key=lambda r: r["key"])
    assert strip(rows_of(a)) == strip(rows_of(b))


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def actor_pids(cluster, running_only: bool = False) -> list[int]:
    """PIDs of ShardGenerator actor processes under this cluster's raylets (never anyone else's)."""
    import ray._private.ray_constants as rc

    raylets = {p.process.pid for node in [cluster.head_node, *cluster.worker_nodes]
               for p in node.all_processes.get(rc.PROCESS_TYPE_RAYLET, [])}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "ShardGenerator" not in cmd or (running_only and ".run" not in cmd):
            continue
        pid, hops = int(entry.name), 0
        parent = _ppid(pid)
        while parent and parent not in raylets and hops < 5:
            parent, hops = _ppid(parent), hops + 1
        if parent in raylets:
            found.append(pid)
    return found


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


# ------------------------------------------------------------------------------------- faults


def test_node_death_mid_run(tmp_path, tiny_model, bucket):
    """A node holding a GPU actor is removed mid-job; the job finishes on the other node."""
    import tempfile

    from ray.cluster_utils import Cluster

    temp_dir = tempfile.mkdtemp(prefix="sdf-ray-")  # short: Unix socket paths are capped at 107 bytes
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 0, "gcs_server_port": free_port(), "dashboard_port": free_port(),
        "include_dashboard": False, "temp_dir": temp_dir,
        # Detect a dead node in about a second instead of about 20.
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 2,
                           "health_check_timeout_ms": 500},
    })
    try:
        nodes = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
        out = f"s3://{bucket.bucket}/node-death"
        # Slow enough shards (60 steps, 2 samples each) that most start after the node is gone.
        spec = job_spec(tmp_path, tiny_model, bucket, out, steps=60, output={"samples_per_shard": 2})
        proc = start_cli("run", str(spec), "--address", cluster.address, "--no-progress")
        wait_for(lambda: committed(out), 120, "a first committed shard")
        cluster.remove_node(nodes[0], allow_graceful=False)
        removed_at = time.time()
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        rows = assert_exactly_once(out, shards=12)
        survivor = nodes[1].node_id
        assert survivor in {r["worker_node"] for r in rows}
        # Every shard started after the node was gone ran on the survivor. (The dead node's actor
        # may still commit the shard it was writing; its retry then finds it committed.)
        later = [s for s in (output_fs(out).read_json(n) for n in committed(out)) if s["started_ts"] > removed_at + 0.5]
        assert later and {s["worker_node"] for s in later} == {survivor}
    finally:
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def run_and_signal_an_actor(tiny_model, ray_cluster, reference, name: str, sig: int) -> tuple[str, str]:
    """The reference job into a new output; `sig` goes to the first actor seen running a shard.

    The moment is taken from the actor's process title (slower steps would change the images)."""
    out = f"s3://{reference['fs'].bucket}/{name}"
    spec = job_spec(reference["tmp"], tiny_model, reference["fs"], out)
    proc = start_cli("run", str(spec), "--address", ray_cluster.address, "--no-progress")
    pid = wait_for(lambda: actor_pids(ray_cluster, running_only=True), 120, "an actor running a shard")[0]
    os.kill(pid, sig)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    return out, stderr


def test_actor_death_is_retried_and_replaced(tiny_model, ray_cluster, reference):
    out, stderr = run_and_signal_an_actor(tiny_model, ray_cluster, reference, "actor-death", signal.SIGKILL)
    assert_exactly_once(out)
    attempts = [output_fs(out).read_json(n)["attempt"] for n in committed(out)]
    if max(attempts) == 1:
        pytest.skip("the killed actor had finished its shard before the signal landed")  # pragma: no cover
    assert sorted(attempts)[-1] == 2 and attempts.count(2) == 1
    assert "worker died" in stderr and "starting a replacement worker" in stderr
    same_dataset(reference["out"], out)


def test_preempted_worker_requeues_its_shard_without_counting_an_attempt(tiny_model, ray_cluster, reference):
    """SIGTERM, as spot reclaims and Kubernetes evictions send: the shard goes back uncounted."""
    out, stderr = run_and_signal_an_actor(tiny_model, ray_cluster, reference, "preempted", signal.SIGTERM)
    if "worker preempted" not in stderr:
        pytest.skip("the signalled actor had no shard left to abandon")  # pragma: no cover
    assert "starting a replacement worker" in stderr
    assert_exactly_once(out)
    assert [output_fs(out).read_json(n)["attempt"] for n in committed(out)] == [1] * 8
    same_dataset(reference["out"], out)


def test_budget_cap_stops_cleanly_and_a_higher_cap_completes(tiny_model, ray_cluster, reference):
    # $3600 per GPU-hour is $1 per GPU-second: the first committed shard spends the $0.005 budget (a
    # shard's GPU time is its turn on the pipeline, ~0.05 s here), and only the shards already handed
    # out (two per actor) finish after it.
    budget = 0.005
    out = f"s3://{reference['fs'].bucket}/budget"
    spec = job_spec(reference["tmp"], tiny_model, reference["fs"], out,
                    resources={"gpu_hour_usd": 3600.0, "budget_usd": budget})
    done = run_cli("run", str(spec), "--address", ray_cluster.address, "--no-progress")
    assert done.returncode == 2
    assert "stopped at the budget" in done.stderr and "budget_usd" in done.stderr
    first = committed(out)
    assert 1 <= len(first) <= 4
    assert not output_fs(out).exists("_SUCCESS")
    spent = sum(output_fs(out).read_json(n)["gpu_seconds"] for n in first)
    assert spent >= budget  # it stopped because the budget was spent, not before
    again = run_cli("run", str(spec), "--set", "resources.budget_usd=100000", "--address", ray_cluster.address,
                    "--no-progress")
    assert again.returncode == 0, again.stderr[-3000:]
    assert_exactly_once(out)
    same_dataset(reference["out"], out)


def test_poison_shard_is_quarantined_and_the_rest_finish(tmp_path, tiny_model, bucket, ray_cluster):
    out = tmp_path / "poison"
    (out / "00002.tar").mkdir(parents=True)  # every attempt to write shard 2's tar fails
    spec = job_spec(tmp_path, tiny_model, bucket, str(out), resources={"max_attempts": 2})
    done = run_cli("run", str(spec), "--address", ray_cluster.address, "--no-progress")
    assert done.returncode == 2
    assert "00002" in done.stderr and "IsADirectoryError" in done.stderr
    failed = json.loads((out / "00002_failed.json").read_text())
    assert failed["attempts"] == 2 and len(failed["errors"]) == 2
    assert all("IsADirectoryError" in e["error"] for e in failed["errors"])
    assert len(committed(str(out))) == 7 and not (out / "00002_stats.json").exists()
    # Incomplete: neither the marker nor sizes.json, so no reader takes it for a dataset.
    assert not (out / "_SUCCESS").exists() and not (out / "sizes.json").exists()
    status = run_cli("status", str(out))
    assert status.returncode == 2
    assert "7 committed, 0 pending, 1 quarantined" in status.stdout and "complete     no" in status.stdout
    # Fix the cause and rerun the same command: only shard 2 is made, and the dataset completes.
    (out / "00002.tar").rmdir()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*_stats.json")}
    again = run_cli("run", str(spec), "--address", ray_cluster.address, "--no-progress")
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*_stats.json") if p.name in before} == before
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
    assert not output_fs(out).exists("_SUCCESS")
    again = run_cli("run", str(spec), "--address", ray_cluster.address, "--no-progress")
    assert again.returncode == 0, again.stderr[-3000:]
    assert_exactly_once(out)
    same_dataset(reference["out"], out)


def test_crash_between_images_and_commit_is_redone(tiny_model, ray_cluster, reference):
    """A shard whose tar and Parquet exist but whose stats do not is not done, and is redone."""
    fs, out = reference["fs"], f"s3://{reference['fs'].bucket}/crash"
    src = reference["out"].removeprefix("s3://")
    fs.copy(f"{src}/", f"{out.removeprefix('s3://')}/", recursive=True)
    storage = output_fs(out)
    # The state a crash leaves behind: shard 1's data written, its commit marker not; no final files.
    for name in ("00001_stats.json", "_SUCCESS", "sizes.json", "README.md"):
        storage.fs.rm(storage.path(name))
    storage.write_bytes("00001.tar", b"partial garbage from the crashed attempt")
    status = run_cli("status", out)
    assert status.returncode == 2 and "7 committed, 1 pending" in status.stdout
    before = {n: storage.fs.info(storage.path(n))["LastModified"] for n in committed(out)}
    again = run_cli("run", str(reference["spec"]), "--set", f"output.uri={out}", "--address",
                    ray_cluster.address, "--no-progress")
    assert again.returncode == 0, again.stderr[-3000:]
    storage.fs.invalidate_cache()
    assert {n: storage.fs.info(storage.path(n))["LastModified"] for n in before} == before  # only shard 1 redone
    assert_exactly_once(out)
    same_dataset(reference["out"], out)


def test_two_writers_commit_one_consistent_shard(tmp_path, tiny_model, bucket):
    """A slow worker presumed dead finishes the same shard as its replacement."""
    import threading

    from actors.generator import ShardGenerator
    from actors.writer import ShardWriter
    from jobs.plan import Planner
    from schemas.spec import load_spec

    out = f"s3://{bucket.bucket}/two-writers"
    plan = Planner(load_spec(job_spec(tmp_path, tiny_model, bucket, out))).plan()
    workers = [ShardGenerator(plan, cpu_threads=1) for _ in range(2)]
    results = [None, None]
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, workers[i].run(0))) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    storage = output_fs(out)
    stats = storage.read_json("00000_stats.json")
    rows = pq.read_table(io.BytesIO(storage.read_bytes("00000.parquet"))).to_pylist()
    assert len(rows) == 3 and len({r["key"] for r in rows}) == 3
    assert hashlib.sha256(storage.read_bytes("00000.parquet")).hexdigest() == stats["parquet_sha256"]
    assert {r["worker_id"] for r in rows} == {stats["worker_id"]}  # rows and stats from one writer
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes("00000.tar"))) as tar:
        assert len(tar.getnames()) == 9

    # The race made deterministic at the writer: a second writer overwrote the Parquet after the first
    # committed. Its commit fails, it sees the stats no longer describe the Parquet, and re-commits.
    writer, schema = ShardWriter(storage, "png"), plan.output_schema()
    late_rows = [{**r, "worker_id": "late-writer"} for r in rows]
    images = {r["key"]: b"same-bytes" for r in rows}
    first = writer.commit("00009", {"worker_id": "first", **writer.write_outputs("00009", rows, images, schema)})
    late = writer.write_outputs("00009", late_rows, images, schema)
    second = writer.commit("00009", {"worker_id": "late-writer", **late})
    assert first["worker_id"] == "first" and second["worker_id"] == "late-writer"
    final = storage.read_json("00009_stats.json")
    assert final["worker_id"] == "late-writer"
    assert hashlib.sha256(storage.read_bytes("00009.parquet")).hexdigest() == final["parquet_sha256"]
    # And a writer that finds the shard already committed leaves it alone.
    mtime = storage.fs.info(storage.path("00000_stats.json"))["LastModified"]
    assert workers[0].run(0)["parquet_sha256"] == stats["parquet_sha256"]
    storage.fs.invalidate_cache()
    assert storage.fs.info(storage.path("00000_stats.json"))["LastModified"] == mtime


def test_transient_s3_errors_are_retried(tmp_path, tiny_model, bucket, ray_cluster, s3_endpoint, reference):
    proxy = S3Proxy(s3_endpoint, [Rule(path=r"/transient/", action="503", methods=("PUT",), every=3),
                                  Rule(path=r"/prompts/", action="503", methods=("GET",), every=2)])
    try:
        out = f"s3://{reference['fs'].bucket}/transient"
        spec = job_spec(reference["tmp"], tiny_model, reference["fs"], out)
        done = run_cli("run", str(spec), "--address", ray_cluster.address, "--no-progress",
                       env={"AWS_ENDPOINT_URL": proxy.url})
        assert done.returncode == 0, done.stderr[-3000:]
        assert proxy.rules[0].fired >= 5 and proxy.rules[1].fired >= 1
        assert_exactly_once(out)
        same_dataset(reference["out"], out)
        attempts = [output_fs(out).read_json(n)["attempt"] for n in committed(out)]
        assert attempts == [1] * 8  # retried inside the S3 client, not by failing shards
    finally:
        proxy.close()


def test_persistent_403_and_404_fail_fast_naming_the_uri(tmp_path, tiny_model, bucket, s3_endpoint):
    proxy = S3Proxy(s3_endpoint, [Rule(path=r"/denied/", action="403")])
    try:
        out = f"s3://{bucket.bucket}/denied"
        t0 = time.monotonic()
        done = run_cli("run", str(job_spec(tmp_path, tiny_model, bucket, out)), env={"AWS_ENDPOINT_URL": proxy.url,
                                                                                     "RAY_ADDRESS": ""})
        assert done.returncode == 1
        assert f"{out}/_job.json" in done.stderr and "access denied" in done.stderr
        assert time.monotonic() - t0 < 60
    finally:
        proxy.close()
    missing = run_cli("run", str(job_spec(tmp_path, tiny_model, bucket, str(tmp_path / "o"),
                                          input={"uri": f"s3://{bucket.bucket}/no-such-prefix/"})))
    assert missing.returncode == 1 and f"s3://{bucket.bucket}/no-such-prefix/" in missing.stderr


def test_hung_actor_is_killed_and_its_shard_retried(tiny_model, ray_cluster, s3_endpoint, reference):
    # The first upload of shard 3's tar hangs, as a stuck connection would.
    proxy = S3Proxy(s3_endpoint, [Rule(path=r"/hung/00003\.tar", action="hang", methods=("PUT",), times=1,
                                       hang_s=120)])
    try:
        out = f"s3://{reference['fs'].bucket}/hung"
        spec = job_spec(reference["tmp"], tiny_model, reference["fs"], out, resources={"shard_timeout_s": 10})
        done = run_cli("run", str(spec), "--address", ray_cluster.address, "--no-progress",
                       env={"AWS_ENDPOINT_URL": proxy.url})
        assert done.returncode == 0, done.stderr[-3000:]
        assert "00003 ran past shard_timeout_s=10" in done.stderr
        assert output_fs(out).read_json("00003_stats.json")["attempt"] == 2
        assert_exactly_once(out)
        same_dataset(reference["out"], out)
    finally:
        proxy.close()


def test_a_queued_shard_finishing_first_does_not_restart_the_heads_timeout():
    """A worker's second shard may commit before its first (whose upload hangs): the first one's
    shard_timeout_s clock must keep running, or a hung upload would never time out."""
    from jobs.dispatch import ShardTask, _pop, _Slot

    slot = _Slot(actor=None, ready_ref=None, ready=True, head_since=100.0)
    slot.tasks.extend([("head", ShardTask(1)), ("queued", ShardTask(2))])
    _pop(slot, "queued")
    assert slot.head_since == 100.0 and [r for r, _ in slot.tasks] == ["head"]
    _pop(slot, "head")
    assert slot.head_since > 100.0 and not slot.tasks


def test_slow_uploads_overlap_the_next_shards_generation(tiny_model, ray_cluster, s3_endpoint, reference):
    """Every tar upload takes 0.5 s longer (a slow link): one worker goes on generating meanwhile.

    Shards take ~1 s to generate here (40 steps), longer than their upload, as real shards do."""
    proxy = S3Proxy(s3_endpoint, [Rule(path=r"/slow/\d+\.tar", action="hang", methods=("PUT",), hang_s=0.5)])
    try:
        out = f"s3://{reference['fs'].bucket}/slow"
        spec = job_spec(reference["tmp"], tiny_model, reference["fs"], out, steps=40, resources={"max_workers": 1})
        done = run_cli("run", str(spec), "--address", ray_cluster.address, "--no-progress",
                       env={"AWS_ENDPOINT_URL": proxy.url})
        assert done.returncode == 0, done.stderr[-3000:]
        assert proxy.rules[0].fired == 8
        assert_exactly_once(out)
        stats = sorted((output_fs(out).read_json(n) for n in committed(out)), key=lambda s: s["generate_started_ts"])
        assert len({s["worker_id"] for s in stats}) == 1
        # The second shard read its prompts while the first one was generating ...
        assert stats[1]["started_ts"] < stats[0]["generate_finished_ts"]
        for before, after in zip(stats, stats[1:]):
            # ... every shard had the pipeline to itself ...
            assert after["generate_started_ts"] >= before["generate_finished_ts"]
            # ... and started generating before the shard ahead of it had finished uploading.
            assert after["generate_started_ts"] < before["finished_ts"], (before, after)
    finally:
        proxy.close()


def test_resume_with_changed_spec_is_refused_and_nothing_is_deleted(tiny_model, ray_cluster, reference):
    storage = output_fs(reference["out"])
    files = lambda: {p: storage.fs.cat_file(p) for p in storage.fs.find(storage.root)}  # noqa: E731
    before = files()
    for change in ("generation.guidance_scale=3", "sweep.seeds=3", "output.image_format=jpeg"):
        done = run_cli("run", str(reference["spec"]), "--set", change, "--address", ray_cluster.address)
        assert done.returncode == 1
        assert change.split("=")[0] in done.stderr and "different job" in done.stderr
    storage.fs.invalidate_cache()
    assert files() == before


# ---------------------------------------------------------------------------------- bad input


def test_bad_rows_are_recorded_and_the_job_goes_on(tmp_path, tiny_model, ray_cluster):
    import pyarrow as pa

    long_prompt = " ".join(["a very long and detailed prompt about mountains"] * 20)
    prompts = [b"a good prompt", None, b"", b"   ", b"caf\xe9 in latin-1", b"a duplicate id",
               long_prompt.encode(), b"escaping paths", b"absolute paths"]
    ids = ["ok", "null", "empty", "blank", "latin1", "ok", "long", "../../x", "/etc/passwd"]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"prompt_id": ids, "prompt": pa.array(prompts, pa.binary())}),
                   tmp_path / "in" / "p.parquet")
    spec = {
        "model": {"source": str(tiny_model)},
        "input": {"uri": str(tmp_path / "in")},
        "generation": {"num_inference_steps": 2, "width": 64, "height": 64},
        "output": {"uri": str(tmp_path / "out"), "samples_per_shard": 4},
        "safety": {"detector": "none"},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    done = run_cli("run", str(tmp_path / "job.yaml"), "--address", ray_cluster.address, "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["prompt_id"] if r["prompt_id"] != "ok" or r["status"] == "ok" else "dup": r
            for r in rows_of(str(tmp_path / "out"))}
    assert len(rows) == 9
    assert rows["null"]["status"] == "failed" and rows["null"]["error"] == "prompt is null"
    assert rows["empty"]["error"] == rows["blank"]["error"] == "prompt is empty or whitespace-only"
    assert rows["latin1"]["status"] == "failed" and "not valid UTF-8" in rows["latin1"]["error"]
    assert rows["dup"]["status"] == "failed" and rows["dup"]["error"] == "duplicate prompt_id 'ok': first at p.parquet:0"
    assert rows["dup"]["prompt"] == "a duplicate id"
    long = rows["long"]
    assert long["status"] == "ok" and long["prompt_truncated"] is True and long["prompt_tokens"] > 77
    assert rows["ok"]["prompt_truncated"] is False and rows["ok"]["prompt_tokens"] < 77
    # Ids that look like paths are data, never paths: every file is named by its key.
    assert rows["../../x"]["status"] == "ok" and rows["/etc/passwd"]["status"] == "ok"
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["00000.parquet", "00000.tar", "00000_stats.json", "00001.parquet", "00001.tar",
                     "00001_stats.json", "00002.parquet", "00002.tar", "00002_stats.json", "README.md",
                     "_SUCCESS", "_job.json", "preview", "sizes.json"]
    assert [p.name for p in (tmp_path / "out" / "preview").iterdir()] == ["card_contact_sheet.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "job.yaml", "out"]
    with tarfile.open(tmp_path / "out" / "00001.tar") as tar:
        assert all(n.startswith("0000100") for n in tar.getnames())


@pytest.mark.parametrize("case, message", [
    ("missing-column", "has no prompt column 'text'"),
    ("wrong-type", "prompt column 'prompt' has type int64"),
    ("empty-file", "has no rows"),
    ("unreadable", "is not a readable Parquet file"),
    ("bad-size", "generation.width=100"),
    ("pickle-model", "only pickle weights"),
])
def test_bad_input_is_refused_before_any_worker_starts(case, message, tmp_path, tiny_model):
    import pyarrow as pa

    (tmp_path / "in").mkdir()
    spec = {"model": {"source": str(tiny_model)}, "input": {"uri": str(tmp_path / "in")},
            "output": {"uri": str(tmp_path / "out")}, "safety": {"detector": "none"}}
    table = pa.table({"prompt_id": ["a"], "prompt": ["fine"]})
    if case == "missing-column":
        spec["input"]["prompt_column"] = "text"
    elif case == "wrong-type":
        table = pa.table({"prompt_id": ["a"], "prompt": [1]})
    elif case == "empty-file":
        table = table.slice(0, 0)
    elif case == "bad-size":
        spec["generation"] = {"width": 100}
    elif case == "pickle-model":
        shutil.copytree(tiny_model, tmp_path / "pickled")
        for f in (tmp_path / "pickled").rglob("*.safetensors"):
            f.with_suffix(".bin").write_bytes(b"pickle")
            f.unlink()
        spec["model"]["source"] = str(tmp_path / "pickled")
    pq.write_table(table, tmp_path / "in" / "p.parquet")
    if case == "unreadable":
        (tmp_path / "in" / "p.parquet").write_bytes(b"PAR1 not really")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    done = run_cli("run", str(tmp_path / "job.yaml"), env={"RAY_ADDRESS": ""})
    assert done.returncode == 1, done.stderr[-2000:]
    assert message in done.stderr
    if case in ("missing-column", "wrong-type", "empty-file", "unreadable"):
        assert "p.parquet" in done.stderr  # names the file
    assert not (tmp_path / "out").exists()  # refused before anything was written
    assert "Ray" not in done.stderr  # nor any worker started


# ----------------------------------------------------------------------------------- security


def test_credentials_never_reach_logs_or_outputs(tmp_path, tiny_model, bucket, ray_cluster):
    secret = "wJalrXUtnFEMI-SECRET-" + uuid.uuid4().hex
    out = f"s3://{bucket.bucket}/secret"
    spec = job_spec(tmp_path, tiny_model, bucket, out,
                    output={"storage_options": {"key": "testing", "secret": secret}})
    done = run_cli("-v", "run", str(spec), "--address", ray_cluster.address)
    assert done.returncode == 0, done.stderr[-3000:]
    assert secret not in done.stdout + done.stderr
    storage = output_fs(out)
    for path in storage.fs.find(storage.root):
        if not path.endswith(".tar"):
            assert secret.encode() not in storage.fs.cat_file(path), path
    job = storage.read_json("_job.json")
    assert job["spec"]["output"]["storage_options"] == {"key": "***", "secret": "***"}


def test_no_remote_code_and_no_unsafe_loading_in_the_source():
    """No call in the product loads pickles, unsafe YAML or remote code (docs may mention them)."""
    import ast

    unsafe_calls = {("torch", "load"), ("pickle", "load"), ("pickle", "loads"), ("yaml", "load")}
    found = []
    for path in [p for d in ("schemas", "jobs", "actors") for p in (REPO / d).rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and (f.value.id, f.attr) in unsafe_calls:
                found.append(f"{path.name}:{node.lineno} {f.value.id}.{f.attr}")
            for kw in node.keywords:
                if (kw.arg, getattr(kw.value, "value", None)) in (("trust_remote_code", True),
                                                                    ("use_safetensors", False)):
                    found.append(f"{path.name}:{node.lineno} {kw.arg}={kw.value.value}")
    assert found == []
    text = {f: (REPO / "actors" / f).read_text() for f in ("engine.py", "safety.py")}
    assert all("use_safetensors=True" in t for t in text.values())

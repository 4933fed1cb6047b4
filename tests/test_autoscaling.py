"""A job on a cluster that starts with no GPU: Ray's real autoscaler adds GPU nodes for it and removes them after.

The cluster is a real `ray start --head` with `--autoscaling-config` and the `fake_multinode` provider
(tests/fake_multinode.yaml): the head has 1 CPU and no GPU; the autoscaler's monitor starts each
"GPU node" as an extra raylet on this machine (logical GPU, no CUDA) and stops it once it has idled
for `idle_timeout_minutes`. Nothing is patched: the CLI connects by address as a user would.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from clusters import Sampler, make_temp_dir, proc_name, start_head
from helpers import free_port, job_dict, rows_of, run_cli, wait_for, write_prompts, write_spec

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).with_name("fake_multinode.yaml")
# The fake provider's deterministic node ids: ...00000 is the head, ...00001 and up the workers.
FAKE_HEAD_NODE_ID = "f" * 51 + "00000"
N_PROMPTS, SEEDS, PER_SHARD = 12, 3, 3  # 36 samples in 12 shards


@pytest.fixture
def autoscaling_head():
    temp_dir = make_temp_dir("sdf-as-")
    port = free_port()
    config = yaml.safe_load(CONFIG.read_text())
    # The fake nodes' raylets join this GCS (it listens on every interface, loopback included).
    config["provider"]["gcs_address"] = f"127.0.0.1:{port}"
    (temp_dir / "autoscaler.yaml").write_text(yaml.safe_dump(config))
    head_resources = config["available_node_types"]["ray.head.default"]["resources"]
    head = start_head(
        f"--autoscaling-config={temp_dir / 'autoscaler.yaml'}",
        f"--num-cpus={head_resources['CPU']}",
        f"--num-gpus={head_resources['GPU']}",
        "--object-store-memory=150000000",
        temp_dir=temp_dir,
        env={
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "RAY_FAKE_CLUSTER": "1",
            "SDFLEET_CACHE": str(temp_dir / "cache"),
        },  # inherited by the fake nodes too
        port=port,
    )
    try:
        yield head
    finally:
        head.stop()


def gpu_nodes(head) -> list[str]:
    return sorted(
        n["node_id"] for n in head.alive_nodes() if n.get("resources_total", {}).get("GPU")
    )


def raylets(head) -> list[int]:
    return [pid for pid in head.processes() if proc_name(pid) == "raylet"]


def test_job_scales_gpu_nodes_up_from_zero_and_back(tmp_path, tiny_model, autoscaling_head):
    head = autoscaling_head
    t0 = time.monotonic()
    assert gpu_nodes(head) == [], "the cluster must start without GPU nodes"
    assert [n["node_id"] for n in head.alive_nodes()] == [FAKE_HEAD_NODE_ID]

    write_prompts(
        tmp_path / "in" / "p.parquet",
        [f"a lighthouse at dusk, variation {i}" for i in range(N_PROMPTS)],
    )
    out = tmp_path / "out"
    spec = job_dict(
        tiny_model,
        tmp_path / "in",
        out,
        name="autoscaling",
        model={"scheduler": "EulerDiscreteScheduler"},
        # Slow enough per shard that the second node's worker is up before the first drains the queue.
        generation={"num_inference_steps": 30, "width": 64, "height": 64},
        sweep={"seeds": SEEDS},
        # The fake nodes are raylets on this machine: they all see tmp_path, as every node of a
        # real cluster sees an NFS mount. Undeclared, a local output here is refused.
        output={"image_format": "png", "samples_per_shard": PER_SHARD, "shared_filesystem": True},
        resources={"batch_size": 3, "max_workers": 2},
    )
    spec_path = write_spec(head.temp_dir, spec, "job.yaml")

    seen: set[str] = set()
    most = [0]

    def probe():
        nodes = gpu_nodes(head)
        seen.update(nodes)
        most[0] = max(most[0], len(nodes))

    # The spec lives in the cluster's temp dir, so the sampler counts the CLI's memory too.
    with Sampler(head, probe=probe) as sampler:
        done = run_cli(
            "run", str(spec_path), "--address", head.address, "--no-progress", timeout=300
        )
        job_s = time.monotonic() - t0
        assert done.returncode == 0, done.stderr[-4000:] + "\n" + head.logs("monitor.*")

        # Every planned sample exactly once, and the work spread over both GPU nodes the autoscaler added.
        rows = rows_of(str(out))
        samples = N_PROMPTS * SEEDS
        assert len(rows) == samples and len({r["key"] for r in rows}) == samples
        assert (out / "_SUCCESS").exists()
        assert most[0] == 2, (seen, done.stderr[-3000:])
        workers = {r["worker_node"] for r in rows}
        assert FAKE_HEAD_NODE_ID not in workers and None not in workers
        assert len(workers) == 2, (workers, done.stderr[-3000:])
        assert workers <= seen  # nodes the autoscaler started for this job

        # Released: the job withdrew its request and killed its actors, so the idle nodes go.
        t_done = time.monotonic()
        wait_for(
            lambda: not gpu_nodes(head), 60, "the autoscaler to remove the idle GPU nodes", poll=1
        )
        release_s = time.monotonic() - t_done
        assert [n["node_id"] for n in head.alive_nodes()] == [FAKE_HEAD_NODE_ID]
        # ... and their processes are gone, not just marked dead: one raylet left, the head's.
        wait_for(lambda: len(raylets(head)) == 1, 30, "the removed nodes' raylets to exit")
    total_s = time.monotonic() - t0
    per_node = {n[-5:]: sum(r["worker_node"] == n for r in rows) for n in sorted(workers)}
    print(
        f"\n[autoscaling] samples per node {per_node}; job {job_s:.1f}s, GPU nodes released "
        f"{release_s:.1f}s after, test body {total_s:.1f}s; {sampler.summary()}"
    )

"""Shared fixtures: the tiny model, a real S3 server over HTTP (moto), a real multi-GPU Ray cluster.

Nothing here patches the product: tests reach S3 through s3fs/pyarrow with an endpoint URL and
Ray through its own address, exactly as a user would.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
SDFLEET = [sys.executable, "-m", "jobs.cli"]

# Ray 2.60 turns token auth on once ~/.ray/auth_token exists (any embedded ray.init writes it);
# clients connecting by address then fail unless both sides agree. Tests run both sides here.
os.environ["RAY_AUTH_MODE"] = "disabled"
# Fewer background threads per test process on a 2-core machine.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# moto logs every HTTP request at INFO; failures are easier to read without them.
logging.getLogger("werkzeug").setLevel(logging.WARNING)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, poll: float = 0.1):
    """Poll until predicate() is truthy and return its value; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `sdfleet ...` as a user would, in a fresh process."""
    return subprocess.run(
        [*SDFLEET, *args], cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True,
        timeout=timeout,
    )


def write_prompts(path, prompts, ids=None, row_group_size=2, storage=None, **extra_columns) -> None:
    """A prompt Parquet file with several row groups, written locally or through an fsspec filesystem."""
    ids = ids if ids is not None else [f"p{i:03d}" for i in range(len(prompts))]
    table = pa.table({"prompt_id": ids, "prompt": prompts, **extra_columns})
    if storage is None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, row_group_size=row_group_size)
    else:
        with storage.open(path, "wb") as f:
            pq.write_table(table, f, row_group_size=row_group_size)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from actors.tiny import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd2")


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on loopback. Credentials are dummies; the endpoint comes from the environment."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3(s3_endpoint):
    """A fresh bucket and an s3fs filesystem on it."""
    import uuid

    import s3fs

    fs = s3fs.S3FileSystem()
    bucket = f"sdfleet-test-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    fs.bucket = bucket
    return fs


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory, s3_endpoint):
    """A Ray head with 2 logical GPUs on its own port and temp dir; stopped by its own handle only.

    Depends on s3_endpoint so the raylet, and hence every worker, inherits the S3 settings; the
    node-local model cache (SDFLEET_CACHE) is a per-node setting, so it is set before the node starts.
    """
    from ray.cluster_utils import Cluster

    temp_dir = tmp_path_factory.mktemp("ray")
    os.environ["SDFLEET_CACHE"] = str(tmp_path_factory.mktemp("node-cache"))
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "num_gpus": 2,
            "gcs_server_port": free_port(),
            "dashboard_port": free_port(),
            "temp_dir": str(temp_dir),
            "include_dashboard": False,
            "object_store_memory": 200 * 1024 * 1024,
            "metrics_export_port": free_port(),
        },
    )
    cluster.model_cache = Path(os.environ["SDFLEET_CACHE"])
    yield cluster
    cluster.shutdown()

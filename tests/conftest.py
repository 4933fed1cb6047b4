"""Shared fixtures: the tiny model, a real S3 server over HTTP (moto), a real multi-GPU Ray cluster,
and the files in infra/.

Nothing here patches the product: tests reach S3 through s3fs/pyarrow with an endpoint URL and
Ray through its own address, exactly as a user would.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import yaml

from helpers import CLUSTER_YAML, KUBERAY, bucket_with_prompts, free_port, one

# Ray 2.60 turns token auth on once ~/.ray/auth_token exists (any embedded ray.init writes it);
# clients connecting by address then fail unless both sides agree. Tests run both sides here.
os.environ["RAY_AUTH_MODE"] = "disabled"
# botocore asks the instance-metadata address (169.254.169.254) for credentials when it finds none:
# no test may reach beyond loopback.
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
# Nor the Hugging Face hub: hub ids resolve from the (empty) local cache only.
os.environ["HF_HUB_OFFLINE"] = "1"
# Fewer background threads per test process on a 2-core machine.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# moto logs every HTTP request at INFO; failures are easier to read without them.
logging.getLogger("werkzeug").setLevel(logging.WARNING)


def pytest_collection_modifyitems(items):
    """A test on the shared Ray cluster is slow (`make test-fast` skips it), whatever its file says."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from sdfleet.jobs.tiny import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd2")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> dict[str, Path]:
    """The tiny SDXL base and refiner (`sdfleet tiny-models`' `tiny-sdxl-*`), by variant."""
    from sdfleet.jobs.tiny_sdxl import TINY_SDXL_VARIANTS, write_tiny_sdxl

    folder = tmp_path_factory.mktemp("sdxl")
    return {v: write_tiny_sdxl(folder / f"tiny-sdxl-{v}", v) for v in TINY_SDXL_VARIANTS}


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    """The tiny SD3.5 pipeline (`sdfleet tiny-models`' `tiny-sd3`)."""
    from sdfleet.jobs.tiny_sd3 import write_tiny_sd3

    return write_tiny_sd3(tmp_path_factory.mktemp("sd3") / "tiny-sd3")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> dict[str, Path]:
    """The tiny FLUX.1 dev-, schnell- and Fill-shaped checkpoints (`sdfleet tiny-models`' `tiny-flux-*`),
    by variant."""
    from sdfleet.jobs.tiny_flux import TINY_FLUX_VARIANTS, write_tiny_flux

    folder = tmp_path_factory.mktemp("flux")
    return {v: write_tiny_flux(folder / f"tiny-flux-{v}", v) for v in TINY_FLUX_VARIANTS}


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


@pytest.fixture
def bucket(s3_endpoint):
    """A new bucket holding the fault tests' prompt table (`helpers.bucket_with_prompts`)."""
    return bucket_with_prompts("faults")


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory, s3_endpoint):
    """A Ray head with 2 logical GPUs and 2 CPUs, on its own ports and temp dir (`clusters.start_head`).

    Depends on s3_endpoint so every process of the cluster inherits the S3 settings; the node-local
    model cache (SDFLEET_CACHE) is a per-node setting, so the cluster is started with it. No dashboard:
    nothing here submits jobs or asks the state API, and it would double the cluster's memory.
    """
    from clusters import make_temp_dir, start_head

    model_cache = tmp_path_factory.mktemp("node-cache")
    head = start_head(
        "--num-cpus=2",
        "--num-gpus=2",
        "--object-store-memory=200000000",
        "--include-dashboard=false",
        temp_dir=make_temp_dir("sdf-rc-"),
        env={"SDFLEET_CACHE": str(model_cache)},
    )
    head.model_cache = model_cache
    yield head
    head.stop()


# ------------------------------------------------------------------------------------- infra/


@pytest.fixture(scope="module")
def cluster_yaml() -> dict:
    """The Ray cluster launcher config (AWS)."""
    cfg = yaml.safe_load(CLUSTER_YAML.read_text())
    assert isinstance(cfg, dict)
    return cfg


@pytest.fixture(scope="module")
def raycluster() -> dict:
    return one(KUBERAY / "raycluster.yaml", "RayCluster")


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return one(KUBERAY / "rayjob.yaml", "RayJob")


@pytest.fixture(scope="module")
def cronjob() -> dict:
    return one(KUBERAY / "cronjob.yaml", "CronJob")


@pytest.fixture(scope="module")
def configmap() -> dict:
    return one(KUBERAY / "job-spec-configmap.yaml", "ConfigMap")


@pytest.fixture(scope="module")
def service_account() -> dict:
    return one(KUBERAY / "serviceaccount.yaml", "ServiceAccount")

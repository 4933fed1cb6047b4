"""The Ray cluster launcher config (infra/aws/cluster.yaml), checked without `ray up`: it passes Ray's
own JSON schema and config preparation, its GPU workers scale from zero off a CPU head, Ray's
autoscaler picks the intended GPU type for sdfleet's request, and the spec it mounts is a valid
sdfleet spec.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from helpers import INFRA, REPO
from sdfleet.schemas.spec import parse_spec

AWS_SPEC = INFRA / "aws" / "specs" / "job.yaml"
# GPUs per instance for the EC2 types the launcher config may use.
GPUS_PER_INSTANCE = {
    "g5.xlarge": 1,
    "g5.2xlarge": 1,
    "g5.12xlarge": 4,
    "g5.48xlarge": 8,
    "p4d.24xlarge": 8,
    "p5.48xlarge": 8,
}


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def gpu_node_types(cluster: dict) -> dict[str, dict]:
    return {
        name: t
        for name, t in cluster["available_node_types"].items()
        if t["resources"].get("GPU", 0) >= 1
    }


def test_cluster_yaml_passes_rays_json_schema(cluster_yaml, ray_schema):
    jsonschema.validate(cluster_yaml, ray_schema)


@pytest.mark.parametrize(
    "breakage",
    [
        lambda c: c.update(idle_timeout_minute=5),  # misspelt key
        lambda c: c["available_node_types"]["gpu.g5.xlarge"]["resources"].update(
            GPU="1"
        ),  # not an int
        lambda c: c["available_node_types"]["gpu.g5.xlarge"].pop("node_config"),  # required
        lambda c: c["docker"].update(gpus=True),  # unknown docker key
    ],
)
def test_rays_schema_catches_broken_variants(cluster_yaml, ray_schema, breakage):
    # The schema check above has teeth: the same config, broken in one place, is rejected.
    broken = copy.deepcopy(cluster_yaml)
    breakage(broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, ray_schema)


def test_cluster_yaml_passes_rays_own_preparation(cluster_yaml):
    # What `ray up` does with the file before touching AWS: merge Ray's AWS defaults, check docker,
    # fill per-type min/max workers, validate (schema, head type, sum of min_workers).
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster_yaml))
    validate_config(prepared)
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


def test_cluster_yaml_runs_on_aws_with_a_cpu_head_that_takes_no_gpu_work(cluster_yaml):
    provider = cluster_yaml["provider"]
    assert provider["type"] == "aws"
    assert re.fullmatch(r"[a-z]{2}-[a-z]+-\d", provider["region"])
    for zone in provider.get("availability_zone", provider["region"] + "a").split(","):
        assert zone.startswith(provider["region"]), f"zone {zone} is not in {provider['region']}"
    assert provider["cache_stopped_nodes"] is False
    assert cluster_yaml["auth"]["ssh_user"] == "ubuntu"

    head = cluster_yaml["available_node_types"][cluster_yaml["head_node_type"]]
    assert head["resources"]["GPU"] == 0, "GPU work must never be scheduled on the head"
    assert head["resources"]["CPU"] >= 1
    assert head["node_config"]["InstanceType"] not in GPUS_PER_INSTANCE, (
        "the head should be a CPU instance"
    )
    starts = " ".join(cluster_yaml["head_start_ray_commands"])
    assert "ray start --head" in starts
    assert "--num-gpus=0" in starts
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in starts
    assert any(
        "ray start --address=$RAY_HEAD_IP:6379" in c
        for c in cluster_yaml["worker_start_ray_commands"]
    )


def test_cluster_yaml_gpu_workers_scale_from_zero(cluster_yaml):
    gpu_types = gpu_node_types(cluster_yaml)
    assert {t["node_config"]["InstanceType"] for t in gpu_types.values()} >= {
        "g5.xlarge",
        "p4d.24xlarge",
        "p5.48xlarge",
    }
    for name, t in gpu_types.items():
        itype = t["node_config"]["InstanceType"]
        assert t["min_workers"] == 0, f"{name}: an idle cluster should hold no GPU node"
        assert t["resources"]["GPU"] == GPUS_PER_INSTANCE[itype], (
            f"{name}: {itype} has {GPUS_PER_INSTANCE[itype]} GPUs"
        )
        # Per-type docker options replace the global worker_run_options, so each repeats --gpus.
        opts = t.get("docker", {}).get(
            "worker_run_options", cluster_yaml["docker"].get("worker_run_options", [])
        )
        assert "--gpus all" in opts, f"{name}: its container would not see the GPUs"
        assert t["node_config"]["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] >= 100
    enabled = {n: t for n, t in gpu_types.items() if t["max_workers"] > 0}
    assert enabled, "no GPU worker type can be launched"
    assert all(t["max_workers"] <= cluster_yaml["max_workers"] for t in enabled.values())
    assert 0 < cluster_yaml["idle_timeout_minutes"] <= 30
    assert cluster_yaml["upscaling_speed"] > 0
    # --gpus all on a CPU head fails `docker run`: it belongs to the workers only.
    docker = cluster_yaml["docker"]
    assert not any(
        "--gpus" in o for o in docker.get("run_options", []) + docker.get("head_run_options", [])
    )


def test_autoscaler_launches_only_the_chosen_gpu_type(cluster_yaml):
    # Ask Ray's own bin-packing which nodes it would add for sdfleet's request (one {GPU: 1}
    # bundle per actor, resources.max_workers of them).
    import functools

    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import (
        _default_utilization_scorer,
        get_nodes_for,
    )
    from ray.autoscaler._private.util import prepare_config

    prepared = prepare_config(copy.deepcopy(cluster_yaml))
    scorer = functools.partial(
        _default_utilization_scorer,
        node_availability_summary=NodeAvailabilitySummary(node_availabilities={}),
    )
    spec = parse_spec(yaml.safe_load(AWS_SPEC.read_text()))
    for n in (1, 4, spec.resources.max_workers):
        to_launch, unfulfilled = get_nodes_for(
            prepared["available_node_types"],
            {},
            prepared["head_node_type"],
            prepared["max_workers"],
            [{"GPU": 1}] * n,
            scorer,
        )
        assert dict(to_launch) == {"gpu.g5.xlarge": n}, (
            f"{n} GPU(s): the autoscaler would launch {dict(to_launch)}"
        )
        assert not unfulfilled


def test_cluster_yaml_containers_get_sdfleet_a_model_cache_the_specs_and_an_instance_profile(
    cluster_yaml,
):
    docker = cluster_yaml["docker"]
    assert docker["image"] and docker["container_name"] and docker["pull_before_run"] is True
    opts = " ".join(docker["run_options"])
    assert "SDFLEET_CACHE=" in opts and "-v /mnt/sdfleet-cache:" in opts
    assert "RAY_AUTH_MODE=" in opts, (
        "set Ray's auth mode explicitly so head, workers and clients agree"
    )
    assert any("sdfleet" in c for c in cluster_yaml["setup_commands"])
    # file_mounts: local paths exist (relative to the repo root, where `ray up` runs), and the
    # mounted spec parses with sdfleet's own parser.
    assert cluster_yaml["file_mounts"]
    for remote, local in cluster_yaml["file_mounts"].items():
        assert (REPO / local).exists(), f"file_mounts {remote}: {local} does not exist"
    mounted = {remote: REPO / local for remote, local in cluster_yaml["file_mounts"].items()}
    assert mounted["/home/ray/specs"] == AWS_SPEC.parent
    # Worker profiles: the head's autoscaler passes them to new instances.
    for _name, t in gpu_node_types(cluster_yaml).items():
        assert t["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")


def test_aws_job_spec_is_a_valid_sdfleet_spec(cluster_yaml):
    spec = parse_spec(yaml.safe_load(AWS_SPEC.read_text()), str(AWS_SPEC))
    spec.safety.check_runnable()
    assert spec.input.uri.startswith("s3://") and spec.output.uri.startswith("s3://")
    assert spec.model.source.startswith("s3://"), (
        "SD2 base is no longer on the hub: use an s3:// mirror"
    )
    assert spec.safety.detector == "nsfw-detector" and spec.safety.model.startswith("s3://")
    capacity = sum(
        t["max_workers"] * t["resources"]["GPU"] for t in gpu_node_types(cluster_yaml).values()
    )
    assert spec.resources.max_workers <= capacity, (
        "the spec asks for more GPUs than the cluster may launch"
    )

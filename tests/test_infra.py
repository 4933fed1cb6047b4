"""The deployment files in infra/: checked here, never deployed from here.

`ray up`, `kubectl` and docker cannot run in CI, so these tests check what can be checked without
them: every YAML document parses; the cluster launcher config passes Ray's own JSON schema and
Ray's own config preparation, and Ray's autoscaler picks the intended GPU type for sdfleet's
request; the KubeRay and CronJob manifests have the fields that make them autoscale from zero
GPUs, keep GPU work off the head and use one image; the example job specs parse with sdfleet's
own parser; every `sdfleet` command line in them parses with sdfleet's own CLI; the Dockerfile
installs what the Makefile installs, in the same order; no file holds AWS credentials; and the
CronJob's submit script runs for real against a local Ray cluster with token auth.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from zoneinfo import ZoneInfo

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from schemas.spec import SpecError, parse_spec

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
CLUSTER_YAML = INFRA / "aws" / "cluster.yaml"
AWS_SPEC = INFRA / "aws" / "specs" / "job.yaml"
KUBERAY = INFRA / "kuberay"
DOCKERFILE = INFRA / "Dockerfile"
DOCKERIGNORE = INFRA / "Dockerfile.dockerignore"

# GPUs per instance for the EC2 types the launcher config may use.
GPUS_PER_INSTANCE = {"g5.xlarge": 1, "g5.2xlarge": 1, "g5.12xlarge": 4, "g5.48xlarge": 8,
                     "p4d.24xlarge": 8, "p5.48xlarge": 8}
CREDENTIAL_PATTERNS = [
    re.compile(r"AWS_SECRET_ACCESS_KEY\s*[=:]\s*\S"),
    re.compile(r"AWS_ACCESS_KEY_ID\s*[=:]\s*\S"),
    re.compile(r"AWS_SESSION_TOKEN\s*[=:]\s*\S"),
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # an access key id
    re.compile(r"aws_secret_access_key", re.I),
]


def load_all(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no YAML document"
    for d in docs:
        assert isinstance(d, dict), f"{path}: a document is a {type(d).__name__}, not a mapping"
    return docs


def one(path: Path, kind: str) -> dict:
    docs = [d for d in load_all(path) if d.get("kind") == kind]
    assert len(docs) == 1, f"{path}: expected one {kind}, found {len(docs)}"
    return docs[0]


@pytest.fixture(scope="module")
def cluster() -> dict:
    cfg = yaml.safe_load(CLUSTER_YAML.read_text())
    assert isinstance(cfg, dict)
    return cfg


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


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


def containers(pod_spec: dict) -> list[dict]:
    return list(pod_spec.get("initContainers", [])) + list(pod_spec["containers"])


def cron_pod_spec(cronjob: dict) -> dict:
    return cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def gpu_node_types(cluster: dict) -> dict[str, dict]:
    return {name: t for name, t in cluster["available_node_types"].items() if t["resources"].get("GPU", 0) >= 1}


def gpu_groups(cluster_spec: dict) -> list[dict]:
    groups = []
    for g in cluster_spec["workerGroupSpecs"]:
        limits = [c.get("resources", {}).get("limits", {}) for c in g["template"]["spec"]["containers"]]
        if any(int(lim.get("nvidia.com/gpu", 0)) >= 1 for lim in limits):
            groups.append(g)
    return groups


def check_sdfleet_command(line: str) -> list[str]:
    """`line` is a shell command whose sdfleet part must parse with sdfleet's own CLI."""
    from jobs.cli import build_parser

    words = shlex.split(line)
    assert "sdfleet" in words, f"no sdfleet command in {line!r}"
    argv = words[words.index("sdfleet") + 1:]
    try:
        build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"`{line}` is not a valid sdfleet command line")
    return argv


# ------------------------------------------------------------------------------------------
# Every YAML file parses, and no infra file holds credentials.


@pytest.mark.parametrize("path", sorted(INFRA.rglob("*.yaml")), ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_document_parses(path):
    for doc in load_all(path):
        if path.parent == KUBERAY:
            assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), (
                f"{path}: a Kubernetes object needs apiVersion, kind and metadata.name"
            )


def test_no_infra_file_holds_aws_credentials():
    files = [p for p in INFRA.rglob("*") if p.is_file()]
    assert DOCKERFILE in files and CLUSTER_YAML in files
    for path in files:
        text = path.read_text()
        for pattern in CREDENTIAL_PATTERNS:
            m = pattern.search(text)
            assert not m, f"{path.relative_to(REPO)} looks like it holds an AWS credential: {m.group(0)!r}"


def test_one_image_everywhere(cluster, raycluster, rayjob, cronjob):
    images = {("cluster.yaml", "docker.image"): cluster["docker"]["image"]}
    for key in ("head_image", "worker_image"):
        if key in cluster["docker"]:
            images[("cluster.yaml", f"docker.{key}")] = cluster["docker"][key]
    for name, t in cluster["available_node_types"].items():
        if "worker_image" in t.get("docker", {}):
            images[("cluster.yaml", name)] = t["docker"]["worker_image"]
    pods = {
        "raycluster.yaml head": raycluster["spec"]["headGroupSpec"]["template"]["spec"],
        "rayjob.yaml head": rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"],
        "cronjob.yaml": cron_pod_spec(cronjob),
    }
    for i, g in enumerate(raycluster["spec"]["workerGroupSpecs"]):
        pods[f"raycluster.yaml worker {i}"] = g["template"]["spec"]
    for i, g in enumerate(rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]):
        pods[f"rayjob.yaml worker {i}"] = g["template"]["spec"]
    for where, pod in pods.items():
        for c in containers(pod):
            assert c.get("image"), f"{where}: container {c.get('name')} has no image"
            images[(where, c["name"])] = c["image"]
    assert len(set(images.values())) == 1, f"different images: {images}"
    image = next(iter(images.values()))
    assert not image.endswith(":latest") and ":" in image.rsplit("/", 1)[-1], f"{image} has no pinned tag"
    # The Dockerfile's build command builds exactly that tag.
    assert f"-t {image} " in DOCKERFILE.read_text()


# ------------------------------------------------------------------------------------------
# The Ray cluster launcher config (AWS).


def test_cluster_yaml_passes_rays_json_schema(cluster, ray_schema):
    jsonschema.validate(cluster, ray_schema)


@pytest.mark.parametrize("breakage", [
    lambda c: c.update(idle_timeout_minute=5),                                    # misspelt key
    lambda c: c["available_node_types"]["gpu.g5.xlarge"]["resources"].update(GPU="1"),  # not an int
    lambda c: c["available_node_types"]["gpu.g5.xlarge"].pop("node_config"),      # required
    lambda c: c["docker"].update(gpus=True),                                      # unknown docker key
])
def test_rays_schema_catches_broken_variants(cluster, ray_schema, breakage):
    # The schema check above has teeth: the same config, broken in one place, is rejected.
    broken = copy.deepcopy(cluster)
    breakage(broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, ray_schema)


def test_cluster_yaml_passes_rays_own_preparation(cluster):
    # What `ray up` does with the file before touching AWS: merge Ray's AWS defaults, check docker,
    # fill per-type min/max workers, validate (schema, head type, sum of min_workers).
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


def test_cluster_yaml_aws_provider_and_head(cluster):
    provider = cluster["provider"]
    assert provider["type"] == "aws"
    assert re.fullmatch(r"[a-z]{2}-[a-z]+-\d", provider["region"])
    for zone in provider.get("availability_zone", provider["region"] + "a").split(","):
        assert zone.startswith(provider["region"]), f"zone {zone} is not in {provider['region']}"
    assert provider["cache_stopped_nodes"] is False
    assert cluster["auth"]["ssh_user"] == "ubuntu"

    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"]["GPU"] == 0, "GPU work must never be scheduled on the head"
    assert head["resources"]["CPU"] >= 1
    assert head["node_config"]["InstanceType"] not in GPUS_PER_INSTANCE, "the head should be a CPU instance"
    starts = " ".join(cluster["head_start_ray_commands"])
    assert "ray start --head" in starts
    assert "--num-gpus=0" in starts
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in starts
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in cluster["worker_start_ray_commands"])


def test_cluster_yaml_gpu_workers_scale_from_zero(cluster):
    gpu_types = gpu_node_types(cluster)
    assert {t["node_config"]["InstanceType"] for t in gpu_types.values()} >= {"g5.xlarge", "p4d.24xlarge", "p5.48xlarge"}
    for name, t in gpu_types.items():
        itype = t["node_config"]["InstanceType"]
        assert t["min_workers"] == 0, f"{name}: an idle cluster should hold no GPU node"
        assert t["resources"]["GPU"] == GPUS_PER_INSTANCE[itype], f"{name}: {itype} has {GPUS_PER_INSTANCE[itype]} GPUs"
        # Per-type docker options replace the global worker_run_options, so each repeats --gpus.
        opts = t.get("docker", {}).get("worker_run_options", cluster["docker"].get("worker_run_options", []))
        assert "--gpus all" in opts, f"{name}: its container would not see the GPUs"
        assert t["node_config"]["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] >= 100
    enabled = {n: t for n, t in gpu_types.items() if t["max_workers"] > 0}
    assert enabled, "no GPU worker type can be launched"
    assert all(t["max_workers"] <= cluster["max_workers"] for t in enabled.values())
    assert 0 < cluster["idle_timeout_minutes"] <= 30
    assert cluster["upscaling_speed"] > 0
    # --gpus all on a CPU head fails `docker run`: it belongs to the workers only.
    assert not any("--gpus" in o for o in cluster["docker"].get("run_options", []) + cluster["docker"].get("head_run_options", []))


def test_autoscaler_launches_only_the_chosen_gpu_type(cluster):
    # Ask Ray's own bin-packing which nodes it would add for sdfleet's request (one {GPU: 1}
    # bundle per actor, resources.max_workers of them).
    import functools

    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for

    from ray.autoscaler._private.util import prepare_config

    prepared = prepare_config(copy.deepcopy(cluster))
    scorer = functools.partial(_default_utilization_scorer,
                               node_availability_summary=NodeAvailabilitySummary(node_availabilities={}))
    spec = parse_spec(yaml.safe_load(AWS_SPEC.read_text()))
    for n in (1, 4, spec.resources.max_workers):
        to_launch, unfulfilled = get_nodes_for(prepared["available_node_types"], {}, prepared["head_node_type"],
                                               prepared["max_workers"], [{"GPU": 1}] * n, scorer)
        assert dict(to_launch) == {"gpu.g5.xlarge": n}, f"{n} GPU(s): the autoscaler would launch {dict(to_launch)}"
        assert not unfulfilled


def test_cluster_yaml_docker_and_sdfleet(cluster):
    docker = cluster["docker"]
    assert docker["image"] and docker["container_name"] and docker["pull_before_run"] is True
    opts = " ".join(docker["run_options"])
    assert "SDFLEET_CACHE=" in opts and "-v /mnt/sdfleet-cache:" in opts
    assert "RAY_AUTH_MODE=" in opts, "set Ray's auth mode explicitly so head, workers and clients agree"
    assert any("sdfleet" in c for c in cluster["setup_commands"])
    # file_mounts: local paths exist (relative to the repo root, where `ray up` runs), and the
    # mounted spec parses with sdfleet's own parser.
    assert cluster["file_mounts"]
    for remote, local in cluster["file_mounts"].items():
        assert (REPO / local).exists(), f"file_mounts {remote}: {local} does not exist"
    mounted = {remote: REPO / local for remote, local in cluster["file_mounts"].items()}
    assert mounted["/home/ray/specs"] == AWS_SPEC.parent
    # Worker profiles: the head's autoscaler passes them to new instances.
    for name, t in gpu_node_types(cluster).items():
        assert t["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")


def test_aws_job_spec_is_a_valid_sdfleet_spec(cluster):
    spec = parse_spec(yaml.safe_load(AWS_SPEC.read_text()), str(AWS_SPEC))
    spec.safety.check_runnable()
    assert spec.input.uri.startswith("s3://") and spec.output.uri.startswith("s3://")
    assert spec.model.source.startswith("s3://"), "SD2 base is no longer on the hub: use an s3:// mirror"
    assert spec.safety.detector == "nsfw-detector" and spec.safety.model.startswith("s3://")
    capacity = sum(t["max_workers"] * t["resources"]["GPU"] for t in gpu_node_types(cluster).values())
    assert spec.resources.max_workers <= capacity, "the spec asks for more GPUs than the cluster may launch"


# ------------------------------------------------------------------------------------------
# KubeRay: RayCluster, RayJob, ConfigMap, ServiceAccount.


def check_ray_cluster_spec(spec: dict, where: str) -> None:
    assert spec["enableInTreeAutoscaling"] is True, f"{where}: autoscaling is off"
    opts = spec["autoscalerOptions"]
    assert opts["upscalingMode"] in ("Default", "Aggressive", "Conservative")
    assert isinstance(opts["idleTimeoutSeconds"], int) and opts["idleTimeoutSeconds"] > 0
    assert spec["rayVersion"] == __import__("ray").__version__, f"{where}: rayVersion differs from the Ray sdfleet uses"
    assert spec["authOptions"]["mode"] == "token"

    head = spec["headGroupSpec"]
    params = head["rayStartParams"]
    assert params["num-gpus"] == "0", f"{where}: the head must advertise no GPU"
    assert params["dashboard-host"] == "0.0.0.0"
    head_pod = head["template"]["spec"]
    head_container = head_pod["containers"][0]
    ports = {p["containerPort"] for p in head_container["ports"]}
    assert ports >= {6379, 8265, 10001}
    assert not any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in head_pod["containers"])

    groups = gpu_groups(spec)
    assert groups, f"{where}: no worker group with an nvidia.com/gpu limit"
    for g in groups:
        assert g["minReplicas"] == 0 < g["maxReplicas"], f"{where}: {g['groupName']} must scale from 0"
        assert g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"]
        pod = g["template"]["spec"]
        gpus = int(pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        assert g["rayStartParams"]["num-gpus"] == str(gpus), f"{where}: Ray's GPU count must match the pod's limit"
        assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), "GPU nodes are tainted"
        assert pod.get("nodeSelector"), f"{where}: GPU workers should be pinned to GPU nodes"
        assert pod.get("terminationGracePeriodSeconds", 30) > 0
        env = {e["name"]: e for e in pod["containers"][0].get("env", [])}
        assert "SDFLEET_CACHE" in env and "AWS_REGION" in env

    for group in [head, *spec["workerGroupSpecs"]]:
        # KubeRay's rayStartParams is map[string]string: a YAML number would be rejected.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), f"{where}: {group['rayStartParams']}"
        pod = group["template"]["spec"]
        assert pod["serviceAccountName"] == "sdfleet"
        for c in containers(pod):
            assert c.get("image"), f"{where}: container {c['name']} has no image"
            for e in c.get("env", []):
                assert not (e["name"].startswith("AWS_") and ("SECRET" in e["name"] or "KEY" in e["name"]
                                                               or "TOKEN" in e["name"])), f"{where}: {e['name']}"


def test_raycluster(raycluster):
    assert raycluster["apiVersion"] == "ray.io/v1"
    assert raycluster["kind"] == "RayCluster"
    check_ray_cluster_spec(raycluster["spec"], "raycluster.yaml")


def test_raycluster_check_has_teeth(raycluster):
    for breakage in (
        lambda s: s.update(enableInTreeAutoscaling=False),
        lambda s: s["headGroupSpec"]["rayStartParams"].update({"num-gpus": 0}),
        lambda s: s["workerGroupSpecs"][0].update(minReplicas=1),
        lambda s: s["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"].pop("nvidia.com/gpu"),
        lambda s: s["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].pop("image"),
    ):
        broken = copy.deepcopy(raycluster["spec"])
        breakage(broken)
        with pytest.raises((AssertionError, KeyError)):
            check_ray_cluster_spec(broken, "broken")


def test_rayjob(rayjob, configmap):
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode", "SidecarMode")
    assert spec["entrypoint"].startswith("sdfleet run ")
    argv = check_sdfleet_command(spec["entrypoint"])
    assert "--no-progress" in argv and "--address" not in argv, "inside a Ray job sdfleet finds the cluster itself"
    check_ray_cluster_spec(spec["rayClusterSpec"], "rayjob.yaml")

    # The spec file the entrypoint names is the ConfigMap's, mounted on the head (the driver runs there).
    spec_path = Path(argv[1])
    head_pod = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head_pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in head_pod["volumes"]}
    [name] = [n for n, path in mounts.items() if Path(path) == spec_path.parent]
    assert volumes[name]["configMap"]["name"] == configmap["metadata"]["name"]
    assert spec_path.name in configmap["data"]


def test_rayjob_cluster_is_the_raycluster(rayjob, raycluster):
    # rayjob.yaml repeats raycluster.yaml's cluster (plus the spec volume on the head): keep them in step.
    a, b = rayjob["spec"]["rayClusterSpec"], raycluster["spec"]
    for key in ("rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "authOptions", "workerGroupSpecs"):
        assert a[key] == b[key], f"rayjob.yaml and raycluster.yaml differ in {key}"
    ha, hb = a["headGroupSpec"], b["headGroupSpec"]
    assert ha["rayStartParams"] == hb["rayStartParams"]
    ca, cb = ha["template"]["spec"]["containers"][0], hb["template"]["spec"]["containers"][0]
    for key in ("image", "env", "resources", "ports"):
        assert ca[key] == cb[key], f"head container {key} differs"


def test_job_spec_configmap_is_a_valid_sdfleet_spec(configmap):
    assert configmap["apiVersion"] == "v1"
    text = configmap["data"]["job.yaml"]
    spec = parse_spec(yaml.safe_load(text), "job-spec-configmap.yaml")
    spec.safety.check_runnable()
    assert spec.input.uri.startswith("s3://") and spec.output.uri.startswith("s3://")
    assert spec.model.source.startswith("s3://"), "SD2 base is no longer on the hub: use an s3:// mirror"
    assert spec.safety.detector == "nsfw-detector" and spec.safety.model.startswith("s3://")
    assert spec.model.dtype == "float16"
    # The parser has teeth: a typo in that same spec is refused.
    broken = yaml.safe_load(text)
    broken["generation"] = {"guidence_scale": 7.5}
    with pytest.raises(SpecError):
        parse_spec(broken)


def test_gpu_groups_can_hold_every_actor_the_spec_asks_for(configmap, raycluster, rayjob):
    spec = parse_spec(yaml.safe_load(configmap["data"]["job.yaml"]))
    for where, cs in (("raycluster.yaml", raycluster["spec"]), ("rayjob.yaml", rayjob["spec"]["rayClusterSpec"])):
        gpus = sum(g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
                   for g in gpu_groups(cs))
        assert spec.resources.max_workers * spec.resources.gpus_per_worker <= gpus, where


def test_service_account_uses_irsa(service_account):
    assert service_account["metadata"]["name"] == "sdfleet"
    arn = service_account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+", arn)


# ------------------------------------------------------------------------------------------
# The nightly CronJob.

CRON_FIELDS = [(0, 59, {}), (0, 23, {}), (1, 31, {}),
               (1, 12, {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())}),
               (0, 7, {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())})]


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


@pytest.mark.parametrize("expr,ok", [
    ("0 2 * * *", True), ("*/15 0-6 * * mon-fri", True), ("30 1 1,15 * *", True),
    ("0 2 * *", False), ("60 2 * * *", False), ("0 24 * * *", False), ("@nightly", False),
    ("0 2 * * 8", False), ("*/0 * * * *", False), ("0 5-2 * * *", False),
])
def test_cron_checker(expr, ok):
    assert valid_cron(expr) is ok


def test_cronjob(cronjob, raycluster, configmap, service_account):
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
    assert len(entries) == 1, f"the CronJob's command/args should hold one `sdfleet run` entrypoint: {c.get('args')}"
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def token_ray_cluster(tmp_path):
    """A local Ray head with its dashboard (the job API) and token auth, in its own process.

    Its own temp dir and every port its own (the dashboard agent's default, 52365, may be taken by
    another Ray on this machine); stopped through its own handle, never with `ray stop`.
    """
    token = "sdfleet-test-" + os.urandom(16).hex()
    home = tmp_path / "home"
    home.mkdir()
    temp_dir = tempfile.mkdtemp(prefix="sdf-infra-", dir="/tmp")  # short: Unix socket paths cap at 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "HOME": str(home),
           "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    dashboard_port = free_port()
    head_args = {
        "num_cpus": 2, "num_gpus": 0, "temp_dir": temp_dir, "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port, "gcs_server_port": free_port(),
        "dashboard_agent_listen_port": free_port(), "metrics_agent_port": free_port(),
        "runtime_env_agent_port": free_port(), "metrics_export_port": free_port(),
        "ray_client_server_port": free_port(),
    }
    stop = tmp_path / "stop"
    code = (
        "import os, time\n"
        "from ray.cluster_utils import Cluster\n"
        f"cluster = Cluster(initialize_head=True, head_node_args={head_args!r})\n"
        "print('UP', flush=True)\n"
        f"while not os.path.exists({str(stop)!r}): time.sleep(0.2)\n"
        "cluster.shutdown()\n"
    )
    # Output to a file, not a pipe: a pipe nobody reads fills up and blocks Ray's processes.
    log = tmp_path / "cluster.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while "UP" not in log.read_text().split():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        url = f"http://127.0.0.1:{dashboard_port}"
        while True:
            try:
                urllib.request.urlopen(url + "/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # answering (401: it wants the token)
            except OSError:
                assert time.time() < deadline, "the dashboard did not come up"
                time.sleep(0.5)
        yield url, env
    finally:
        stop.touch()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cronjob_script_submits_follows_and_reports(cronjob, token_ray_cluster, tmp_path):
    # The CronJob's own script, run against a real Ray job API with token auth. The entrypoint is
    # `sdfleet plan` (no GPU here); everything else is what the pod does.
    url, cluster_env = token_ray_cluster
    [c] = cron_pod_spec(cronjob)["containers"]
    script = c["command"][2]
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt_id": ["a", "b", "c"], "prompt": ["x", "y", "z"]}), prompts)
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "job.yaml").write_text(yaml.safe_dump({
        "name": "cron-check", "input": {"uri": str(prompts)}, "output": {"uri": str(tmp_path / "out")},
        "safety": {"detector": "none"}}))
    (specs / "..data").mkdir()  # as in a ConfigMap volume: not shipped
    env = {**cluster_env, "RAY_API_SERVER_ADDRESS": url, "SDFLEET_SPEC_DIR": str(specs), "SDFLEET_POLL_S": "0.5",
           "SDFLEET_RETRY_S": "60"}

    def run(entrypoint: str, **extra) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", script, entrypoint], env={**env, **extra},
                              capture_output=True, text=True, timeout=180)

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
    pre = subprocess.run([sys.executable, "-c",
                          "from ray.job_submission import JobSubmissionClient as C\n"
                          "print(C().submit_job(entrypoint='sleep 3; echo earlier-run-done',"
                          " submission_id='sdfleet-nightly-00000000-000000'))"],
                         env=env, capture_output=True, text=True, timeout=60)
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


# ------------------------------------------------------------------------------------------
# The Dockerfile.


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def test_dockerfile_base_is_a_pinned_ray_gpu_image():
    froms = [args for ins, args in dockerfile_instructions() if ins == "FROM"]
    assert froms
    import ray

    for ref in froms:
        image = ref.split()[0]
        assert "$" not in image, "FROM should name its image literally"
        name, _, tag = image.partition("@")[0].rpartition(":")
        assert name and tag and tag != "latest", f"FROM {image} is not pinned"
    base = froms[0].split()[0]
    assert base.startswith("rayproject/ray:"), base
    # Ray in the image == Ray sdfleet is developed with == rayVersion of the KubeRay manifests.
    assert base.split(":")[1].split("-")[0] == ray.__version__
    assert "-py311" in base and "-gpu" in base


def test_dockerfile_installs_like_the_makefile():
    makefile = (REPO / "Makefile").read_text()
    torch_pin = re.search(r"^TORCH\s*\?=\s*(\S+)", makefile, re.M).group(1)
    nsfw_pin = re.search(r"--no-deps\s+\"?(nsfw-detector==[\d.]+)", makefile).group(1)
    assert torch_pin == "torch==2.13.0"

    runs = [args for ins, args in dockerfile_instructions() if ins == "RUN"]
    installs = [i for i, r in enumerate(runs) if "pip install" in r]

    def first(pattern: str) -> tuple[int, int]:
        """(RUN index, offset in it) of the first install matching `pattern`."""
        hits = [(i, m.start()) for i in installs if (m := re.search(pattern, runs[i]))]
        assert hits, f"no RUN matches {pattern!r}"
        return hits[0]

    torch_at = first(re.escape(torch_pin) + r"\b")
    project_at = first(r"pip install\s+[\"']?\.\[nsfw\]")
    detector_at = first(r"pip install\s+--no-deps\s+[\"']?" + re.escape(nsfw_pin))
    assert torch_at < project_at < detector_at, "torch first, then the project with its nsfw extra, then nsfw-detector"
    assert not any(re.search(r"\.\[[^\]]*test", r) for r in runs), "no test extra in the image"
    assert not any(re.search(r"pip install\s+(-e|--editable)\b", r) for r in runs)

    envs = " ".join(args for ins, args in dockerfile_instructions() if ins == "ENV")
    assert re.search(r"\bTF_USE_LEGACY_KERAS=1\b", envs)
    assert not any(ins in ("ENTRYPOINT", "CMD") for ins, _ in dockerfile_instructions()), "keep the Ray image's own"
    for ins, args in dockerfile_instructions():
        if ins in ("ENV", "ARG"):
            assert not re.search(r"AWS_(SECRET|ACCESS_KEY|SESSION_TOKEN)", args), f"{ins} {args}: no credentials in images"


def test_dockerfile_context_is_only_what_it_copies():
    # infra/Dockerfile.dockerignore is an allow-list; every COPY source must be on it, and the
    # heavy or private parts of the repository must not be.
    lines = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"
    allowed = {ln[1:] for ln in lines if ln.startswith("!")}
    for ins, args in dockerfile_instructions():
        if ins == "COPY":
            sources = [w for w in args.split() if not w.startswith("--")][:-1]
            for src in sources:
                assert src in allowed, f"COPY {src}: excluded by {DOCKERIGNORE.name}"
                assert (REPO / src).exists(), f"COPY {src}: not in the repository"
    assert not allowed & {".venv", ".git", "sdfleet-demo", "tests", "."}
    for pkg in ("schemas", "jobs", "actors"):
        assert pkg in allowed
    # The project's own package list, so a new top-level package is not silently left out.
    pyproject = (REPO / "pyproject.toml").read_text()
    includes = re.search(r"include\s*=\s*\[([^\]]*)\]", pyproject).group(1)
    assert {p.strip(' "*') for p in includes.split(",") if p.strip()} <= allowed


# ------------------------------------------------------------------------------------------
# The guide.


def test_readme_is_a_complete_and_honest_guide():
    text = (INFRA / "README.md").read_text()
    for needed in ("docker build -f infra/Dockerfile", "ray up infra/aws/cluster.yaml", "ray job submit",
                   "sdfleet run", "sdfleet status s3://", "ray down infra/aws/cluster.yaml",
                   "helm install", "kubectl apply -f infra/kuberay/rayjob.yaml", "kubectl apply -f infra/kuberay/cronjob.yaml",
                   "IRSA", "instance profile", "$SDFLEET_CACHE", "November 2025"):
        assert needed in text, f"infra/README.md does not mention {needed!r}"
    assert re.search(r"`ray up`, `kubectl`.*cannot run in this[\s>]+project's CI", text, re.S)
    # Every file it links to exists, and every file in infra/ is in its table.
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        if "://" not in link:
            assert (INFRA / link).resolve().exists(), f"infra/README.md links to missing {link}"
    for path in INFRA.rglob("*"):
        if path.is_file() and path.name != "README.md":
            assert str(path.relative_to(INFRA)) in text, f"infra/README.md does not list {path.relative_to(INFRA)}"
    # Its sdfleet command lines parse with the CLI.
    for line in re.findall(r"(sdfleet (?:run|plan|status) [^`\n]*?)(?:`|'|\n)", text):
        check_sdfleet_command(line.split("#")[0].strip())

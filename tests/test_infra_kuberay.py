"""The KubeRay manifests (infra/kuberay: RayCluster, RayJob, the job spec ConfigMap, the ServiceAccount),
checked without `kubectl`: they autoscale GPU workers from zero, keep GPU work off the head, use IRSA
instead of keys, and run a valid sdfleet spec with a valid sdfleet command line.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from helpers import check_sdfleet_command, containers
from sdfleet.schemas.spec import SpecError, parse_spec


def gpu_groups(cluster_spec: dict) -> list[dict]:
    groups = []
    for g in cluster_spec["workerGroupSpecs"]:
        limits = [
            c.get("resources", {}).get("limits", {}) for c in g["template"]["spec"]["containers"]
        ]
        if any(int(lim.get("nvidia.com/gpu", 0)) >= 1 for lim in limits):
            groups.append(g)
    return groups


def check_ray_cluster_spec(spec: dict, where: str) -> None:
    assert spec["enableInTreeAutoscaling"] is True, f"{where}: autoscaling is off"
    opts = spec["autoscalerOptions"]
    assert opts["upscalingMode"] in ("Default", "Aggressive", "Conservative")
    assert isinstance(opts["idleTimeoutSeconds"], int) and opts["idleTimeoutSeconds"] > 0
    assert spec["rayVersion"] == __import__("ray").__version__, (
        f"{where}: rayVersion differs from the Ray sdfleet uses"
    )
    assert spec["authOptions"]["mode"] == "token"

    head = spec["headGroupSpec"]
    params = head["rayStartParams"]
    assert params["num-gpus"] == "0", f"{where}: the head must advertise no GPU"
    assert params["dashboard-host"] == "0.0.0.0"
    head_pod = head["template"]["spec"]
    head_container = head_pod["containers"][0]
    ports = {p["containerPort"] for p in head_container["ports"]}
    assert ports >= {6379, 8265, 10001}
    assert not any(
        "nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in head_pod["containers"]
    )

    groups = gpu_groups(spec)
    assert groups, f"{where}: no worker group with an nvidia.com/gpu limit"
    for g in groups:
        assert g["minReplicas"] == 0 < g["maxReplicas"], (
            f"{where}: {g['groupName']} must scale from 0"
        )
        assert g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"]
        pod = g["template"]["spec"]
        gpus = int(pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        assert g["rayStartParams"]["num-gpus"] == str(gpus), (
            f"{where}: Ray's GPU count must match the pod's limit"
        )
        assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), (
            "GPU nodes are tainted"
        )
        assert pod.get("nodeSelector"), f"{where}: GPU workers should be pinned to GPU nodes"
        assert pod.get("terminationGracePeriodSeconds", 30) > 0
        env = {e["name"]: e for e in pod["containers"][0].get("env", [])}
        assert "SDFLEET_CACHE" in env and "AWS_REGION" in env

    for group in [head, *spec["workerGroupSpecs"]]:
        # KubeRay's rayStartParams is map[string]string: a YAML number would be rejected.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), (
            f"{where}: {group['rayStartParams']}"
        )
        pod = group["template"]["spec"]
        assert pod["serviceAccountName"] == "sdfleet"
        for c in containers(pod):
            assert c.get("image"), f"{where}: container {c['name']} has no image"
            for e in c.get("env", []):
                assert not (
                    e["name"].startswith("AWS_")
                    and ("SECRET" in e["name"] or "KEY" in e["name"] or "TOKEN" in e["name"])
                ), f"{where}: {e['name']}"


def test_raycluster_autoscales_gpu_workers_from_zero_off_the_head(raycluster):
    assert raycluster["apiVersion"] == "ray.io/v1"
    assert raycluster["kind"] == "RayCluster"
    check_ray_cluster_spec(raycluster["spec"], "raycluster.yaml")


def test_raycluster_check_rejects_broken_variants(raycluster):
    for breakage in (
        lambda s: s.update(enableInTreeAutoscaling=False),
        lambda s: s["headGroupSpec"]["rayStartParams"].update({"num-gpus": 0}),
        lambda s: s["workerGroupSpecs"][0].update(minReplicas=1),
        lambda s: s["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"][
            "limits"
        ].pop("nvidia.com/gpu"),
        lambda s: s["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].pop("image"),
    ):
        broken = copy.deepcopy(raycluster["spec"])
        breakage(broken)
        with pytest.raises((AssertionError, KeyError)):
            check_ray_cluster_spec(broken, "broken")


def test_rayjob_runs_the_configmap_spec_on_its_own_cluster_and_tears_it_down(rayjob, configmap):
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode", "SidecarMode")
    assert spec["entrypoint"].startswith("sdfleet run ")
    argv = check_sdfleet_command(spec["entrypoint"])
    assert "--no-progress" in argv and "--address" not in argv, (
        "inside a Ray job sdfleet finds the cluster itself"
    )
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
    for key in (
        "rayVersion",
        "enableInTreeAutoscaling",
        "autoscalerOptions",
        "authOptions",
        "workerGroupSpecs",
    ):
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
    assert spec.model.source.startswith("s3://"), (
        "SD2 base is no longer on the hub: use an s3:// mirror"
    )
    assert spec.safety.detector == "nsfw-detector" and spec.safety.model.startswith("s3://")
    assert spec.model.dtype == "float16"
    # The parser has teeth: a typo in that same spec is refused.
    broken = yaml.safe_load(text)
    broken["generation"] = {"guidence_scale": 7.5}
    with pytest.raises(SpecError):
        parse_spec(broken)


def test_gpu_groups_can_hold_every_actor_the_spec_asks_for(configmap, raycluster, rayjob):
    spec = parse_spec(yaml.safe_load(configmap["data"]["job.yaml"]))
    for where, cs in (
        ("raycluster.yaml", raycluster["spec"]),
        ("rayjob.yaml", rayjob["spec"]["rayClusterSpec"]),
    ):
        gpus = sum(
            g["maxReplicas"]
            * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
            for g in gpu_groups(cs)
        )
        assert spec.resources.max_workers * spec.resources.gpus_per_worker <= gpus, where


def test_service_account_uses_irsa(service_account):
    assert service_account["metadata"]["name"] == "sdfleet"
    arn = service_account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+", arn)

"""The deployment files in infra/, checked here, never deployed from here: what holds across them all.

`ray up`, `kubectl` and docker cannot run in CI, so the tests of infra/ check what can be checked
without them; test_infra_*.py check the cluster launcher config, the KubeRay manifests, the nightly
CronJob and the Dockerfile. Here: every YAML document parses, no file holds AWS credentials, every
pod and node runs the one image the Dockerfile builds, and the README is a complete guide whose
`sdfleet` command lines parse with sdfleet's own CLI.
"""

from __future__ import annotations

import re

import pytest

from helpers import (
    CLUSTER_YAML,
    DOCKERFILE,
    INFRA,
    KUBERAY,
    REPO,
    check_sdfleet_command,
    containers,
    cron_pod_spec,
    load_all,
)

CREDENTIAL_PATTERNS = [
    re.compile(r"AWS_SECRET_ACCESS_KEY\s*[=:]\s*\S"),
    re.compile(r"AWS_ACCESS_KEY_ID\s*[=:]\s*\S"),
    re.compile(r"AWS_SESSION_TOKEN\s*[=:]\s*\S"),
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # an access key id
    re.compile(r"aws_secret_access_key", re.I),
]


@pytest.mark.parametrize(
    "path", sorted(INFRA.rglob("*.yaml")), ids=lambda p: str(p.relative_to(INFRA))
)
def test_every_yaml_document_parses(path):
    for doc in load_all(path):
        if path.parent == KUBERAY:
            assert (
                doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name")
            ), f"{path}: a Kubernetes object needs apiVersion, kind and metadata.name"


def test_no_infra_file_holds_aws_credentials():
    files = [p for p in INFRA.rglob("*") if p.is_file()]
    assert DOCKERFILE in files and CLUSTER_YAML in files
    for path in files:
        text = path.read_text()
        for pattern in CREDENTIAL_PATTERNS:
            m = pattern.search(text)
            assert not m, (
                f"{path.relative_to(REPO)} looks like it holds an AWS credential: {m.group(0)!r}"
            )


def test_every_node_and_pod_runs_the_one_pinned_image_the_dockerfile_builds(
    cluster_yaml, raycluster, rayjob, cronjob
):
    images = {("cluster.yaml", "docker.image"): cluster_yaml["docker"]["image"]}
    for key in ("head_image", "worker_image"):
        if key in cluster_yaml["docker"]:
            images[("cluster.yaml", f"docker.{key}")] = cluster_yaml["docker"][key]
    for name, t in cluster_yaml["available_node_types"].items():
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
    assert not image.endswith(":latest") and ":" in image.rsplit("/", 1)[-1], (
        f"{image} has no pinned tag"
    )
    # The Dockerfile's build command builds exactly that tag.
    assert f"-t {image} " in DOCKERFILE.read_text()


def test_readme_is_a_complete_and_honest_guide():
    text = (INFRA / "README.md").read_text()
    for needed in (
        "docker build -f infra/Dockerfile",
        "ray up infra/aws/cluster.yaml",
        "ray job submit",
        "sdfleet run",
        "sdfleet status s3://",
        "ray down infra/aws/cluster.yaml",
        "helm install",
        "kubectl apply -f infra/kuberay/rayjob.yaml",
        "kubectl apply -f infra/kuberay/cronjob.yaml",
        "IRSA",
        "instance profile",
        "$SDFLEET_CACHE",
        "November 2025",
    ):
        assert needed in text, f"infra/README.md does not mention {needed!r}"
    assert re.search(r"`ray up`, `kubectl`.*cannot run in this[\s>]+project's CI", text, re.S)
    # Every file it links to exists, and every file in infra/ is in its table.
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        if "://" not in link:
            assert (INFRA / link).resolve().exists(), f"infra/README.md links to missing {link}"
    for path in INFRA.rglob("*"):
        if path.is_file() and path.name != "README.md":
            assert str(path.relative_to(INFRA)) in text, (
                f"infra/README.md does not list {path.relative_to(INFRA)}"
            )
    # Its sdfleet command lines parse with the CLI.
    for line in re.findall(r"(sdfleet (?:run|plan|status) [^`\n]*?)(?:`|'|\n)", text):
        check_sdfleet_command(line.split("#")[0].strip())

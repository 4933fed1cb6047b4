"""The Dockerfile (infra/Dockerfile), checked without docker: a pinned Ray GPU base image, the installs
the Makefile does in the same order, and a build context of only what it copies.
"""

from __future__ import annotations

import re
import tomllib

from helpers import DOCKERFILE, INFRA, REPO

DOCKERIGNORE = INFRA / "Dockerfile.dockerignore"


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
    assert torch_at < project_at < detector_at, (
        "torch first, then the project with its nsfw extra, then nsfw-detector"
    )
    assert not any(re.search(r"\.\[[^\]]*test", r) for r in runs), "no test extra in the image"
    assert not any(re.search(r"pip install\s+(-e|--editable)\b", r) for r in runs)

    envs = " ".join(args for ins, args in dockerfile_instructions() if ins == "ENV")
    assert re.search(r"\bTF_USE_LEGACY_KERAS=1\b", envs)
    assert not any(ins in ("ENTRYPOINT", "CMD") for ins, _ in dockerfile_instructions()), (
        "keep the Ray image's own"
    )
    for ins, args in dockerfile_instructions():
        if ins in ("ENV", "ARG"):
            assert not re.search(r"AWS_(SECRET|ACCESS_KEY|SESSION_TOKEN)", args), (
                f"{ins} {args}: no credentials in images"
            )


def test_dockerfile_context_is_only_what_it_copies():
    # infra/Dockerfile.dockerignore is an allow-list; every COPY source must be on it, and the
    # heavy or private parts of the repository must not be.
    lines = [
        ln.strip()
        for ln in DOCKERIGNORE.read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
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
    # The folders the project's packages come from, so a new top-level one is not silently left out.
    package_dirs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ]
    assert {folder.split("/")[0] for folder in package_dirs.values()} <= allowed

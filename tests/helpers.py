"""What several test files share: ports and polling, the CLI as a user runs it, prompt tables, the
checks of a finished output, and the files in infra/. Fixtures live in conftest.py."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SDFLEET = [sys.executable, "-m", "sdfleet.jobs.cli"]


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


# ------------------------------------------------------------------------------------ the CLI


def run_cli(
    *args: str, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run `sdfleet ...` as a user would, in a fresh process. `env` adds to this environment; a
    value of None unsets the variable."""
    return subprocess.run(
        [*SDFLEET, *args],
        cwd=REPO,
        env=_environment(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    """`sdfleet ...` in the background, for tests that act while it runs."""
    return subprocess.Popen(
        [*SDFLEET, *args],
        cwd=REPO,
        env=_environment(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _environment(changes: dict | None) -> dict:
    env = {**os.environ, **(changes or {})}
    return {k: v for k, v in env.items() if v is not None}


def loaded_by(imports: str, modules: tuple[str, ...]) -> list[str]:
    """Which of `modules` a fresh Python has loaded after `import {imports}`: what a light import
    path (the CLI building its parser) must keep out."""
    code = f"import sys, {imports}; print(sorted(m for m in {modules!r} if m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().replace("'", '"'))


# ----------------------------------------------------------------------------- prompt tables


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


# ---------------------------------------------------------------------------------- job specs

# The tiny model's usual job: 2 steps at 64 x 64.
TINY_GENERATION = {"num_inference_steps": 2, "width": 64, "height": 64}


def spec_dict(base: dict | None = None, /, **sections) -> dict:
    """A job spec as its YAML file holds it: a copy of `base` with `sections` merged in. A dict
    updates that section (adding it if new); anything else, such as `name`, replaces it. Neither
    `base` nor the dicts passed in are changed."""
    spec = {k: dict(v) if isinstance(v, dict) else v for k, v in (base or {}).items()}
    for section, values in sections.items():
        if isinstance(values, dict):
            spec.setdefault(section, {}).update(values)
        else:
            spec[section] = values
    return spec


def job_dict(source, input_uri, output_uri, /, **sections) -> dict:
    """The spec most tests start from: the model's source, the input and output URIs, no safety
    detector; `sections` (model=... too) merged in as spec_dict merges them."""
    base = {
        "model": {"source": str(source)},
        "input": {"uri": str(input_uri)},
        "output": {"uri": str(output_uri)},
        "safety": {"detector": "none"},
    }
    return spec_dict(base, **sections)


def write_spec(folder, spec: dict, file: str | None = None, /, **sections) -> Path:
    """`spec` with `sections` merged in (spec_dict), written as YAML to `folder`/`file` (a new name
    if None)."""
    path = Path(folder) / (file or f"job-{uuid.uuid4().hex[:6]}.yaml")
    path.write_text(yaml.safe_dump(spec_dict(spec, **sections)))
    return path


def run_tiny_job(folder: Path, model, prompts: list[str], **sections) -> Path:
    """The tiny model's usual job (TINY_GENERATION, PNG) on `prompts`, with `sections` merged in,
    run by `sdfleet run` on an embedded local Ray in `folder`; its output folder."""
    write_prompts(folder / "in" / "p.parquet", prompts)
    spec = job_dict(
        model,
        folder / "in",
        folder / "out",
        generation=TINY_GENERATION,
        output={"image_format": "png"},
    )
    write_spec(folder, spec, "job.yaml", **sections)
    done = run_cli("run", str(folder / "job.yaml"), "--no-progress", env={"RAY_ADDRESS": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / "out"


# The fault tests' job: 12 prompts x 2 seeds = 24 samples in 8 shards of 3.
N_PROMPTS = 12


def bucket_with_prompts(prefix: str):
    """A new bucket holding the fault tests' prompt table; an s3fs filesystem with `.bucket` set."""
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.bucket = f"{prefix}-{uuid.uuid4().hex[:10]}"
    fs.mkdir(fs.bucket)
    write_prompts(
        f"{fs.bucket}/prompts/p.parquet",
        [f"a landscape, variation {i}" for i in range(N_PROMPTS)],
        storage=fs,
        row_group_size=4,
    )
    return fs


def job_spec(tmp_path, tiny_model, bucket, out: str, steps: int = 2, **sections) -> Path:
    """The fault tests' job spec on `bucket_with_prompts`' table, written to a new file; `sections`
    update the spec's sections (e.g. resources={"max_attempts": 2})."""
    spec = job_dict(
        tiny_model,
        f"s3://{bucket.bucket}/prompts/",
        out,
        name="faults",
        model={"scheduler": "EulerDiscreteScheduler"},
        generation={"num_inference_steps": steps, "width": 64, "height": 64},
        sweep={"seeds": 2},
        output={"image_format": "png", "samples_per_shard": 3},
        resources={"batch_size": 3, "max_attempts": 3},
    )
    return write_spec(tmp_path, spec, **sections)


# ------------------------------------------------------------------------- a finished output


def output_storage(out: str):
    from sdfleet.actors.storage import Storage

    return Storage(out)


def committed(out: str) -> list[str]:
    return output_storage(out).list("*_stats.json")


def rows_of(out: str) -> list[dict]:
    storage = output_storage(out)
    rows = []
    for name in storage.list("*.parquet"):
        rows += pq.read_table(io.BytesIO(storage.read_bytes(name))).to_pylist()
    return rows


def assert_exactly_once(
    out: str, samples: int = N_PROMPTS * 2, shards: int = 8, images: int | None = None
) -> list[dict]:
    """Every shard committed once, every sample once; `images` in the tars (default: one per sample)."""
    storage = output_storage(out)
    assert committed(out) == [f"{i:05d}_stats.json" for i in range(shards)]
    rows = rows_of(out)
    assert len(rows) == samples and len({r["key"] for r in rows}) == samples
    assert len({r["sample_id"] for r in rows}) == samples
    assert sum(json.loads(storage.read_bytes("sizes.json")).values()) == (
        samples if images is None else images
    )
    assert storage.exists("_SUCCESS")
    for name in storage.list("*_stats.json"):
        stats = storage.read_json(name)
        parquet = storage.read_bytes(name.replace("_stats.json", ".parquet"))
        assert (
            hashlib.sha256(parquet).hexdigest() == stats["parquet_sha256"]
        )  # one consistent commit
    return rows


def same_dataset(a: str, b: str) -> None:
    """Byte-identical tars; identical rows apart from the run columns (worker, time)."""
    from sdfleet.schemas.rows import RUN_COLUMNS

    sa, sb = output_storage(a), output_storage(b)
    assert sa.list("*.tar") == sb.list("*.tar")
    for name in sa.list("*.tar"):
        assert sa.read_bytes(name) == sb.read_bytes(name), name

    def strip(rows):
        return sorted(
            ({k: v for k, v in r.items() if k not in RUN_COLUMNS} for r in rows),
            key=lambda r: r["key"],
        )

    assert strip(rows_of(a)) == strip(rows_of(b))


# --------------------------------------------------------------------------------- infra/


INFRA = REPO / "infra"
CLUSTER_YAML = INFRA / "aws" / "cluster.yaml"
KUBERAY = INFRA / "kuberay"
DOCKERFILE = INFRA / "Dockerfile"


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


def containers(pod_spec: dict) -> list[dict]:
    return list(pod_spec.get("initContainers", [])) + list(pod_spec["containers"])


def cron_pod_spec(cronjob: dict) -> dict:
    return cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def check_sdfleet_command(line: str) -> list[str]:
    """`line` is a shell command whose sdfleet part must parse with sdfleet's own CLI."""
    from sdfleet.jobs.cli import build_parser

    words = shlex.split(line)
    assert "sdfleet" in words, f"no sdfleet command in {line!r}"
    argv = words[words.index("sdfleet") + 1 :]
    try:
        build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"`{line}` is not a valid sdfleet command line")
    return argv

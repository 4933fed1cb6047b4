"""Security: credentials never reach logs or outputs; the product never loads pickles, unsafe YAML or
remote code."""

from __future__ import annotations

import uuid

import pytest

from helpers import REPO, job_spec, output_storage, run_cli


@pytest.mark.slow
def test_credentials_never_reach_logs_or_outputs(tmp_path, tiny_model, bucket, ray_cluster):
    secret = "wJalrXUtnFEMI-SECRET-" + uuid.uuid4().hex
    out = f"s3://{bucket.bucket}/secret"
    spec = job_spec(tmp_path, tiny_model, bucket, out,
                    output={"storage_options": {"key": "testing", "secret": secret}})
    done = run_cli("-v", "run", str(spec), "--address", ray_cluster.address)
    assert done.returncode == 0, done.stderr[-3000:]
    assert secret not in done.stdout + done.stderr
    storage = output_storage(out)
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

"""Security: credentials never reach logs or outputs; the product never loads pickles, unsafe YAML or
remote code."""

from __future__ import annotations

import ast
import uuid

import pytest

from helpers import REPO, job_spec, output_storage, run_cli


@pytest.mark.slow
def test_credentials_never_reach_logs_or_outputs(tmp_path, tiny_model, bucket, ray_cluster):
    secret = "wJalrXUtnFEMI-SECRET-" + uuid.uuid4().hex
    out = f"s3://{bucket.bucket}/secret"
    spec = job_spec(
        tmp_path,
        tiny_model,
        bucket,
        out,
        output={"storage_options": {"key": "testing", "secret": secret}},
    )
    done = run_cli("-v", "run", str(spec), "--address", ray_cluster.address)
    assert done.returncode == 0, done.stderr[-3000:]
    assert secret not in done.stdout + done.stderr
    storage = output_storage(out)
    for path in storage.fs.find(storage.root):
        if not path.endswith(".tar"):
            assert secret.encode() not in storage.fs.cat_file(path), path
    job = storage.read_json("_job.json")
    assert job["spec"]["output"]["storage_options"] == {"key": "***", "secret": "***"}


@pytest.mark.slow
def test_temporary_credentials_never_reach_verbose_logs_or_outputs(tmp_path, tiny_model, bucket):
    """Session credentials (as instance roles and IRSA give) through `sdfleet -vv`: botocore's wire
    records hold the canonical request with the token and the signed headers; all are masked."""
    key, secret, token = (
        "ASIA" + uuid.uuid4().hex[:16].upper(),
        "tmp-secret-" + uuid.uuid4().hex,
        "FwoGZXIvYXdzEXAMPLE" + uuid.uuid4().hex * 3,
    )
    out = f"s3://{bucket.bucket}/temporary"
    spec = job_spec(tmp_path, tiny_model, bucket, out)
    done = run_cli(
        "-vv",
        "run",
        str(spec),
        "--no-progress",
        env={
            "AWS_ACCESS_KEY_ID": key,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_SESSION_TOKEN": token,
            "RAY_ADDRESS": "",
        },
    )
    assert done.returncode == 0, done.stderr[-3000:]
    logs = done.stdout + done.stderr
    assert "x-amz-security-token" in logs.lower()  # the records are there, with their values masked
    assert secret not in logs and token not in logs and token[:24] not in logs
    storage = output_storage(out)
    for path in storage.fs.find(storage.root):
        data = storage.fs.cat_file(path)
        assert secret.encode() not in data and token.encode() not in data, path


# Calls that run code from data: unpicklers, torch.load (a pickle), unsafe YAML loaders, eval/exec,
# and shells. Matched on the resolved name, so `import pickle as p; p.loads` and
# `from yaml import unsafe_load as ul; ul(...)` are caught as surely as `pickle.loads`.
UNSAFE_CALLS = {
    "pickle.load",
    "pickle.loads",
    "pickle.Unpickler",
    "dill.load",
    "dill.loads",
    "cloudpickle.load",
    "cloudpickle.loads",
    "joblib.load",
    "marshal.load",
    "marshal.loads",
    "shelve.open",
    "torch.load",
    "yaml.load",
    "yaml.load_all",
    "yaml.unsafe_load",
    "yaml.unsafe_load_all",
    "yaml.full_load",
    "yaml.full_load_all",
    "eval",
    "exec",
    "os.system",
    "os.popen",
}
UNSAFE_KEYWORDS = {("trust_remote_code", True), ("use_safetensors", False)}


def unsafe_calls(source: str, where: str = "<source>") -> list[str]:
    """Unsafe calls in Python source, with imported aliases resolved."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = (
                    a.name if a.asname else a.name.split(".")[0]
                )
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases)
        if name in UNSAFE_CALLS:
            found.append(f"{where}:{node.lineno} {name}")
        shell = next((k for k in node.keywords if k.arg == "shell"), None)
        if (
            name
            and name.startswith("subprocess.")
            and shell is not None
            and getattr(shell.value, "value", True)
        ):
            found.append(f"{where}:{node.lineno} {name}(shell=...)")
        for k in node.keywords:
            if (k.arg, getattr(k.value, "value", None)) in UNSAFE_KEYWORDS:
                found.append(f"{where}:{node.lineno} {k.arg}={k.value.value}")
    return found


def _dotted(func: ast.expr, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    return ".".join([aliases.get(func.id, func.id), *reversed(parts)])


def test_no_remote_code_and_no_unsafe_loading_in_the_source():
    """No call in the product or the benchmarks loads pickles, unsafe YAML or remote code, evaluates
    strings or runs a shell (docs may mention them)."""
    found = [
        f
        for d in ("schemas", "jobs", "actors", "bench")
        for p in sorted((REPO / d).rglob("*.py"))
        for f in unsafe_calls(p.read_text(), str(p.relative_to(REPO)))
    ]
    assert found == []


def test_every_call_that_loads_weights_asks_for_safetensors():
    """Every from_pretrained in the product that loads weights (all but image processors and
    tokenizers, which read JSON) passes use_safetensors=True: a pickle checkpoint runs code when
    it loads."""
    calls = []
    for p in sorted((REPO / "actors").rglob("*.py")) + sorted((REPO / "jobs").rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "from_pretrained"
            ):
                continue
            if ast.unparse(node.func.value).endswith(("Processor", "Tokenizer")):
                continue
            safe = any(
                k.arg == "use_safetensors" and isinstance(k.value, ast.Constant) and k.value.value
                for k in node.keywords
            )
            calls.append((f"{p.relative_to(REPO)}:{node.lineno}", safe))
    # The one loader of pipelines, refiners and VAEs (actors/components.load_pretrained), both
    # detectors' models and curation's CLIP.
    assert len(calls) >= 4, calls
    assert [where for where, safe in calls if not safe] == []


@pytest.mark.parametrize(
    "source, expected",
    [
        ("import pickle\npickle.loads(b'')", "pickle.loads"),
        ("import pickle as p\np.load(f)", "pickle.load"),
        ("from pickle import loads as l\nl(b'')", "pickle.loads"),
        ("import torch\ntorch.load('w.pt')", "torch.load"),
        ("from torch import load\nload('w.pt', weights_only=True)", "torch.load"),
        ("import yaml\nyaml.load(text, Loader=yaml.Loader)", "yaml.load"),
        ("from yaml import unsafe_load as ul\nul(text)", "yaml.unsafe_load"),
        ("eval(text)", "eval"),
        ("exec(code)", "exec"),
        ("import subprocess as sp\nsp.run(cmd, shell=True)", "subprocess.run(shell=...)"),
        ("from subprocess import Popen\nPopen(cmd, shell=True)", "subprocess.Popen(shell=...)"),
        ("m.from_pretrained(p, trust_remote_code=True)", "trust_remote_code=True"),
    ],
)
def test_the_source_scan_sees_through_aliases(source, expected):
    assert [f.split(" ", 1)[1] for f in unsafe_calls(source)] == [expected]
    assert (
        unsafe_calls("import yaml\nyaml.safe_load(text)\nimport subprocess\nsubprocess.run(['ls'])")
        == []
    )

"""Credentials obtained by assuming a role (`role_arn` + `source_profile` in an AWS config file, as
IRSA and most users have) never reach stdout, stderr, the output or Ray's logs, even under `-v`
and `-vv`. The local S3 server (moto) also serves STS, so the AssumeRole exchange is real HTTP."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from helpers import job_spec, output_storage, run_cli


def _issued_credentials() -> list[str]:
    """The secret keys and session tokens moto's STS handed out in this process (the server runs
    in a thread here), so the test looks for the real values, not a pattern."""
    from moto.sts.models import sts_backends

    found = []
    for account in sts_backends.values():
        for backend in account.values():
            for role in backend.assumed_roles:
                found += [role.secret_access_key, role.session_token]
    return found


@pytest.fixture
def role_profile(tmp_path):
    """An AWS config file whose profile assumes a role from a source profile's long-term key."""
    source_secret = "source-secret-" + uuid.uuid4().hex
    credentials = tmp_path / "aws-credentials"
    credentials.write_text(
        f"[base]\naws_access_key_id = AKIA{uuid.uuid4().hex[:16].upper()}\n"
        f"aws_secret_access_key = {source_secret}\n"
    )
    config = tmp_path / "aws-config"
    config.write_text(
        "[profile job-role]\nrole_arn = arn:aws:iam::123456789012:role/sdfleet-job\n"
        "source_profile = base\nregion = us-east-1\n"
    )
    ray_tmp = Path(tempfile.mkdtemp(prefix="sdr", dir="/tmp"))  # short: Ray's socket paths
    env = {
        "AWS_CONFIG_FILE": str(config),
        "AWS_SHARED_CREDENTIALS_FILE": str(credentials),
        "AWS_PROFILE": "job-role",
        "AWS_ACCESS_KEY_ID": None,
        "AWS_SECRET_ACCESS_KEY": None,
        "AWS_SESSION_TOKEN": None,
        "AWS_EC2_METADATA_DISABLED": "true",
        "RAY_ADDRESS": "",
        "RAY_TMPDIR": str(ray_tmp),
    }
    yield env, source_secret, ray_tmp
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _assert_nowhere(secrets: list[str], text: str, files: list[tuple[str, bytes]]) -> None:
    for secret in secrets:
        assert secret not in text, f"a credential ({secret[:6]}...) in stdout/stderr"
        for name, data in files:
            assert secret.encode() not in data, f"a credential ({secret[:6]}...) in {name}"


@pytest.mark.slow
def test_assumed_role_credentials_never_reach_logs_or_outputs(
    tmp_path, tiny_model, bucket, role_profile
):
    env, source_secret, ray_tmp = role_profile
    out = f"s3://{bucket.bucket}/assumed"
    spec = job_spec(tmp_path, tiny_model, bucket, out)
    before = set(_issued_credentials())

    # 1. plan under -vv (botocore's wire records on, so the masking itself is what is tested)
    # and under -v (what a user types).
    planned = run_cli("-vv", "plan", str(spec), env=env)
    assert planned.returncode == 0, planned.stderr[-3000:]
    assert "<SecretAccessKey>***</SecretAccessKey>" in planned.stderr  # STS' body, masked
    plain = run_cli("-v", "plan", str(spec), env=env)
    assert plain.returncode == 0, plain.stderr[-3000:]
    # 2. run under -v (what a user types), on an embedded Ray whose logs are scanned too.
    done = run_cli("-v", "run", str(spec), "--no-progress", env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    issued = [c for c in _issued_credentials() if c not in before]
    assert issued, "the runs did not assume the role through the local STS"
    storage = output_storage(out)
    files = [(p, storage.fs.cat_file(p)) for p in storage.fs.find(storage.root)]
    files += [
        (str(p), p.read_bytes()) for p in ray_tmp.rglob("*") if p.is_file() and not p.is_symlink()
    ]
    logs = planned.stdout + planned.stderr + done.stdout + done.stderr
    _assert_nowhere([*issued, source_secret], logs, files)

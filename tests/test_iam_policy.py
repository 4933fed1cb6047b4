"""The IAM policy in infra/iam/ is exactly what sdfleet needs: a job run through a proxy that plays
S3's authorizer with that policy completes, and with any one action taken out of it the run fails
with one line naming that action.

The proxy (tests/s3proxy.py with tests/iam_policy.py) maps each S3 request to the IAM actions AWS
checks and answers 403 AccessDenied to anything the policy does not allow, including a missing
object asked for without s3:ListBucket on its prefix, as S3 does. The job tests use the shared
Ray cluster (slow, as conftest marks them); the README check is fast.
"""

from __future__ import annotations

import re
import uuid

import pytest

from helpers import REPO, job_dict, run_cli, write_prompts, write_spec
from iam_policy import Policy
from s3proxy import S3Proxy

POLICY = REPO / "infra" / "iam" / "sdfleet-s3-policy.json"
# The compile cache's statements are checked by test_compile_cache_grants: a job runs without them.
COMPILE_CACHE = ("ReadWriteCompileCache", "ListCompileCache")


@pytest.fixture(scope="module")
def placed(s3_endpoint, tiny_model):
    """A bucket laid out as infra/README.md describes: prompts/, models/ (the tiny model's mirror)."""
    import s3fs

    fs = s3fs.S3FileSystem()
    bucket = f"iam-{uuid.uuid4().hex[:10]}"
    fs.mkdir(bucket)
    write_prompts(
        f"{bucket}/prompts/p.parquet",
        [f"a lighthouse, variation {i}" for i in range(4)],
        storage=fs,
    )
    fs.put(str(tiny_model), f"{bucket}/models/tiny-sd2", recursive=True)
    fs.bucket = bucket
    return fs


def leave_an_upload(fs, out_key: str) -> str:
    """An uncompleted multipart upload under the output, as a writer that died before its commit
    leaves one: the finalizer must list and abort it (s3:ListBucketMultipartUploads,
    s3:AbortMultipartUpload), a path a clean run never takes otherwise."""
    upload = fs.call_s3("create_multipart_upload", Bucket=fs.bucket, Key=f"{out_key}/00000.tar")
    return upload["UploadId"]


def run_job(tmp_path, fs, policy: Policy, ray_cluster) -> tuple[object, S3Proxy, str]:
    out_key = f"datasets/{uuid.uuid4().hex[:8]}"
    leave_an_upload(fs, out_key)
    spec = job_dict(
        f"s3://{fs.bucket}/models/tiny-sd2",
        f"s3://{fs.bucket}/prompts/",
        f"s3://{fs.bucket}/{out_key}",
        name="iam",
        model={"scheduler": "EulerDiscreteScheduler"},
        generation={"num_inference_steps": 1, "width": 64, "height": 64},
        output={"samples_per_shard": 2},
        resources={"batch_size": 2, "max_attempts": 1},
    )
    proxy = S3Proxy(fs.s3.meta.endpoint_url, policy=policy)
    try:
        done = run_cli(
            "run",
            str(write_spec(tmp_path, spec)),
            "--address",
            ray_cluster.address,
            "--no-progress",
            env={"AWS_ENDPOINT_URL": proxy.url, "AWS_EC2_METADATA_DISABLED": "true"},
            timeout=240,
        )
    finally:
        proxy.close()
    return done, proxy, out_key


def test_the_policy_file_is_enough_for_a_whole_job(tmp_path, placed, ray_cluster):
    policy = Policy.load(POLICY, placed.bucket)
    done, proxy, out_key = run_job(tmp_path, placed, policy, ray_cluster)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [c for c in proxy.checks if not c.allowed] == []
    asked = {c.action for c in proxy.checks}
    # The finalizer found and aborted the dead writer's upload, through the proxy.
    assert {"s3:ListBucketMultipartUploads", "s3:AbortMultipartUpload"} <= asked
    uploads = placed.call_s3("list_multipart_uploads", Bucket=placed.bucket, Prefix=out_key)
    assert uploads.get("Uploads", []) == []


JOB_GRANTS = [g for g in Policy.load(POLICY, "b").grants() if g[0] not in COMPILE_CACHE]


@pytest.mark.parametrize("sid,action", JOB_GRANTS, ids=[f"{s}-{a}" for s, a in JOB_GRANTS])
def test_without_any_one_action_the_run_fails_naming_it(tmp_path, placed, ray_cluster, sid, action):
    policy = Policy.load(POLICY, placed.bucket).without(sid, action)
    done, proxy, _ = run_job(tmp_path, placed, policy, ray_cluster)
    assert done.returncode != 0, done.stderr[-3000:]
    denied = [c for c in proxy.checks if not c.allowed]
    # Only the removed action was ever denied ...
    assert denied and {c.action for c in denied} == {action}, denied
    # ... and the run says so in one line.
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("sdfleet: ")]
    assert errors and action in errors[-1] and "infra/iam/sdfleet-s3-policy.json" in errors[-1], (
        done.stderr[-3000:]
    )
    print(f"\n[without {sid} {action}] exit {done.returncode}: {errors[-1]}")


@pytest.fixture(scope="module")
def compiled():
    """Something torch.compile made in this process, for CompileCache.save to save."""
    import torch

    torch.compile(lambda x: x * 2 + 1)(torch.ones(4))
    assert torch.compiler.save_cache_artifacts() is not None


def compile_cache_through(policy: Policy, placed, monkeypatch, caplog) -> tuple[dict, S3Proxy]:
    """What a worker's compile cache does on S3 (save, load, a miss) through the policy proxy: the
    outcomes, and the proxy's record. A denial only costs a compile, so it is a warning, not an exit."""
    import s3fs

    from sdfleet.actors.compile_cache import CompileCache

    proxy = S3Proxy(placed.s3.meta.endpoint_url, policy=policy)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    s3fs.S3FileSystem.clear_instance_cache()  # a fresh client, on the proxy
    caplog.clear()
    try:
        cache = CompileCache(f"s3://{placed.bucket}/compile-cache")
        key = uuid.uuid4().hex
        outcome = {"saved": cache.save(key), "loaded": cache.load(key), "miss": cache.load("none")}
    finally:
        proxy.close()
        s3fs.S3FileSystem.clear_instance_cache()
    outcome["warnings"] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    return outcome, proxy


@pytest.mark.slow  # torch.compile on the CPU
def test_compile_cache_grants(placed, compiled, monkeypatch, caplog):
    """The compile cache's statements: with them a worker saves, loads, and misses quietly; without
    any one of their actions it logs one warning naming that action (and compiles instead)."""
    policy = Policy.load(POLICY, placed.bucket)
    outcome, proxy = compile_cache_through(policy, placed, monkeypatch, caplog)
    assert outcome == {"saved": True, "loaded": True, "miss": False, "warnings": []}
    assert [c for c in proxy.checks if not c.allowed] == []
    grants = [g for g in policy.grants() if g[0] in COMPILE_CACHE]
    assert len(grants) == 3
    for sid, action in grants:
        outcome, proxy = compile_cache_through(
            policy.without(sid, action), placed, monkeypatch, caplog
        )
        assert {c.action for c in proxy.checks if not c.allowed} == {action}, (sid, action)
        named = [w for w in outcome["warnings"] if "S3 denied" in w and action in w]
        assert named, (sid, action, outcome)
        assert "infra/iam/sdfleet-s3-policy.json" in named[0]


def test_the_readme_shows_the_policy_file_itself():
    """infra/README.md's policy is the file, byte for byte, not a copy that can drift."""
    text = (REPO / "infra" / "README.md").read_text()
    shown = re.findall(r"```json\n(.*?)```", text, re.S)
    assert shown == [POLICY.read_text()]
    assert "infra/iam/sdfleet-s3-policy.json" in (REPO / "README.md").read_text()


@pytest.mark.parametrize(
    "method,path,headers,body,expected",
    [
        ("GET", "/b?list-type=2&prefix=datasets/x/", {}, None, [("s3:ListBucket", "datasets/x/")]),
        ("GET", "/b?uploads&prefix=datasets/", {}, None, [("s3:ListBucketMultipartUploads", "")]),
        ("HEAD", "/b/datasets/x/_job.json", {}, None, [("s3:GetObject", "datasets/x/_job.json")]),
        ("PUT", "/b/datasets/x/a", {"If-None-Match": "*"}, b"", [("s3:PutObject", "datasets/x/a")]),
        ("POST", "/b/datasets/x/a.tar?uploads", {}, None, [("s3:PutObject", "datasets/x/a.tar")]),
        ("PUT", "/b/k?partNumber=1&uploadId=u", {}, b"", [("s3:PutObject", "k")]),
        ("POST", "/b/k?uploadId=u", {}, b"", [("s3:PutObject", "k")]),
        ("DELETE", "/b/k?uploadId=u", {}, None, [("s3:AbortMultipartUpload", "k")]),
        ("DELETE", "/b/k", {}, None, [("s3:DeleteObject", "k")]),
        ("GET", "/b/k?uploadId=u", {}, None, [("s3:ListMultipartUploadParts", "k")]),
        (
            "POST",
            "/b?delete",
            {},
            b"<Delete><Object><Key>k1</Key></Object><Object><Key>k2</Key></Object></Delete>",
            [("s3:DeleteObject", "k1"), ("s3:DeleteObject", "k2")],
        ),
        ("GET", "/b/k?tagging", {}, None, [("unmapped:GET object?tagging", "k")]),
    ],
)
def test_each_s3_request_maps_to_the_iam_action_s3_checks(method, path, headers, body, expected):
    from iam_policy import actions_of

    found = [
        (action, context.get("s3:prefix", resource.removeprefix("arn:aws:s3:::b").lstrip("/")))
        for action, resource, context in actions_of(method, path, headers, body)
    ]
    assert found == expected


def test_a_denied_s3_call_names_its_iam_action_and_the_policy_file():
    from botocore.exceptions import ClientError

    from sdfleet.actors.storage_errors import storage_error

    def denied(operation: str, code: str = "AccessDenied") -> str:
        cause = ClientError({"Error": {"Code": code, "Message": "Access Denied"}}, operation)
        error = PermissionError("Access Denied")
        error.__cause__ = cause
        return str(storage_error(error, "cannot clean up s3://b/datasets/x"))

    assert denied("ListMultipartUploads") == (
        "S3 denied s3:ListBucketMultipartUploads on s3://b/datasets/x: grant it "
        "(see infra/iam/sdfleet-s3-policy.json)"
    )
    assert denied("HeadObject").startswith("S3 denied s3:GetObject on s3://b/datasets/x: grant")
    assert "s3:ListBucket" in denied("HeadObject")  # S3's 403 for a missing object
    # Credentials S3 does not accept are not a policy's doing.
    assert "S3 denied" not in denied("PutObject", "InvalidAccessKeyId")

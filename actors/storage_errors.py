"""What a storage failure means for the user: the one translation of s3fs, botocore and OS errors
into a StorageError that names the URI, the cause and what to do, and the early probe of a
configured S3 endpoint, so a dead endpoint is named at once instead of after botocore's retries."""

from __future__ import annotations

import os
import re
import socket
from typing import Any

from sdfleet.schemas.errors import StorageDenied, StorageError, StorageNotFound, first_line


def storage_error(
    e: BaseException, what: str, options: dict[str, Any] | None = None
) -> StorageError | None:
    """`what` ("cannot read s3://b/k") with the cause and what to do, for the storage failures a
    user can fix; None for anything else. Looks through the exception's chain, since s3fs and
    pyarrow wrap botocore's errors."""
    chain, seen = [], e
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    names = {type(x).__name__ for x in chain}
    text = " ".join(str(x) for x in chain)
    endpoint = endpoint_of(options or {})
    if "NoCredentialsError" in names or "PartialCredentialsError" in names:
        return StorageError(
            f"{what}: no AWS credentials found. Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE, or an instance role), or give key/secret in the spec's "
            "storage_options; for a public bucket set storage_options: {anon: true}"
        )
    if names & {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ClientConnectorError",
        "ConnectionRefusedError",
    }:
        return StorageError(
            f"{what}: cannot connect to the S3 endpoint {endpoint or '(AWS default)'}. "
            f"{ENDPOINT_ADVICE}"
        )
    if "NoSuchBucket" in names or "bucket does not exist" in text:
        return StorageNotFound(
            f"{what}: the bucket does not exist{f' at {endpoint}' if endpoint else ''}. "
            "Check the bucket name (and the endpoint), or create the bucket"
        )
    denied = iam_action_denied(chain, what)
    if denied is not None and not names & {"InvalidAccessKeyId", "SignatureDoesNotMatch"}:
        return StorageDenied(denied)
    if isinstance(e, PermissionError) or names & {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
    }:
        return StorageDenied(
            f"{what}: access denied ({first_line(e)}); check the credentials and the "
            "bucket policy, or storage_options"
        )
    if isinstance(e, FileNotFoundError):
        return StorageNotFound(f"{what}: not found ({first_line(e)})")
    return None


# The policy that grants what sdfleet calls (the repository's file, shown in infra/README.md).
POLICY_FILE = "infra/iam/sdfleet-s3-policy.json"

# The IAM action S3 checks for each S3 operation sdfleet (through s3fs and botocore) calls.
IAM_ACTIONS = {
    "GetObject": "s3:GetObject",
    "HeadObject": "s3:GetObject",
    "ListObjectsV2": "s3:ListBucket",
    "ListObjects": "s3:ListBucket",
    "HeadBucket": "s3:ListBucket",
    "PutObject": "s3:PutObject",
    "CreateMultipartUpload": "s3:PutObject",
    "UploadPart": "s3:PutObject",
    "CompleteMultipartUpload": "s3:PutObject",
    "CopyObject": "s3:PutObject",
    "DeleteObject": "s3:DeleteObject",
    "DeleteObjects": "s3:DeleteObject",
    "AbortMultipartUpload": "s3:AbortMultipartUpload",
    "ListMultipartUploads": "s3:ListBucketMultipartUploads",
    "ListParts": "s3:ListMultipartUploadParts",
}


def iam_action_denied(chain: list[BaseException], what: str) -> str | None:
    """The line for an AccessDenied of a known S3 operation ("S3 denied <action> on <uri>: grant
    it ..."; botocore's ClientError carries the operation's name), or None: a refused key or
    signature (InvalidAccessKeyId, SignatureDoesNotMatch) is the credentials' doing, not the
    policy's."""
    error = next((x for x in chain if getattr(x, "operation_name", None) in IAM_ACTIONS), None)
    if error is None or _error_code(error) not in ("AccessDenied", "403"):
        return None
    # `what` is "cannot <verb> <uri>" (storage.Storage.errors); the verb may be two words.
    found = re.search(r"[a-z][a-z0-9+.-]*://\S*", what)
    uri = found.group(0) if found else what
    action = IAM_ACTIONS[error.operation_name]
    message = f"S3 denied {action} on {uri}: grant it (see {POLICY_FILE})"
    if action == "s3:GetObject":
        # S3 answers a missing object 403, not 404, to a role without s3:ListBucket on its prefix.
        message += "; without s3:ListBucket on its prefix, a missing object is denied too"
    return message


def _error_code(error: BaseException) -> str:
    return str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))


# How long a connection to a configured S3 endpoint may take before it is reported unreachable.
# botocore retries a refused connection 10 times with backoff (about a minute of silence); a dead
# MinIO or a wrong port should be named at once.
ENDPOINT_CONNECT_TIMEOUT_S = 5.0
ENDPOINT_ADVICE = (
    "Check AWS_ENDPOINT_URL or storage_options.endpoint_url, and that the endpoint is up"
)
_reachable: set[str] = set()


def endpoint_of(options: dict[str, Any]) -> str | None:
    return (
        options.get("client_kwargs", {}).get("endpoint_url")
        or options.get("endpoint_url")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )


def check_endpoint_reachable(uri: str, endpoint: str | None) -> None:
    """A StorageError naming `uri` and the endpoint when nothing answers at a configured S3 endpoint
    (AWS's own endpoints are not probed). Checked once per endpoint and process."""
    if not endpoint or endpoint in _reachable:
        return
    from urllib.parse import urlsplit

    parts = urlsplit(endpoint)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=ENDPOINT_CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise StorageError(
            f"cannot reach {uri}: cannot connect to the S3 endpoint {endpoint} ({e.strerror or e}). "
            f"{ENDPOINT_ADVICE}"
        ) from None
    _reachable.add(endpoint)


# The driver's first request to each s3:// location the spec names (`plan` and `run`, before
# planning): one attempt with short timeouts, so a wrong endpoint that accepts connections but never
# answers, or no route to AWS, is named in seconds with the URI the user wrote. The workers keep
# storage.S3_RETRIES and botocore's timeouts.
FIRST_CONTACT_CONFIG = {
    "connect_timeout": 5,
    "read_timeout": 5,
    "retries": {"total_max_attempts": 1, "mode": "standard"},
}
# Failures that mean nothing answered in time (botocore's, aiohttp's, the OS's).
_NO_ANSWER = {
    "ReadTimeoutError",
    "ConnectTimeoutError",
    "ConnectionClosedError",
    "ServerTimeoutError",
    "TimeoutError",
    "FSTimeoutError",
}


def check_first_contact(uri: str, key: str, options: dict[str, Any] | None = None) -> None:
    """One bounded request to an s3:// `uri` (spec key `key`): a StorageError naming them when the
    endpoint cannot be reached or does not answer. Anything else (no credentials, no bucket, denied,
    not found) is left to the request that needs the answer, which names it as before."""
    if not uri.startswith(("s3://", "s3a://")):
        return
    import fsspec

    options = dict(options or {})
    endpoint = endpoint_of(options)
    check_endpoint_reachable(uri, endpoint)
    options["config_kwargs"] = {**options.get("config_kwargs", {}), **FIRST_CONTACT_CONFIG}
    fs, path = fsspec.core.url_to_fs(uri, skip_instance_cache=True, **options)
    fs.retries = 1  # s3fs retries timeouts itself too; this filesystem is the probe's own
    bucket, key_prefix, _ = fs.split_path(path)
    # Below the URI as a folder: the prefix a least-privilege policy grants listing on
    # (`prompts/*`, infra/iam), whether the URI names a folder or a file.
    prefix = key_prefix.rstrip("/") + "/" if key_prefix else ""
    try:  # one request: the listing a plan makes first
        fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except Exception as e:  # noqa: BLE001 -- only the unreachable endpoint is this check's to name
        chain, seen = [], e
        while seen is not None and len(chain) < 10:
            chain.append(seen)
            seen = seen.__cause__ or seen.__context__
        names = {type(x).__name__ for x in chain}
        where = endpoint or "(AWS default: AWS_ENDPOINT_URL is not set)"
        if names & _NO_ANSWER:
            raise StorageError(
                f"cannot read {key} {uri}: the S3 endpoint {where} did not answer within "
                f"{FIRST_CONTACT_CONFIG['read_timeout']} s. {ENDPOINT_ADVICE}"
            ) from None
        error = storage_error(e, f"cannot read {key} {uri}", options)
        if error is not None and "cannot connect to the S3 endpoint" in str(error):
            raise error from None

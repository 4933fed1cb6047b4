"""What S3 asks IAM before it serves a request, for the policy proxy (tests/s3proxy.py).

`actions_of` maps one S3 REST request (method, path-style URL, headers, body) to the IAM actions
AWS checks for it, with the resource ARN and the condition keys the policy may test; `Policy`
evaluates an IAM policy document (Allow and Deny statements, `*`/`?` wildcards in actions and
resources, StringLike/StringEquals on `s3:prefix`) the way IAM does: allowed when some Allow
matches and no Deny does. A request this module cannot name is denied as `unmapped:...`, so a new
kind of S3 call shows up in the test instead of passing unchecked.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

# The bucket name the policy file uses as its placeholder (infra/README.md says to replace it).
PLACEHOLDER_BUCKET = "my-sdfleet-bucket"

Request = tuple[str, str, dict[str, str]]  # (action, resource ARN, condition context)


@dataclass
class Check:
    method: str
    path: str
    action: str
    resource: str
    context: dict
    allowed: bool
    implied: bool = False  # a 404 that S3 turns into 403 without s3:ListBucket


def _split(path: str) -> tuple[str, str, dict[str, list[str]]]:
    parts = urlsplit(path)
    bucket, _, key = parts.path.lstrip("/").partition("/")
    return unquote(bucket), unquote(key), parse_qs(parts.query, keep_blank_values=True)


def _object(bucket: str, key: str) -> str:
    return f"arn:aws:s3:::{bucket}/{key}"


def actions_of(
    method: str, path: str, headers: dict[str, str], body: bytes | None
) -> list[Request]:
    """The IAM actions S3 checks for this request (AWS: "Amazon S3 API operations and the
    permissions they need"), each with its resource and condition context."""
    bucket, key, query = _split(path)
    headers = {k.lower(): v for k, v in headers.items()}
    bucket_arn = f"arn:aws:s3:::{bucket}"
    if not key:
        if method == "GET" and "uploads" in query:  # ListMultipartUploads
            return [("s3:ListBucketMultipartUploads", bucket_arn, {})]
        if method == "GET" and "location" in query:
            return [("s3:GetBucketLocation", bucket_arn, {})]
        if method in ("GET", "HEAD") and not set(query) - {
            "list-type",
            "prefix",
            "delimiter",
            "max-keys",
            "continuation-token",
            "start-after",
            "marker",
            "encoding-type",
            "fetch-owner",
        }:  # ListObjects(V2), HeadBucket
            return [("s3:ListBucket", bucket_arn, {"s3:prefix": query.get("prefix", [""])[0]})]
        if method == "POST" and "delete" in query:  # DeleteObjects: DeleteObject on each key
            keys = re.findall(rb"<Key>(.*?)</Key>", body or b"")
            return [("s3:DeleteObject", _object(bucket, k.decode()), {}) for k in keys]
        return [(f"unmapped:{method} /{bucket}?{'&'.join(sorted(query))}", bucket_arn, {})]
    arn = _object(bucket, key)
    if method in ("GET", "HEAD") and not query.keys() - {"partNumber", "versionId"}:
        return [("s3:GetObject", arn, {})]  # GetObject, HeadObject
    if method == "GET" and "uploadId" in query:
        return [("s3:ListMultipartUploadParts", arn, {})]
    if method == "PUT" and (not query or {"partNumber", "uploadId"} <= query.keys()):
        # PutObject (conditional or not), UploadPart; a copy also reads its source.
        source = headers.get("x-amz-copy-source")
        if source is None:
            return [("s3:PutObject", arn, {})]
        return [
            ("s3:PutObject", arn, {}),
            ("s3:GetObject", f"arn:aws:s3:::{unquote(source).lstrip('/')}", {}),
        ]
    if method == "POST" and ("uploads" in query or "uploadId" in query):
        return [("s3:PutObject", arn, {})]  # CreateMultipartUpload, CompleteMultipartUpload
    if method == "DELETE" and "uploadId" in query:
        return [("s3:AbortMultipartUpload", arn, {})]
    if method == "DELETE" and not query:
        return [("s3:DeleteObject", arn, {})]
    return [(f"unmapped:{method} object?{'&'.join(sorted(query))}", arn, {})]


def hides_missing(method: str, path: str) -> Request | None:
    """The s3:ListBucket check behind a 404 of GetObject/HeadObject: without it S3 answers 403.
    The key stands for `s3:prefix` here, so a ListBucket limited to a prefix covers the missing
    objects below it (AWS documents the 403, not how a prefix condition weighs in)."""
    bucket, key, _ = _split(path)
    if method not in ("GET", "HEAD") or not key:
        return None
    return ("s3:ListBucket", f"arn:aws:s3:::{bucket}", {"s3:prefix": key})


def _listed(value) -> list:
    return value if isinstance(value, list) else [value]


def _like(pattern: str, value: str) -> bool:
    return fnmatch.fnmatchcase(value, pattern.replace("[", "[[]"))


class Policy:
    """An IAM policy document: `allows(action, resource, context)` as IAM decides it."""

    def __init__(self, document: dict):
        self.document = document

    @classmethod
    def load(cls, path: Path, bucket: str) -> Policy:
        """The policy file with its placeholder bucket replaced by `bucket`."""
        return cls(json.loads(Path(path).read_text().replace(PLACEHOLDER_BUCKET, bucket)))

    @property
    def statements(self) -> list[dict]:
        return _listed(self.document["Statement"])

    def grants(self) -> list[tuple[str, str]]:
        """(statement Sid, action) for every action each Allow statement names."""
        return [
            (s["Sid"], a)
            for s in self.statements
            if s["Effect"] == "Allow"
            for a in _listed(s["Action"])
        ]

    def without(self, sid: str, action: str) -> Policy:
        """This policy with one action removed from one statement."""
        document = copy.deepcopy(self.document)
        for s in _listed(document["Statement"]):
            if s["Sid"] == sid:
                s["Action"] = [a for a in _listed(s["Action"]) if a != action]
        return Policy(document)

    def allows(self, action: str, resource: str, context: dict) -> bool:
        matching = [s for s in self.statements if self._matches(s, action, resource, context)]
        return any(s["Effect"] == "Allow" for s in matching) and not any(
            s["Effect"] == "Deny" for s in matching
        )

    @staticmethod
    def _matches(statement: dict, action: str, resource: str, context: dict) -> bool:
        if not any(_like(a.lower(), action.lower()) for a in _listed(statement["Action"])):
            return False
        if not any(_like(r, resource) for r in _listed(statement["Resource"])):
            return False
        for operator, tests in statement.get("Condition", {}).items():
            if operator not in ("StringLike", "StringEquals"):
                raise ValueError(f"condition operator {operator} is not modelled here")
            for key, wanted in tests.items():
                value = context.get(key)
                if value is None:
                    return False
                compare = _like if operator == "StringLike" else str.__eq__
                if not any(compare(w, value) for w in _listed(wanted)):
                    return False
        return True

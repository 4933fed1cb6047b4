"""Which values are credentials: the one rule behind every mask, in logs, `_job.json` and the
dataset card. Two shapes of the same knowledge:

- `redact` masks a storage_options dict by its keys (names the spec's author chose: `key`,
  `secret`, `token`, `client_kwargs.aws_session_token`...).
- `mask_credentials` masks free text (log records, streams) by the credential fields that AWS,
  botocore and s3fs write: XML elements (STS' `<SecretAccessKey>`, `<SessionToken>`), JSON and
  Python-repr pairs (`"SecretAccessKey": "..."`, `'X-Amz-Security-Token': b'...'`), header and
  canonical-request lines (`x-amz-security-token:...`), query parameters of presigned URLs
  (`X-Amz-Signature=...`) and the whole `Authorization` header.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
# A masked value shorter than this is not remembered for masking elsewhere (a `1` or `true` would
# mask every occurrence of itself).
MIN_REMEMBERED = 8

# storage_options keys: broad, since only the spec's author names them.
_SECRET_OPTION = re.compile(r"(secret|token|password|passwd|credential|session|key)", re.I)
_NOT_SECRET_OPTION = {
    "endpoint_url",
    "anon",
    "region_name",
    "profile",
    "use_ssl",
    "requester_pays",
}

# Field names whose value is a credential, as AWS services, botocore, s3fs and HTTP spell them
# (case and `_`/`-` separators free). Narrower than the option rule: free text holds many
# harmless "key"s (S3 object keys).
CREDENTIAL_FIELD = (
    r"(?:aws[_-]?)?(?:secret[_-]?access[_-]?key|access[_-]?key[_-]?id|session[_-]?token"
    r"|security[_-]?token|client[_-]?secret|api[_-]?key|secret|token|password|passwd"
    r"|credential|signature|(?:sse|server[_-]?side[_-]?encryption)[_-]?customer[_-]?key)"
)
# The fields whose values last (a secret key for hours, a token until it expires) and so are worth
# masking wherever they show up again; a signature or a continuation token is new every request.
_LASTING = re.compile(
    r"(?i)secret|session[_-]?token|security[_-]?token|password|passwd|customer[_-]?key"
)
_VALUE = r"""[^\s"'\\,}&;<>]+"""
_TEXT_RULES = [
    # <SecretAccessKey>...</SecretAccessKey> (STS, and any XML body), a namespace prefix allowed.
    re.compile(rf"(?i)(<(?:\w+:)?{CREDENTIAL_FIELD}(?:\s[^>]*)?>)([^<]+)"),
    # Authorization: the whole header value, whatever its scheme (SigV4, Basic, Bearer).
    re.compile(r"""(?i)(authorization\\?['"]?\s*[:=]\s*b?\\?['"]?)([^'"\\\n]+)"""),
    # name=value, name: value, "name": "value", 'name': b'value', \"name\": \"value\".
    re.compile(rf"""(?i)({CREDENTIAL_FIELD}\\?['"]?\s*[:=]\s*b?\\?['"]?)({_VALUE})"""),
]


def redact(options: dict[str, Any]) -> dict[str, Any]:
    """storage_options with every secret-named value masked (nested dicts included)."""
    out = {}
    for k, v in options.items():
        if isinstance(v, dict):
            out[k] = redact(v)
        elif k not in _NOT_SECRET_OPTION and _SECRET_OPTION.search(k):
            out[k] = MASK
        else:
            out[k] = v
    return out


def mask_credentials(text: str, found: set[str] | None = None) -> str:
    """`text` with the value of every credential field masked. The values of lasting credentials
    (secret keys, session tokens, passwords) are added to `found`, so a caller can mask them in
    any other form they appear in later (a traceback, an exception message)."""

    def replace(match: re.Match) -> str:
        value = match.group(2)
        lasting = _LASTING.search(match.group(1))
        if found is not None and lasting and len(value) >= MIN_REMEMBERED and value != MASK:
            found.add(value)
        return match.group(1) + MASK

    for rule in _TEXT_RULES:
        text = rule.sub(replace, text)
    return text

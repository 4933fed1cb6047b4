"""The credential-masking rule (schemas/secrets.py) on the forms botocore, s3fs and AWS write, and
the log set-up that applies it to every logger and to the driver's streams. No S3, no Ray: the
end-to-end check with real assumed-role credentials is tests/test_assumed_role_logs.py."""

from __future__ import annotations

import io
import logging
import os

import pytest

from sdfleet.actors.logs import MaskingStream, configure_logging, mask
from sdfleet.schemas.secrets import mask_credentials, redact

SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYzEXAMPLEKEY"
TOKEN = "FQoGZXIvYXdzEBYaD2FLYUSowMg/YpcjgiMKfLoyN9EGA1xk+i9JjUXS2mV6jcm+Kt=="
KEY_ID = "ASIAQWERTYUIOPASDFGH"

FORMS = {
    "sts xml body": (
        'Response body:\nb\'<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
        f"<AssumeRoleResult><Credentials><AccessKeyId>{KEY_ID}</AccessKeyId>"
        f"<SecretAccessKey>{SECRET}</SecretAccessKey><SessionToken>{TOKEN}</SessionToken>"
        "<Expiration>2026-12-07T02:00:00Z</Expiration></Credentials></AssumeRoleResult>'"
    ),
    "json body": f'{{"Credentials": {{"AccessKeyId": "{KEY_ID}", "SecretAccessKey": "{SECRET}", '
    f'"SessionToken": "{TOKEN}"}}}}',
    "escaped json in a repr": f'b\'{{\\"SecretAccessKey\\": \\"{SECRET}\\", '
    f'\\"SessionToken\\": \\"{TOKEN}\\"}}\'',
    "header dict repr": f"headers={{'X-Amz-Security-Token': b'{TOKEN}', 'Authorization': "
    f"b'AWS4-HMAC-SHA256 Credential={KEY_ID}/20261207/us-east-1/s3/aws4_request, "
    f"SignedHeaders=host, Signature={SECRET}'}}",
    "canonical request": f"CanonicalRequest:\nGET\n/bucket\n\nhost:s3\nx-amz-security-token:{TOKEN}\n",
    "presigned url": f"GET /b/k?X-Amz-Credential={KEY_ID}%2F20261207&X-Amz-Security-Token={TOKEN}"
    f"&X-Amz-Signature={SECRET} HTTP/1.1",
    "sse-c header": f"x-amz-server-side-encryption-customer-key: {SECRET}",
    "s3fs call kwargs": f"CALL: put_object - {{'Bucket': 'b', 'SSECustomerKey': '{SECRET}'}}",
    "profile file": f"aws_secret_access_key = {SECRET}\naws_session_token = {TOKEN}",
    "basic auth": f"Authorization: Basic {SECRET}",
}


@pytest.fixture
def logging_restored(monkeypatch):
    """configure_logging changes this process' logging (pytest's handlers included): undo it."""
    root = logging.getLogger()
    formatters = [(h, h.formatter) for h in root.handlers]
    names = ("botocore", "botocore.parsers", "botocore.endpoint", "botocore.auth", "s3fs")
    levels = {n: logging.getLogger(n).level for n in (None, *names)}
    factory = logging.getLogRecordFactory()
    for key in ("TF_CPP_MIN_LOG_LEVEL", "TRANSFORMERS_VERBOSITY"):
        monkeypatch.setenv(key, os.environ.get(key, ""))  # restored afterwards
    yield
    logging.setLogRecordFactory(factory)
    for handler, formatter in formatters:
        handler.setFormatter(formatter)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.parametrize("form", FORMS)
def test_every_credential_form_is_masked(form):
    text = mask_credentials(FORMS[form])
    assert SECRET not in text and TOKEN not in text, text
    assert "***" in text


def test_the_sts_body_keeps_its_shape_and_harmless_fields():
    text = mask_credentials(FORMS["sts xml body"])
    assert "<SecretAccessKey>***</SecretAccessKey>" in text
    assert KEY_ID not in text and "2026-12-07T02:00:00Z" in text


def test_object_keys_and_ordinary_lines_are_left_alone():
    line = "committed shard 00003 (key=out/00003.tar, 12 samples, max_tokens=77)"
    assert mask_credentials(line) == line


def test_a_value_seen_in_a_credential_field_is_masked_everywhere_after():
    mask(FORMS["sts xml body"])
    assert mask(f"Traceback ... token {TOKEN} expired") == "Traceback ... token *** expired"


def test_redact_masks_storage_options_by_key():
    options = {
        "key": "AKIA",
        "secret": SECRET,
        "endpoint_url": "http://x",
        "client_kwargs": {"aws_session_token": TOKEN},
    }
    assert redact(options) == {
        "key": "***",
        "secret": "***",
        "endpoint_url": "http://x",
        "client_kwargs": {"aws_session_token": "***"},
    }


def test_every_logger_is_masked_even_with_its_own_handler(logging_restored):
    """A logger that does not propagate to the root (as Ray's do) writes masked records too, and
    a traceback's text is masked."""
    configure_logging(1)
    stream = io.StringIO()
    own = logging.getLogger("test.own-handler")
    own.propagate = False
    own.addHandler(logging.StreamHandler(stream))
    own.setLevel(logging.DEBUG)
    own.debug("Response body:\n%r", FORMS["sts xml body"].encode())
    try:
        raise RuntimeError(f"refused: SessionToken={TOKEN}")
    except RuntimeError:
        own.exception("failed")
    written = stream.getvalue()
    assert "Response body" in written and "RuntimeError" in written
    assert SECRET not in written and TOKEN not in written
    own.handlers.clear()


def test_botocore_wire_records_need_vv(logging_restored):
    configure_logging(1)
    assert not logging.getLogger("botocore.parsers").isEnabledFor(logging.DEBUG)
    assert logging.getLogger("botocore.credentials").isEnabledFor(logging.DEBUG)
    configure_logging(2)
    assert logging.getLogger("botocore.parsers").isEnabledFor(logging.DEBUG)
    configure_logging(0)
    assert not logging.getLogger("botocore.parsers").isEnabledFor(logging.WARNING)


def test_the_driver_streams_mask_forwarded_worker_lines():
    sink = io.StringIO()
    MaskingStream(sink).write(f"(ShardGenerator pid=12) SecretAccessKey: {SECRET}\n")
    assert SECRET not in sink.getvalue() and "(ShardGenerator pid=12)" in sink.getvalue()


def test_only_lasting_credentials_are_remembered():
    """A signature or a continuation token is new every request: remembering them would grow the
    set of values to mask for as long as a job runs."""
    found: set[str] = set()
    mask_credentials(FORMS["header dict repr"] + FORMS["sts xml body"], found)
    assert TOKEN in found and SECRET in found
    mask_credentials("NextContinuationToken: 1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J", found)
    assert "1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J" not in found

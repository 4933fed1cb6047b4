"""Log set-up for the driver and the workers: one format, quiet libraries, no credential in any record.

`sdfleet -v` turns on DEBUG everywhere, and botocore at DEBUG writes each request's canonical
form, which holds the session token of temporary credentials (instance roles, IRSA), and its
headers, which hold the signature. Every record, its traceback included, is masked on its way out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import warnings
from typing import Any

# Libraries that narrate routine work at INFO ("Found credentials in environment variables"; Keras'
# "1/1 - 0s - 30ms/step" per scoring call goes through absl): quiet unless -v. Ray's notice that
# token authentication is on comes with every embedded cluster.
QUIET_LIBRARIES = (
    "botocore",
    "aiobotocore",
    "s3fs",
    "fsspec",
    "urllib3",
    "absl",
    "tensorflow",
    "ray._private.authentication.authentication_token_setup",
)
# Set before TensorFlow and transformers load (workers get them from the driver or set them at
# start): TensorFlow's C++ start-up lines (oneDNN, "failed call to cuInit", which is not an error
# here), transformers' advisories and progress bars of saving and loading.
QUIET_ENVIRONMENT = {
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
FORMAT = "%(asctime)s %(levelname)s %(message)s"
MASK = "***"

_VALUE = r"""[^\s"',}&;]+"""
_MASKS = [
    # Authorization: AWS4-HMAC-SHA256 Credential=..., Signature=... (a header, or a repr of one).
    re.compile(r"""(?i)(authorization['"]?\s*[:=]\s*b?['"]?)[^'"\n]+"""),
    # x-amz-security-token:TOKEN in a canonical request, or as a header or query parameter.
    re.compile(rf"""(?i)(x-amz-security-token['"]?\s*[:=]\s*b?['"]?){_VALUE}"""),
    # Presigned URLs carry their signature, credential and token in the query string.
    re.compile(rf"(?i)([?&]x-amz-(?:signature|credential)=){_VALUE}"),
    # key=value and "key": "value" forms of secrets (storage_options, environment dumps).
    re.compile(
        rf"""(?i)((?:aws_)?(?:secret_access_key|secret|session_token|token|password)['"]?\s*[:=]\s*b?['"]?){_VALUE}"""
    ),
]
_known_secrets: set[str] = set()


def remember_secrets(options: dict[str, Any]) -> None:
    """Mask these storage_options' secret values wherever they appear, whatever their key's name."""
    from sdfleet.schemas.fingerprint import redact

    for key, value in options.items():
        if isinstance(value, dict):
            remember_secrets(value)
        elif isinstance(value, str) and len(value) >= 8 and redact({key: value})[key] == MASK:
            _known_secrets.add(value)


def mask(text: str) -> str:
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        if len(os.environ.get(name, "")) >= 8:
            text = text.replace(os.environ[name], MASK)
    for secret in _known_secrets:
        text = text.replace(secret, MASK)
    for pattern in _MASKS:
        text = pattern.sub(rf"\1{MASK}", text)
    return text


class MaskingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return mask(super().format(record))


def configure_logging(verbose: bool = False) -> None:
    """INFO (DEBUG with `verbose`) to stderr through a masking formatter; QUIET_LIBRARIES at ERROR
    and QUIET_ENVIRONMENT set unless verbose. Idempotent: the root's existing handlers get the masking formatter too."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for handler in root.handlers:
        handler.setFormatter(MaskingFormatter(FORMAT, datefmt="%H:%M:%S"))
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.ERROR)
    if not verbose:
        for key, value in QUIET_ENVIRONMENT.items():
            os.environ.setdefault(key, value)
        # tensorflow_hub (nsfw-detector's) imports pkg_resources, which warns on every import.
        warnings.filterwarnings(
            "ignore", message="pkg_resources is deprecated", category=UserWarning
        )


@contextlib.contextmanager
def native_start_up_quiet():
    """Hold what native libraries write to the process's stderr while the block runs, and show it
    only if the block fails (or under -v). TensorFlow's C++ start-up lines (oneDNN, "failed call
    to cuInit", which is no error on a CPU worker) come before absl reads any log setting, so no
    environment variable keeps them out of a default run."""
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)

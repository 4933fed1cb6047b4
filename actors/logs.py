"""Log set-up for the driver and the workers: one format, quiet libraries, no credential in any record.

`sdfleet -v` turns on DEBUG everywhere. botocore at DEBUG writes each request's canonical form
(the session token of temporary credentials), its headers (the signature), and every response
body: STS' AssumeRole answer, which a profile with `role_arn` fetches, holds the new secret key
and token. So every record of every logger is masked when it is made (`_masked_record`), by the
one rule in schemas/secrets.py, and again on its way out of our handlers; the driver's stdout and
stderr, where Ray prints the workers' lines, are masked too (`mask_streams`).

botocore's wire records (request dicts, canonical requests, response headers and bodies) stay off
under `-v` and come on with `-vv`: they are the records that carry credentials, the masking of a
body is only as good as its list of field names, and a job's bodies are mostly Parquet and tar
bytes that bury the lines `-v` is for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from typing import Any

from sdfleet.schemas.secrets import MASK, MIN_REMEMBERED, mask_credentials, redact

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
# botocore's wire loggers (aiobotocore logs through them): on only with -vv.
WIRE_LOGGERS = ("botocore.endpoint", "botocore.parsers", "botocore.auth")
WIRE_VERBOSITY = 2
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
# Credentials from the environment: masked wherever they appear, whatever surrounds them.
SECRET_ENVIRONMENT = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

# Values known to be secrets: the spec's storage_options secrets, and every value a credential
# field has held in a record so far (so a token seen in an STS body is masked in a traceback too).
_known_secrets: set[str] = set()


def remember_secrets(options: dict[str, Any]) -> None:
    """Mask these storage_options' secret values wherever they appear, whatever their key's name."""
    masked = redact(options)
    for key, value in options.items():
        if isinstance(value, dict):
            remember_secrets(value)
        elif isinstance(value, str) and len(value) >= MIN_REMEMBERED and masked[key] == MASK:
            _known_secrets.add(value)


def mask(text: str) -> str:
    """`text` with every known secret and every credential field's value masked."""
    for name in SECRET_ENVIRONMENT:
        if len(os.environ.get(name, "")) >= MIN_REMEMBERED:
            text = text.replace(os.environ[name], MASK)
    text = mask_credentials(text, _known_secrets)
    for secret in tuple(_known_secrets):
        text = text.replace(secret, MASK)
    return text


class MaskingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return mask(super().format(record))


_record_factory = logging.getLogRecordFactory()


def _masked_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
    """Every logger's records, masked as they are made: loggers with handlers of their own (Ray's)
    never pass through our formatter."""
    record = _record_factory(*args, **kwargs)
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 -- a bad format string: the handler reports it, unmasked args dropped
        record.msg, record.args = mask(str(record.msg)), None
        return record
    record.msg, record.args = mask(message), None
    if record.exc_info and not record.exc_text:
        record.exc_text = mask(logging.Formatter().formatException(record.exc_info))
    if record.stack_info:
        record.stack_info = mask(record.stack_info)
    return record


class MaskingStream:
    """A text stream that masks what is written through it (whole lines from Ray's log forwarding)."""

    def __init__(self, stream: Any):
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(mask(text))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def mask_streams() -> None:
    """Mask the driver's stdout and stderr, where Ray prints the workers' forwarded lines."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, MaskingStream):
            setattr(sys, name, MaskingStream(stream))


def configure_logging(verbose: int = 0) -> None:
    """INFO (DEBUG with `verbose`) to stderr through a masking formatter, every record masked;
    QUIET_LIBRARIES at ERROR and QUIET_ENVIRONMENT set unless verbose; WIRE_LOGGERS at INFO below
    WIRE_VERBOSITY. Idempotent: the root's existing handlers get the masking formatter too."""
    if logging.getLogRecordFactory() is not _masked_record:
        logging.setLogRecordFactory(_masked_record)
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for handler in root.handlers:
        handler.setFormatter(MaskingFormatter(FORMAT, datefmt="%H:%M:%S"))
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.ERROR)
    wire_off = verbose and verbose < WIRE_VERBOSITY  # else they follow botocore's level
    for name in WIRE_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if wire_off else logging.NOTSET)
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

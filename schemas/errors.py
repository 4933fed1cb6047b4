"""The failures a user can act on, and the exit codes the CLI gives them.

Every error here carries a message that names the value (a spec key, a URI, a file) and says what
to do. The CLI prints that message as one line and exits with `EXIT_REFUSED`; tracebacks are for
`-v`. Anything else that escapes is a bug, and keeps its traceback.
"""

from __future__ import annotations

# The CLI's exit codes (a contract: schedulers and scripts branch on them).
EXIT_OK = 0  # the dataset is complete (or the command did what it was asked)
EXIT_REFUSED = 1  # bad spec, input, storage or model: refused before any GPU is asked for
EXIT_INCOMPLETE = 2  # the job ended with shards quarantined or not started (budget); rerun to go on
EXIT_BUSY = 3  # another driver is running this output's job right now: nothing done, nothing to fix


def first_line(e: BaseException) -> str:
    """An exception in one line: its message's first line, or its type's name when it has none."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


class UserError(Exception):
    """A failure the user can fix. The message names the value and what to do."""


class DriverRunning(UserError):
    """The output's job is being run by a live driver (its lease is fresh): a second driver is
    refused before any worker starts, with EXIT_BUSY, since there is nothing to fix."""


class SpecError(UserError, ValueError):
    """A spec that cannot run: names the key, the bad value and what to do."""


class InputError(SpecError):
    """The input cannot be used as given: names the file and what to do."""


class ModelLoadError(UserError, RuntimeError):
    """The model cannot be loaded as the spec gives it: names the source and what to do."""


class StorageError(UserError, OSError):
    """A URI that cannot be read or written: names it, the cause and what to set."""


class StorageNotFound(StorageError, FileNotFoundError):
    """The object, prefix or bucket does not exist."""


class StorageDenied(StorageError, PermissionError):
    """The credentials in use may not do this to that URI."""


class Preempted(RuntimeError):
    """The worker got a termination notice (SIGTERM): its shard is abandoned and goes back
    uncounted. Not a user's error: the worker raises it and the driver's pool recognises it."""

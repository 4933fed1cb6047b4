"""Ctrl-C and SIGTERM on the driver: one orderly stop, whenever they come.

The CLI installs `WATCH`'s handlers for the whole command. A signal is recorded once; where raising
is safe (spec loading, planning, S3 reads: plain Python) the handler raises `Interrupt`, a
BaseException no `except Exception` swallows. Where it is not, the block runs `deferred()`: the
signal is only recorded and raised when the block ends. That covers Ray's calls (an exception
raised by a Python handler inside its core worker's calls comes out as `SystemError: <cyfunction
CoreWorker.wait ...>`), the claim of the output and its lease, and the writes that declare a
dataset complete. The dispatcher polls `pending` between its waits, so a stop mid-job takes at
most one poll.

However the stop surfaces (an `Interrupt`, or any error raised on the way out while a signal is
pending), the CLI prints `line()`, one line saying how far the job got, and exits 128 + the signal
(130 for SIGINT, 143 for SIGTERM). A second signal while the first one's stop runs ends the process
at once: the user insists, and a rerun copes with whatever that leaves (the lease of a process that
is gone is nobody's). Once the command's outcome is decided, signals change nothing: the process
leaves Ray and exits with that outcome, signals ignored (Ray's shutdown and the interpreter's own
finalization would otherwise put the default, killing, action back).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# What the line says before the job's plan is known.
BEFORE_THE_JOB = "before the job started; nothing was written"


class Interrupt(BaseException):
    """A signal, raised where raising is safe; the CLI turns it into the one line and exit code."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class Interrupts:
    """The process's SIGINT/SIGTERM state (see the module's docstring)."""

    def __init__(self) -> None:
        self.installed = False
        self.reset()

    def reset(self) -> None:
        """No signal yet, nothing deferred, no job known."""
        self.signum: int | None = None
        self.deferring = 0
        # How far the job got, as the line says it ("after 3 of 8 shards committed"); the job
        # runner sets it as the job goes on.
        self.progress: Callable[[], str] = lambda: BEFORE_THE_JOB

    @property
    def pending(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    def line(self) -> str:
        name = signal.Signals(self.signum or signal.SIGINT).name
        try:
            where = self.progress()
        except Exception:  # noqa: BLE001 -- the line must come out whatever the job's state
            where = "part-way"
        return f"interrupted ({name}) {where}; rerun the same command to resume"

    # ------------------------------------------------------------------ handlers

    def install(self) -> None:
        """Handle both signals from now on (main thread only: elsewhere Python cannot)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for s in SIGNALS:
            signal.signal(s, self._handle)
        self.installed = True

    @contextlib.contextmanager
    def handling(
        self, whole_process: bool = False, leave: Callable[[], None] = lambda: None
    ) -> Iterator[Interrupts]:
        """Install for the block; after it, the handlers before it come back. For the whole
        process (the `sdfleet` command itself) signals are ignored from the block's end on: the
        command's outcome is decided, and what is left is the process's exit. `leave` (leaving
        Ray) runs then, ignored signals and all."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in SIGNALS}
        self.reset()  # a command of its own (tests call the CLI's main more than once)
        self.install()
        try:
            yield self
        finally:
            self.installed = False
            if whole_process:
                _ignore()
                leave()
                # Again: Ray's shutdown puts SIGTERM back to the default (a SIGTERM then killed a
                # finished run's process), and so would the interpreter's finalization a Python
                # handler; an ignored signal it leaves alone.
                _ignore()
            else:
                for s, h in previous.items():
                    signal.signal(s, h)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            os.write(2, f"sdfleet: {signal.Signals(signum).name} again: stopping now\n".encode())
            os._exit(128 + self.signum)
        self.signum = signum
        if not self.deferring:
            raise Interrupt(signum)

    # ------------------------------------------------------------------ where raising is unsafe

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Record signals in the block without raising; raise `Interrupt` when it ends if one came."""
        self.deferring += 1
        try:
            yield
        finally:
            self.deferring -= 1
        self.check()

    def decided(self) -> None:
        """The command's outcome is decided: signals from now on are recorded, never raised."""
        self.deferring += 1

    def check(self) -> None:
        """Raise `Interrupt` if a signal came (where the handler could not raise it)."""
        if self.signum is not None and not self.deferring:
            raise Interrupt(self.signum)

    @contextlib.contextmanager
    def ray_init(self) -> Iterator[None]:
        """Around `ray.init`, deferred. ray.init replaces the SIGTERM handler with its own, which
        raises SystemExit(SIGTERM): that exit is recorded as the SIGTERM it is, and this module's
        handlers come back."""
        with self.deferred():
            try:
                yield
            except BaseException as e:
                if not _ray_sigterm(e):
                    raise
                self.signum = self.signum or signal.SIGTERM
            finally:
                if self.installed:
                    self.install()


def _ignore() -> None:
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def _ray_sigterm(e: BaseException | None) -> bool:
    """Whether `e` is, or was raised while handling, ray.init's SIGTERM exit."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, SystemExit) and e.code == signal.SIGTERM:
            return True
        e = e.__cause__ or e.__context__
    return False


# One per process, as signal handlers are: the CLI installs it, the job runner tells it how far
# the job got and defers it where it must.
WATCH = Interrupts()

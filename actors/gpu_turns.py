"""`GpuTurns`: a worker's shards take the pipeline one at a time, in the order they arrived."""

from __future__ import annotations

import threading
from contextlib import contextmanager


class GpuTurns:
    """Hands the pipeline to one shard at a time. Shards take their first turn in the order they
    arrived (tickets). A shard may step aside (`pause`) while it waits on something else than the
    pipeline (best-of-N waits for a round's scores before it knows what to make next): the next
    shard generates meanwhile, and the paused one takes the pipeline back once it is free.

    A shard that ends before its turn (already committed, unreadable input) gives its ticket back,
    so the shard after it is not kept waiting.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._issued = 0
        self._next_first = 0  # the ticket whose first turn comes next
        self._passed: set[int] = set()  # tickets that had their first turn or gave theirs back
        self._holder: int | None = None

    def take(self) -> int:
        with self._cond:
            self._issued += 1
            return self._issued - 1

    @contextmanager
    def turn(self, ticket: int, check=lambda: None):
        """Wait for `ticket`'s turn (calling `check` while waiting), hold it for the block."""
        with self._cond:
            while self._holder is not None or self._next_first != ticket:
                check()
                self._cond.wait(timeout=0.5)
            self._holder = ticket
            self._pass(ticket)
        try:
            yield
        finally:
            self.release(ticket)

    @contextmanager
    def pause(self, ticket: int):
        """Inside `ticket`'s turn: let another shard have the pipeline for the block, then take it
        back."""
        with self._cond:
            self._holder = None
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                while self._holder is not None:
                    self._cond.wait(timeout=0.5)
                self._holder = ticket

    def release(self, ticket: int) -> None:
        """`ticket` is done with the pipeline (idempotent): the next ticket in line gets the
        turn."""
        with self._cond:
            self._pass(ticket)
            if self._holder == ticket:
                self._holder = None
            self._cond.notify_all()

    def _pass(self, ticket: int) -> None:
        self._passed.add(ticket)
        while self._next_first in self._passed:
            self._passed.discard(self._next_first)
            self._next_first += 1

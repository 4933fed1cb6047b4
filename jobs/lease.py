"""`_driver.json`: the one live driver of an output.

A driver holds the lease while it runs the output's job: written (conditionally, so that of two
drivers starting at once exactly one holds it) before any worker starts, refreshed every
LEASE_REFRESH_S, and released when it ends. A lease that is released, or silent for LEASE_STALE_S
(a SIGKILLed driver releases nothing), is nobody's, and so is one whose driver ran on this host
in a process that is gone. While it is somebody's, a second `sdfleet run`
on the output is refused (`DriverRunning`, exit 3) instead of redoing the running driver's work,
a job that committed nothing is not replaced, and no shard is withdrawn; `status` and `plan`
name the holder.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from sdfleet.actors.record_versions import ChangedMeanwhile, read_versioned, replace_if_unchanged
from sdfleet.actors.storage import Storage, json_bytes
from sdfleet.schemas import layout
from sdfleet.schemas.errors import DriverRunning

log = logging.getLogger("sdfleet")

# The driver refreshes its lease on the output this often; one silent for LEASE_STALE_S is taken
# for dead (a SIGKILLed driver releases nothing), so its job may be replaced if it committed nothing.
LEASE_REFRESH_S = 30.0
LEASE_STALE_S = 180.0


def describe_holder(lease: dict[str, Any]) -> str:
    return f"host {lease.get('host')}, pid {lease.get('pid')}, since {lease.get('started_at')}"


def running_refusal(url: str, holder: str) -> DriverRunning:
    """The one refusal of a second driver on an output whose driver is live."""
    return DriverRunning(
        f"{url} is being written by a running driver ({holder}); this run would redo its work. "
        f"Let it finish (`sdfleet status` shows it), or rerun once it has ended; a killed driver's "
        f"lease lapses {LEASE_STALE_S:.0f} s after its last refresh"
    )


class DriverLease:
    """`_driver.json` of one output (see the module's docstring). `job` is the output's job record
    (`active` reads its `created_at`) or, for `held`, this driver's fingerprint."""

    def __init__(self, storage: Storage, job: dict[str, Any]):
        self.storage = storage
        self.job = job
        self.stop = threading.Event()

    def running(self) -> str | None:
        """The live driver ("host H, pid P, since T"), from its lease, or None when nobody holds it."""
        try:
            lease = _parse(self.storage.read_bytes(layout.DRIVER_FILE))
        except FileNotFoundError:
            return None
        return describe_holder(lease) if _live(lease) else None

    def active(self) -> str | None:
        """Like `running`, and a job claimed moments ago whose driver has not yet written its
        lease counts as running too (for refusals that must not race a driver's first seconds)."""
        if self.storage.exists(layout.DRIVER_FILE):
            return self.running()
        claimed = dt.datetime.fromisoformat(self.job.get("created_at", "1970-01-01T00:00:00+00:00"))
        fresh = (dt.datetime.now(dt.UTC) - claimed).total_seconds() < LEASE_STALE_S
        return "the driver that claimed it just now" if fresh else None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold the lease while the block runs; DriverRunning if a live driver holds it."""
        record = {
            "fingerprint": self.job["fingerprint"],
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "released": False,
        }
        self._acquire(record)
        refresher = threading.Thread(target=self._refresh, args=(record,), daemon=True)
        refresher.start()
        try:
            yield
        finally:
            self.stop.set()
            refresher.join(timeout=5)
            try:
                self._write({**record, "released": True})
            except Exception as e:  # noqa: BLE001 -- the lease then goes stale, which is as good
                log.warning("could not release %s: %s", self.storage.url(layout.DRIVER_FILE), e)

    def _acquire(self, record: dict[str, Any]) -> None:
        """Take the lease if nobody holds it, conditionally on the version read: of two drivers
        taking one lease at once, the second finds it changed and is refused."""
        stamped = {**record, "updated_ts": round(time.time(), 3)}
        try:
            data, version = read_versioned(self.storage, layout.DRIVER_FILE)
        except FileNotFoundError:
            try:
                self.storage.write_json(layout.DRIVER_FILE, stamped, exclusive=True)
                return
            except FileExistsError:
                raise self._refusal() from None
        lease = _parse(data)
        if _live(lease):
            raise running_refusal(self.storage.url(), describe_holder(lease))
        try:
            replace_if_unchanged(self.storage, layout.DRIVER_FILE, json_bytes(stamped), version)
        except ChangedMeanwhile:
            raise self._refusal() from None

    def _refusal(self) -> DriverRunning:
        holder = self.running() or "one that started this moment"
        return running_refusal(self.storage.url(), holder)

    def _refresh(self, record: dict[str, Any]) -> None:
        while not self.stop.wait(LEASE_REFRESH_S):
            try:
                self._write(record)
            except Exception as e:  # noqa: BLE001 -- a missed refresh is retried at the next one
                log.warning("could not refresh %s: %s", self.storage.url(layout.DRIVER_FILE), e)

    def _write(self, record: dict[str, Any]) -> None:
        self.storage.write_json(layout.DRIVER_FILE, {**record, "updated_ts": round(time.time(), 3)})


def _parse(data: bytes) -> dict[str, Any]:
    try:
        lease = json.loads(data)
    except ValueError:
        return {}
    return lease if isinstance(lease, dict) else {}


def _live(lease: dict[str, Any]) -> bool:
    """Unreleased, refreshed within LEASE_STALE_S, and not a driver on this very host whose process
    is gone (a SIGKILLed driver's rerun goes on at once instead of waiting for the lease to lapse)."""
    if lease.get("released") or time.time() - lease.get("updated_ts", 0) > LEASE_STALE_S:
        return False
    return lease.get("host") != socket.gethostname() or _process_exists(lease.get("pid"))


def _process_exists(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True

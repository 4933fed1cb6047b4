"""A Ray head started with the real `ray start --head` CLI, on its own temp dir and ports, stopped by PID.

The machine may run other Ray clusters, so nothing here ever calls `ray stop`: `Head.stop()` ends only
the processes this head started. They are found three ways, any of which suffices:

- a unique tag (`SDF_RAYSTART_TAG`) in the environment of `ray start`, which every process it starts
  inherits: GCS, raylet, dashboard and its agents, the autoscaler monitor, workers, job drivers, and the
  raylets of fake_multinode worker nodes (which the monitor spawns);
- the temp dir in the command line (GCS, raylet and workers all carry a path under it);
- descent from a process already found.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import free_port, wait_for  # noqa: F401 -- re-exported for the cluster tests

VENV_BIN = Path(sys.executable).parent
TAG = "SDF_RAYSTART_TAG"



def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _ppid(pid: int) -> int:
    stat = _read(f"/proc/{pid}/stat").decode(errors="replace")
    try:
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (IndexError, ValueError):
        return 0


def proc_name(pid: int) -> str:
    """The process's name (/proc/PID/comm), "" once it is gone."""
    return _read(f"/proc/{pid}/comm").decode(errors="replace").strip()


def _own_ancestry() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        pid = _ppid(pid)
    return pids


def find_processes(marker: str) -> list[int]:
    """PIDs of processes whose command line or environment carries `marker`, and their descendants."""
    # The marker as a whole path: /tmp/sdf-as-abc must not match /tmp/sdf-as-abcd.
    needle = re.compile(re.escape(marker.encode()) + rb"(?=[/\0\s'\",:;=]|$)")
    tag = f"{TAG}={marker}".encode()
    mine, parents = set(), {}
    exclude = _own_ancestry()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid in exclude:
            continue
        parents[pid] = _ppid(pid)
        if needle.search(_read(f"/proc/{pid}/cmdline")) or tag in _read(f"/proc/{pid}/environ").split(b"\0"):
            mine.add(pid)
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if pid not in mine and ppid in mine:
                mine.add(pid)
                grew = True
    return sorted(mine)


def rss_bytes(pids) -> int:
    """Sum of resident set sizes (shared pages counted once per process, so an upper bound)."""
    return _summed_kib(pids, "status", "VmRSS:")


def pss_bytes(pids) -> int:
    """Sum of proportional set sizes: shared pages split between the processes that map them."""
    return _summed_kib(pids, "smaps_rollup", "Pss:")


def _summed_kib(pids, proc_file: str, field: str) -> int:
    """Bytes: the sum over `pids` of the kB figure on the `field` line of /proc/PID/`proc_file`."""
    total = 0
    for pid in pids:
        for line in _read(f"/proc/{pid}/{proc_file}").decode(errors="replace").splitlines():
            if line.startswith(field):
                total += int(line.split()[1]) * 1024
    return total


@dataclass
class Head:
    temp_dir: Path
    gcs_address: str
    dashboard_url: str
    port: int
    dashboard_port: int
    env: dict
    start_output: str = ""
    _stopped: bool = field(default=False, repr=False)

    def processes(self) -> list[int]:
        return find_processes(str(self.temp_dir))

    def memory(self) -> dict[str, int]:
        pids = self.processes()
        return {"processes": len(pids), "rss": rss_bytes(pids), "pss": pss_bytes(pids)}

    def logs(self, pattern: str = "*", tail: int = 3000) -> str:
        """The tail of this head's session logs matching `pattern`, for failure messages."""
        out = []
        for path in sorted(self.temp_dir.glob(f"session_latest/logs/{pattern}")):
            if path.is_file():
                out.append(f"==> {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    def stop(self, timeout: float = 5, remove: bool = True) -> list[int]:
        """SIGTERM, then SIGKILL after `timeout` s, every process of this cluster; repeat until none is
        left. Idempotent. (Some never end on SIGTERM alone: the GCS and raylets of a cluster whose other
        processes are going, and sdfleet workers, which finish their shard first.)"""
        killed: set[int] = set()
        for _ in range(5):
            pids = self.processes()
            if not pids:
                break
            killed.update(pids)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and any(_alive(p) for p in pids):
                time.sleep(0.2)
            for pid in pids:
                if _alive(pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            time.sleep(0.3)
        left = self.processes()
        if remove and not left:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        self._stopped = not left
        if left:
            raise RuntimeError(f"processes of the Ray head in {self.temp_dir} survived SIGKILL: {left}")
        return sorted(killed)


def _alive(pid: int) -> bool:
    # A zombie has exited; it only waits for a parent that is not us.
    stat = _read(f"/proc/{pid}/stat").decode(errors="replace")
    return bool(stat) and stat.rsplit(")", 1)[1].split()[0] != "Z"


def make_temp_dir(prefix: str = "sdf-ray-") -> Path:
    # Short, under /tmp: Ray's Unix socket paths (temp dir + session + sockets/...) cap at 107 bytes.
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def start_head(temp_dir: Path | str | None = None, env_extra: dict | None = None, *args: str,
               port: int | None = None, timeout: float = 120) -> Head:
    """`ray start --head` on its own temp dir and ports; extra CLI flags in `args` (e.g. --num-gpus=2).

    The venv's bin comes first on PATH, so `python` and `sdfleet` in a `ray job submit` entrypoint are
    the venv's. On failure everything started so far is stopped before the error is raised.
    """
    temp_dir = Path(temp_dir) if temp_dir else make_temp_dir()
    temp_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    dashboard_port = free_port()
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "disabled",
        "RAY_TMPDIR": str(temp_dir),
        "RAY_USAGE_STATS_ENABLED": "0",
        **(env_extra or {}),
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head",
        f"--port={port}",
        f"--temp-dir={temp_dir}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        "--disable-usage-stats",
        *args,
    ]
    head = Head(temp_dir=temp_dir, gcs_address=f"127.0.0.1:{port}",
                dashboard_url=f"http://127.0.0.1:{dashboard_port}", port=port, dashboard_port=dashboard_port,
                env=env)
    try:
        # Only the cluster's own processes carry the tag; `env` stays the environment for its clients.
        done = subprocess.run(cmd, env={**env, TAG: str(temp_dir)}, capture_output=True, text=True,
                              timeout=timeout)
        head.start_output = done.stdout + done.stderr
        if done.returncode != 0:
            raise RuntimeError(f"ray start failed ({done.returncode}):\n{head.start_output[-4000:]}")
        # Ray swaps a loopback --node-ip-address for the machine's routable IP; ask it which it chose.
        address_file = temp_dir / "ray_current_cluster"
        if address_file.exists():
            head.gcs_address = address_file.read_text().strip() or head.gcs_address
    except BaseException:
        head.stop(remove=False)
        raise
    atexit.register(_stop_quietly, head)  # a safety net should a caller never get to stop() it
    return head


def _stop_quietly(head: Head) -> None:
    try:
        head.stop()
    except Exception:
        pass


class Sampler(threading.Thread):
    """Samples the cluster's processes every `period` s: peak count, RSS and PSS; and calls `probe()`.

    RSS sums count shared pages once per process (an upper bound); PSS splits them (the real cost).
    """

    def __init__(self, head: Head, period: float = 1.0, probe=None):
        super().__init__(daemon=True)
        self.head, self.period, self.probe = head, period, probe
        self.halt = threading.Event()
        self.peak_rss = self.peak_pss = self.peak_procs = 0
        self.probe_errors: list[str] = []

    def run(self):
        while not self.halt.is_set():
            pids = self.head.processes()
            self.peak_procs = max(self.peak_procs, len(pids))
            self.peak_rss = max(self.peak_rss, rss_bytes(pids))
            self.peak_pss = max(self.peak_pss, pss_bytes(pids))
            if self.probe is not None:
                try:
                    self.probe()
                except Exception as e:  # e.g. the dashboard busy for a moment: keep sampling
                    self.probe_errors.append(repr(e))
            self.halt.wait(self.period)

    def stop(self):
        self.halt.set()
        self.join(timeout=30)

    def summary(self) -> str:
        return (f"peak {self.peak_procs} processes, RSS {self.peak_rss / 2**30:.2f} GiB, "
                f"PSS {self.peak_pss / 2**30:.2f} GiB")

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()



"""Ray clusters for the tests, started with the real `ray start` CLI on their own temp dirs and ports,
and stopped by PID.

The machine may run other Ray clusters, so nothing here ever calls `ray stop`: `Head.stop()` ends only
the processes of its own cluster. A node's processes are found three ways, any of which suffices:

- a tag (`SDF_RAYSTART_TAG`, the node's temp dir) in the environment of its `ray start`, which every
  process it starts inherits: GCS, raylet, dashboard and its agents, the autoscaler monitor, workers,
  job drivers, and the raylets of fake_multinode worker nodes (which the monitor spawns);
- the temp dir in the command line (GCS, raylet and workers all carry a path under it);
- descent from a process already found.

A worker node's temp dir lies inside its head's: the head's processes include every node's, and one
worker node's processes alone can be killed, as when its machine dies.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from helpers import free_port

VENV_BIN = Path(sys.executable).parent
TAG = "SDF_RAYSTART_TAG"
# `ray start --head` flag: the GCS declares a node dead after about a second without an answer,
# instead of about 20.
FAST_HEALTH_CHECKS = "--system-config=" + json.dumps(
    {
        "health_check_period_ms": 500,
        "health_check_failure_threshold": 2,
        "health_check_timeout_ms": 500,
    }
)


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


def proc_title(pid: int) -> str:
    """The process's command line as one string (Ray workers set it to e.g. `ray::Actor.method`)."""
    return _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode(errors="replace").strip()


def actor_pids(cluster, running_only: bool = False) -> list[int]:
    """PIDs of ShardGenerator actor processes of this cluster (never anyone else's); with
    `running_only`, those whose process title says they are running a shard."""
    titles = {pid: proc_title(pid) for pid in cluster.processes()}
    return [
        pid
        for pid, title in titles.items()
        if "ShardGenerator" in title and (not running_only or ".run" in title)
    ]


def _own_ancestry() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        pid = _ppid(pid)
    return pids


def find_processes(marker: str) -> list[int]:
    """PIDs of processes whose command line or tag names the path `marker` or a path under it, and
    their descendants."""
    # The marker as a whole path: /tmp/sdf-as-abc must not match /tmp/sdf-as-abcd.
    in_cmdline = re.compile(re.escape(marker.encode()) + rb"(?=[/\0\s'\",:;=]|$)")
    in_environ = re.compile(rb"(?:^|\0)" + re.escape(f"{TAG}={marker}".encode()) + rb"(?=[/\0]|$)")
    mine, parents = set(), {}
    exclude = _own_ancestry()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid in exclude:
            continue
        parents[pid] = _ppid(pid)
        if in_cmdline.search(_read(f"/proc/{pid}/cmdline")) or in_environ.search(
            _read(f"/proc/{pid}/environ")
        ):
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


def _alive(pid: int) -> bool:
    # A zombie has exited; it only waits for a parent that is not us.
    stat = _read(f"/proc/{pid}/stat").decode(errors="replace")
    return bool(stat) and stat.rsplit(")", 1)[1].split()[0] != "Z"


def _signal(pids, sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def make_temp_dir(prefix: str = "sdf-ray-") -> Path:
    # Short, under /tmp: Ray's Unix socket paths (temp dir + session + sockets/...) cap at 107 bytes.
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def _ray_start(args: list[str], env: dict, tag: Path, timeout: float) -> None:
    """Run `ray start` with the node's tag in its environment; RuntimeError with its output if it fails."""
    # Only the cluster's own processes carry the tag; `env` stays the environment for its clients.
    done = subprocess.run(
        [str(VENV_BIN / "ray"), "start", *args, "--disable-usage-stats"],
        env={**env, TAG: str(tag)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"ray start failed ({done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}"
        )


def _node_ports() -> list[str]:
    """The ports every node listens on, each its own, so no two clusters on this machine clash."""
    return [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
    ]


@dataclass
class WorkerNode:
    """A node joined to a head with `ray start --address`; named by a custom resource of its own."""

    name: str
    temp_dir: Path

    def processes(self) -> list[int]:
        return find_processes(str(self.temp_dir))

    def kill(self) -> list[int]:
        """SIGKILL every process of this node at once, as when its machine dies: nothing says goodbye."""
        pids = self.processes()
        _signal(pids, signal.SIGKILL)
        return pids


@dataclass
class Head:
    temp_dir: Path
    address: str  # the GCS, for `ray.init(address=)` and `sdfleet run --address`
    dashboard_url: str
    metrics_port: int  # the head node's Prometheus endpoint
    env: dict  # the environment of the cluster's processes, for its clients (no tag)
    workers: list[WorkerNode] = field(default_factory=list)

    def processes(self) -> list[int]:
        """Every process of the cluster, its worker nodes' included."""
        return find_processes(str(self.temp_dir))

    def logs(self, pattern: str = "*", tail: int = 3000) -> str:
        """The tail of this head's session logs matching `pattern`, for failure messages."""
        out = []
        for path in sorted(self.temp_dir.glob(f"session_latest/logs/{pattern}")):
            if path.is_file():
                out.append(f"==> {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    def add_worker(self, *args: str, timeout: float = 120) -> WorkerNode:
        """`ray start --address=<this head>` with `args` (e.g. --num-gpus=1), on a temp dir inside the
        head's, with a custom resource {name: 1} that tells its node apart in the state API."""
        name = f"worker{len(self.workers) + 1}"
        temp_dir = self.temp_dir / name
        temp_dir.mkdir()
        _ray_start(
            [
                f"--address={self.address}",
                f"--temp-dir={temp_dir}",
                *_node_ports(),
                f"--metrics-export-port={free_port()}",
                f"--resources={json.dumps({name: 1})}",
                *args,
            ],
            {**self.env, "RAY_TMPDIR": str(temp_dir)},
            temp_dir,
            timeout,
        )
        worker = WorkerNode(name, temp_dir)
        self.workers.append(worker)
        return worker

    def dashboard_answers(self) -> bool:
        """Whether the dashboard answers HTTP at all (a 401 too: it wants the cluster's token)."""
        try:
            urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2).close()
        except urllib.error.HTTPError:
            pass
        except OSError:
            return False
        return True

    def nodes(self) -> list[dict]:
        """Every node the GCS knows, alive or dead, from the dashboard's state API (no Ray client here)."""
        with urllib.request.urlopen(
            f"{self.dashboard_url}/api/v0/nodes?limit=100&detail=1", timeout=10
        ) as r:
            return json.load(r)["data"]["result"]["result"]

    def alive_nodes(self) -> list[dict]:
        return [n for n in self.nodes() if n["state"] == "ALIVE"]

    def node_id(self, worker: WorkerNode) -> str:
        [node] = [n for n in self.nodes() if worker.name in n.get("resources_total", {})]
        return node["node_id"]

    def stop(self, timeout: float = 5, remove: bool = True) -> None:
        """SIGTERM, then SIGKILL after `timeout` s, every process of this cluster; repeat until none is
        left. Idempotent. (Some never end on SIGTERM alone: the GCS and raylets of a cluster whose other
        processes are going, and sdfleet workers, which finish their shard first.)"""
        for _ in range(5):
            pids = self.processes()
            if not pids:
                break
            _signal(pids, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and any(_alive(p) for p in pids):
                time.sleep(0.2)
            _signal([p for p in pids if _alive(p)], signal.SIGKILL)
            time.sleep(0.3)
        left = self.processes()
        if left:
            raise RuntimeError(
                f"processes of the Ray head in {self.temp_dir} survived SIGKILL: {left}"
            )
        if remove:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_head(
    *args: str,
    temp_dir: Path | None = None,
    env: dict | None = None,
    port: int | None = None,
    timeout: float = 120,
) -> Head:
    """`ray start --head` on its own temp dir and ports, with extra flags in `args` (e.g. --num-gpus=2)
    and extra environment in `env`, which every process of the cluster inherits.

    The venv's bin comes first on PATH, so `python` and `sdfleet` in a `ray job submit` entrypoint are
    the venv's. On failure everything started so far is stopped before the error is raised.
    """
    temp_dir = temp_dir or make_temp_dir()
    temp_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    dashboard_port, metrics_port = free_port(), free_port()
    cluster_env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "disabled",
        "RAY_TMPDIR": str(temp_dir),
        "RAY_USAGE_STATS_ENABLED": "0",
        **(env or {}),
    }
    cluster_env.pop("RAY_ADDRESS", None)
    head = Head(
        temp_dir=temp_dir,
        address=f"127.0.0.1:{port}",
        dashboard_url=f"http://127.0.0.1:{dashboard_port}",
        metrics_port=metrics_port,
        env=cluster_env,
    )
    try:
        _ray_start(
            [
                "--head",
                f"--port={port}",
                f"--temp-dir={temp_dir}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard_port}",
                f"--ray-client-server-port={free_port()}",
                f"--metrics-export-port={metrics_port}",
                *_node_ports(),
                *args,
            ],
            cluster_env,
            temp_dir,
            timeout,
        )
        # Ray swaps a loopback --node-ip-address for the machine's routable IP; ask it which it chose.
        address_file = temp_dir / "ray_current_cluster"
        if address_file.exists():
            head.address = address_file.read_text().strip() or head.address
    except BaseException:
        head.stop(remove=False)
        raise
    atexit.register(_stop_quietly, head)  # a safety net should a caller never get to stop() it
    return head


def _stop_quietly(head: Head) -> None:
    with contextlib.suppress(Exception):
        head.stop()


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
        errors = (
            f"; probe failed {len(self.probe_errors)}x, last {self.probe_errors[-1]}"
            if self.probe_errors
            else ""
        )
        return (
            f"peak {self.peak_procs} processes, RSS {self.peak_rss / 2**30:.2f} GiB, "
            f"PSS {self.peak_pss / 2**30:.2f} GiB{errors}"
        )

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

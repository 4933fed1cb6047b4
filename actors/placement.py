"""Where a worker runs, as Ray sees it: its node, actor and GPUs, and the CPU threads its node
gives it. Outside Ray: the host name and pid, and no thread count."""

from __future__ import annotations

import os
import socket
from typing import Any

from sdfleet.schemas.resources import cpu_threads_per_worker, gpu_workers_per_node


def node_cpu_threads(gpus_per_worker: float) -> int | None:
    """CPU threads for torch in a GPU actor: the node's CPUs shared among the GPU actors it can
    hold.

    Fixed per node type, so CPU-side results never depend on how many actors happen to run.
    """
    try:
        import ray

        if not ray.is_initialized():
            return None
        node_id = ray.get_runtime_context().get_node_id()
        node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
    except (ImportError, StopIteration):
        return None
    cpus, gpus = node["Resources"].get("CPU", 1), node["Resources"].get("GPU", 0)
    return cpu_threads_per_worker(cpus, gpu_workers_per_node(gpus, gpus_per_worker))


def worker_identity() -> dict[str, Any]:
    """Node, actor and GPU as Ray sees them; the host name and pid outside Ray."""
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            gpu_ids = [str(g) for g in ray.get_gpu_ids()]
            actor = ctx.get_actor_id()
            return {
                "node": ctx.get_node_id(),
                "actor": actor or f"{socket.gethostname()}:{os.getpid()}",
                "gpu_ids": gpu_ids,
                "gpu_id": ",".join(gpu_ids) or None,
            }
    except ImportError:
        pass
    return {
        "node": socket.gethostname(),
        "actor": f"pid:{os.getpid()}",
        "gpu_ids": [],
        "gpu_id": None,
    }

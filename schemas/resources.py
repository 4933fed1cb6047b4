"""How a node's resources are shared among the workers on it: the one rule for a worker's CPU
threads, which the GPU actors (per node) and the CPU actors (per cluster) both follow.

CPU float results depend on the thread count, so it follows from the node's (or cluster's)
capacity, never from how many workers happen to run or how much work is left: a resumed shard
must come out byte-identical to the one an uninterrupted run would have made.
"""

from __future__ import annotations


def gpu_workers_per_node(gpus: float, gpus_per_worker: float) -> float:
    """The GPU workers a node with `gpus` GPUs holds (1 where it has none, or none is asked)."""
    return gpus / gpus_per_worker if gpus and gpus_per_worker else 1


def cpu_threads_per_worker(cpus: float, workers: float) -> int:
    """A worker's torch CPU threads: the CPUs divided among the workers they serve, at least 1."""
    return max(1, int(cpus // max(1, workers)))

"""Whether every worker writes to the output the driver reads.

A local `output.uri` names a folder on each node's own disk: a worker on another node than the
driver's would commit its shards where neither the driver nor the other nodes look, and each rerun
would redo some shards and skip others. Such a job is refused before any worker starts when the
cluster shows it (more than one node, or GPU workers on a cluster whose driver node has no GPU, so
that they can only run on nodes an autoscaler adds); a worker that still starts on another node
(an autoscaler grew a cluster that began as a lone GPU node) stops the job before it gets a shard.

A filesystem that every node mounts at the same path (NFS, Lustre, EFS) is a local path too, and
its path cannot be told from a node's own disk: the user says so with `output.shared_filesystem:
true`. A declaration rather than a probe: a token file the driver writes and each node looks for
could only test the nodes up at the start, not those an autoscaler adds later. The key is recorded
in `_job.json`, and left out of the fingerprint: it says where the files go, not what they are.
"""

from __future__ import annotations

from sdfleet.schemas.errors import SpecError
from sdfleet.schemas.locations import is_remote
from sdfleet.schemas.spec import OutputSpec

ADVICE = (
    "Use an object store (output.uri: s3://bucket/prefix), or, if that path is a filesystem every "
    "node mounts at the same place (NFS, Lustre, EFS), say so with output.shared_filesystem: true"
)


def _checked(output: OutputSpec) -> bool:
    return not is_remote(output.uri) and not output.shared_filesystem


def check_output_reaches_every_node(output: OutputSpec, gpu_workers: bool) -> None:
    """SpecError naming output.uri when it is a local path not declared shared and the connected
    Ray cluster has more than one node, or its workers need a GPU that the driver's node lacks."""
    if not _checked(output):
        return
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        raise SpecError(
            f"output.uri {output.uri} is a local path, and the Ray cluster has {len(nodes)} nodes: "
            "each worker would commit its shards to its own node's disk, where the driver and the "
            f"other nodes never look. {ADVICE}"
        )
    here = ray.get_runtime_context().get_node_id()
    own_gpus = sum(n.get("Resources", {}).get("GPU", 0) for n in nodes if n.get("NodeID") == here)
    if gpu_workers and not own_gpus:
        raise SpecError(
            f"output.uri {output.uri} is a local path, and the driver's node has no GPU: the GPU "
            "workers will run on nodes an autoscaler adds, each committing its shards to its own "
            f"disk, where the driver never looks. {ADVICE}"
        )


def worker_node_refusal(output: OutputSpec, worker_node: str, driver_node: str) -> SpecError | None:
    """The refusal for a worker that started on another node than the driver's, for a local
    output not declared shared; None when the worker may go on."""
    if not _checked(output) or worker_node == driver_node:
        return None
    return SpecError(
        f"output.uri {output.uri} is a local path, and a worker started on node {worker_node}, not "
        f"the driver's ({driver_node}): it would commit its shards to that node's disk, where the "
        f"driver never looks. {ADVICE}"
    )

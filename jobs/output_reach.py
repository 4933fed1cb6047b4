"""Whether every node of the Ray cluster writes to the output the driver reads.

A local `output.uri` names a folder on each node's own disk: on a cluster of several nodes every
worker would commit its shards where neither the driver nor the other nodes look, and each rerun
would redo some shards and skip others. Such a job is refused once the driver is connected to
Ray, before any worker starts.

A filesystem that every node mounts at the same path (NFS, Lustre, EFS) is a local path too, and
its path cannot be told from a node's own disk: the user says so with `output.shared_filesystem:
true`. A declaration rather than a probe: a token file the driver writes and each node looks for
could only test the nodes up at the start, not those an autoscaler adds later, and the key is
recorded in `_job.json` (outside the fingerprint: it says where the files go, not what they are).
The check counts the nodes up when the job starts; a cluster that starts as a lone head and grows
is not caught here.
"""

from __future__ import annotations

from sdfleet.schemas.errors import SpecError
from sdfleet.schemas.locations import is_remote
from sdfleet.schemas.spec import OutputSpec


def check_output_reaches_every_node(output: OutputSpec) -> None:
    """SpecError naming output.uri when it is a local path not declared shared and the connected
    Ray cluster has more than one node."""
    if is_remote(output.uri) or output.shared_filesystem:
        return
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return
    raise SpecError(
        f"output.uri {output.uri} is a local path, and the Ray cluster has {len(nodes)} nodes: each "
        "worker would commit its shards to its own node's disk, where the driver and the other "
        "nodes never look. Use an object store (output.uri: s3://bucket/prefix), or, if that path "
        "is a filesystem every node mounts at the same place (NFS, Lustre, EFS), say so with "
        "output.shared_filesystem: true"
    )

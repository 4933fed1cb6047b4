"""torch.compile's artifacts, saved once and loaded by every later worker that would compile the same graphs.

A worker with `engine.compile` on pays the compile warm-up before its first shard: minutes of
Inductor and autotuning on a GPU, and again on every node an autoscaler adds. The first worker
saves what it compiled (`torch.compiler.save_cache_artifacts`: Inductor's graphs, AOTAutograd's,
autotuning results) under a key of everything that changes those graphs; a worker that finds
its key loads them (`load_cache_artifacts`) and its warm-up compiles nothing.

The key only chooses which artifact to fetch. torch checks each graph against its own cache key
when it is looked up, so an artifact that matched by mistake costs a compile, never a wrong graph.

Where (`engine.compile_cache`): `node` (default) is a folder of the node-local cache, shared by
the node's workers and later jobs; a folder or an `s3://` prefix is shared by every node that can
read it. Artifacts are created put-if-absent: of several workers finishing at once, one writes.
An artifact holds compiled code (shared objects and pickled graphs that torch loads): a shared
location must be writable only by your jobs' own role, like the container image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from sdfleet.actors.storage import Storage

log = logging.getLogger("sdfleet")

NODE = "node"
OFF = "off"


def node_cache_folder() -> Path:
    """Where `node` keeps artifacts: under the node-local cache that model copies use too."""
    return Path(os.environ.get("SDFLEET_CACHE", Path.home() / ".cache" / "sdfleet")) / "compile"


def cache_key(material: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[
        :32
    ]


class CompileCache:
    """One location of compile artifacts; `load` before compiling, `save` after the warm-up."""

    def __init__(self, location: str):
        self.location = location
        self.storage = Storage(str(node_cache_folder()) if location == NODE else location)

    @staticmethod
    def artifact(key: str) -> str:
        return f"torch-compile-{key}.bin"

    def load(self, key: str) -> bool:
        """Load the artifacts saved under `key` into torch's caches; False when there are none."""
        import torch

        try:
            data = self.storage.read_bytes(self.artifact(key))
        except FileNotFoundError:
            return False
        except Exception as e:  # noqa: BLE001 -- an unreadable cache costs a compile, not the job
            log.warning(
                "compile cache: cannot read %s (%s); compiling",
                self.storage.url(self.artifact(key)),
                e,
            )
            return False
        # A truncated or foreign artifact: torch warns and loads nothing (None), or raises; compile instead.
        try:
            loaded = torch.compiler.load_cache_artifacts(data)
        except Exception as e:  # noqa: BLE001
            loaded, why = None, f"{type(e).__name__}: {e}"
        else:
            why = "torch loaded nothing from it"
        if loaded is None:
            log.warning(
                "compile cache: %s does not load (%s); compiling",
                self.storage.url(self.artifact(key)),
                why,
            )
            return False
        log.info(
            "compile cache: loaded %s (%.1f MB) from %s",
            self.artifact(key),
            len(data) / 1e6,
            self.storage.url(),
        )
        return True

    def save(self, key: str) -> bool:
        """Save what this process compiled under `key`, unless a worker did first. Returns whether
        this call wrote it. A failure to write is logged: the job goes on, later workers compile."""
        import torch

        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return False
        data, _ = saved
        try:
            self.storage.write_bytes(self.artifact(key), data, exclusive=True)
        except FileExistsError:
            return False
        except Exception as e:  # noqa: BLE001 -- the cache only saves time; the shards do not need it
            log.warning(
                "compile cache: could not save to %s: %s", self.storage.url(self.artifact(key)), e
            )
            return False
        log.info(
            "compile cache: saved %s (%.1f MB) to %s",
            self.artifact(key),
            len(data) / 1e6,
            self.storage.url(),
        )
        return True

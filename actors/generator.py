"""The worker: reads a shard's prompt rows, generates its images, writes and commits the shard.

`ShardGenerator` is a plain class; the dispatcher wraps it with `ray.remote` (one actor per GPU),
and tests or benchmarks can call it directly without Ray.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import socket
import time
from typing import Any

import pyarrow.parquet as pq

from actors.engine import GENERATOR_DEVICE, Engine
from actors.storage import Storage
from actors.writer import ShardWriter, encode_image
from schemas.rows import STATUS_FAILED, STATUS_OK
from schemas.samples import Sample, resolve_params, sample_id, sample_key

log = logging.getLogger("sdfleet")


def read_shard_samples(plan, shard_id: int) -> list[Sample]:
    """Read the prompt rows one shard needs (only the row groups it touches) and expand them."""
    spec, inp = plan.spec, plan.spec.input
    start, end = plan.shard_range(shard_id)
    n_points = len(plan.points)
    first_row, last_row = start // n_points, (end - 1) // n_points  # global rows, inclusive

    # 1. Read the rows, file by file; a shard may span the end of one file and the start of the next.
    columns = [inp.prompt_column] + [c for c in (inp.id_column, inp.negative_prompt_column) if c]
    columns += [c for c in inp.passthrough_columns if c not in columns]
    rows: dict[int, tuple[str, int, dict[str, Any]]] = {}  # global row -> (file stem, file offset, values)
    for f, offset in zip(plan.files, plan.row_offsets):
        lo, hi = max(first_row, offset), min(last_row, offset + f.rows - 1)
        if lo > hi:
            continue
        groups, group_start, skip = [], 0, None
        for g, n in enumerate(f.row_groups):
            if group_start + n > lo - offset and group_start <= hi - offset:
                if skip is None:
                    skip = lo - offset - group_start
                groups.append(g)
            group_start += n
        storage = Storage(f.uri, inp.storage_options)
        with storage.fs.open(storage.root, "rb") as fh:
            table = pq.ParquetFile(fh).read_row_groups(groups, columns=columns)
        table = table.slice(skip, hi - lo + 1).to_pydict()
        for i in range(hi - lo + 1):
            rows[lo + i] = (f.stem, offset, {c: table[c][i] for c in columns})

    # 2. Expand each (row, sweep point) into a sample with its key, seed and parameters.
    samples = []
    for s in range(start, end):
        stem, offset, values = rows[s // n_points]
        point = plan.points[s % n_points]
        key = sample_key(shard_id, s - start, plan.key_width)
        raw_id = values[inp.id_column] if inp.id_column else None
        prompt_id = f"{stem}:{s // n_points - offset}" if raw_id is None else str(raw_id)
        passthrough = {c: values[c] for c in inp.passthrough_columns}
        prompt = values[inp.prompt_column]
        if prompt is None or not str(prompt).strip():
            what = "null" if prompt is None else "empty or whitespace-only"
            samples.append(Sample(key, shard_id, prompt_id, None, f"prompt is {what}", passthrough))
            continue
        negative = values[inp.negative_prompt_column] if inp.negative_prompt_column else None
        params = resolve_params(spec, prompt, negative, prompt_id, point)
        samples.append(Sample(key, shard_id, prompt_id, params, None, passthrough))
    return samples


class ShardGenerator:
    """One per GPU. Loads the pipeline once; `run(shard_id)` generates, writes and commits one shard."""

    def __init__(self, plan, cpu_threads: int | None = None):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        self.plan = plan
        self.spec = plan.spec
        self.worker = _worker_identity()
        self.engine = Engine(self.spec.model, cpu_threads=cpu_threads)
        self.storage = Storage(self.spec.output.uri, self.spec.output.storage_options)
        self.writer = ShardWriter(self.storage, self.spec.output.image_format)
        self.schema = plan.output_schema()

    def identity(self) -> dict[str, Any]:
        return {**self.worker, "device": self.engine.device}

    def run(self, shard_id: int, attempt: int = 1) -> dict[str, Any]:
        t0 = time.perf_counter()
        started_at = _now()
        spec, engine = self.spec, self.engine
        name = self.plan.shard_name(shard_id)

        # 1. Read this shard's rows and expand them into samples.
        samples = read_shard_samples(self.plan, shard_id)

        # 2. Generate the samples that can be generated, in batches, and encode each image.
        todo = [s for s in samples if s.params is not None]
        images: dict[str, bytes] = {}
        seconds: dict[str, float] = {}
        image_sha: dict[str, str] = {}
        gen_total = 0.0
        for batch, arrays, secs in engine.generate([s.params for s in todo], spec.resources.batch_size):
            gen_total += secs
            for i, array in zip(batch, arrays):
                key = todo[i].key
                images[key] = encode_image(array, spec.output.image_format, spec.output.quality)
                seconds[key] = secs / len(batch)
                image_sha[key] = _sha256(images[key])

        # 3. One row per planned sample: ok, or failed with the reason.
        created_at = dt.datetime.now(dt.timezone.utc)
        rows = [self._row(s, image_sha.get(s.key), seconds.get(s.key), created_at) for s in samples]
        counts = {"ok": 0, "filtered": 0, "failed": 0}
        for r in rows:
            counts[r["status"]] += 1

        # 4. Write the tar and the Parquet, then commit with the stats file.
        wall = time.perf_counter() - t0
        gpus = len(self.worker["gpu_ids"])
        stats = {
            "shard": name,
            "shard_id": shard_id,
            "fingerprint": self.plan.fingerprint,
            "samples": len(samples),
            **counts,
            "images_in_tar": len(images),
            "attempt": attempt,
            "gen_seconds": round(gen_total, 4),
            "wall_seconds": round(wall, 4),
            "gpu_seconds": round(wall * gpus, 4),
            "worker_node": self.worker["node"],
            "worker_id": self.worker["actor"],
            "gpu_id": self.worker["gpu_id"],
            "device": engine.device,
            "started_at": started_at,
            "finished_at": _now(),
        }
        self.writer.write(name, rows, images, self.schema, stats)
        return stats

    def _row(self, s: Sample, image_sha: str | None, gen_seconds: float | None, created_at) -> dict[str, Any]:
        spec, p = self.spec, s.params
        row: dict[str, Any] = {
            "key": s.key,
            "shard_id": s.shard_id,
            "prompt_id": s.prompt_id,
            "status": STATUS_OK if image_sha else STATUS_FAILED,
            "error": s.error,
            "generator_device": GENERATOR_DEVICE,
            "model_source": spec.model.source,
            "model_revision": spec.model.revision,
            "dtype": self.engine.dtype,
            "image_format": spec.output.image_format,
            "image_sha256": image_sha,
            # No detector ran: every safety column is null rather than a misleading 0.
            "nsfw_score": None,
            "nsfw_scores": None,
            "safety_detector": None,
            "safety_threshold": None,
            "safety_action": None,
            "device": self.engine.device,
            "worker_node": self.worker["node"],
            "worker_id": self.worker["actor"],
            "gpu_id": self.worker["gpu_id"],
            "gen_seconds": gen_seconds,
            "created_at": created_at,
            **s.passthrough,
        }
        if p is not None:
            scheduler = self.engine.scheduler_name(p)
            row.update(
                sample_id=sample_id(spec.model.source, spec.model.revision, p, scheduler),
                prompt=p.prompt,
                negative_prompt=p.negative_prompt,
                seed=p.seed,
                scheduler=scheduler,
                num_inference_steps=p.num_inference_steps,
                guidance_scale=p.guidance_scale,
                width=p.width,
                height=p.height,
            )
        return row


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _worker_identity() -> dict[str, Any]:
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
    return {"node": socket.gethostname(), "actor": f"pid:{os.getpid()}", "gpu_ids": [], "gpu_id": None}

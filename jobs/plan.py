"""Planning: list the input, read Parquet footers only, expand the sweep, cut samples into shards.

The plan's data types live in `sdfleet.schemas.plan`, so that workers type against them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sdfleet.actors.storage import Storage, is_remote
from sdfleet.schemas.errors import InputError, SpecError, StorageError
from sdfleet.schemas.plan import InputFile, Plan
from sdfleet.schemas.rows import TEXT_TYPES, output_schema
from sdfleet.schemas.samples import sweep_points
from sdfleet.schemas.spec import JobSpec

_GLOB_CHARS = set("*?[")


def estimate(plan: Plan) -> dict[str, Any]:
    """FLOPs, GPU-hours and cost from the architecture's FLOPs and a sustained throughput."""
    tflop = 0.0
    gen = plan.spec.generation
    for point in plan.points:
        steps = point.get("num_inference_steps", gen.num_inference_steps)
        pixels = point.get("width", gen.width) * point.get("height", gen.height) / 512**2
        cfg = 1.0 if point.get("guidance_scale", gen.guidance_scale) > 1 else 0.5
        tflop += _UNET_TFLOP_CFG * cfg * steps * pixels + _VAE_TFLOP * pixels + _TEXT_TFLOP
    tflop *= plan.num_rows
    res = plan.spec.resources
    sustained, source = sustained_tflops(res.gpu_type, res.throughput_tflops)
    gpu_hours = tflop / sustained / 3600
    cost = gpu_hours * res.gpu_hour_usd if res.gpu_hour_usd is not None else None
    return {"tflop": tflop, "gpu_hours": gpu_hours, "cost_usd": cost, "sustained_tflops": sustained,
            "throughput_source": source, "images_per_gpu_hour": plan.num_samples / gpu_hours if gpu_hours else None}


# SD2-base at 512² (counted on meta tensors; see FACTS.md). Cost scales with latent pixels.
_UNET_TFLOP_CFG = 1.609  # one UNet forward with CFG (batch 2)
_VAE_TFLOP = 2.51  # one VAE decode
_TEXT_TFLOP = 0.09
_THROUGHPUT_TABLE = Path(__file__).with_name("gpu_throughput.yaml")


def sustained_tflops(gpu_type: str, override: float | None) -> tuple[float, str]:
    if override is not None:
        return override, "resources.throughput_tflops"
    import yaml

    table = yaml.safe_load(_THROUGHPUT_TABLE.read_text())
    if gpu_type not in table:
        raise SpecError(f"resources.gpu_type={gpu_type!r} is not in {_THROUGHPUT_TABLE.name} "
                        f"({', '.join(table)}); add it there or set resources.throughput_tflops")
    return float(table[gpu_type]["sustained_tflops"]), f"{_THROUGHPUT_TABLE.name}: {gpu_type}"


class Planner:
    """Turns a spec into a Plan. Reads only Parquet footers, never row data."""

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.storage_options = spec.input.storage_options

    def plan(self) -> Plan:
        # 1. List the input files, in a stable order.
        uris = list_parquet(self.spec.input.uri, self.storage_options)
        # 2. Read each footer: row counts per row group, and the columns the spec names.
        files, passthrough = [], None
        for uri in uris:
            f, schema = self._read_footer(uri)
            files.append(f)
            passthrough = self._check_columns(uri, schema, passthrough)
        # 3. Expand the sweep, and find repeated prompt ids (they would repeat keys' seeds and ids).
        plan = Plan(spec=self.spec, files=files, points=sweep_points(self.spec), passthrough_schema=passthrough)
        if self.spec.input.id_column:
            plan.duplicate_rows = self._duplicate_ids(plan)
        return plan

    def _duplicate_ids(self, plan: Plan) -> dict[int, int]:
        """Read the id column alone and map every repeated id's later rows to its first row.

        A stable sort puts equal ids next to each other in row order: ~1 s and ~0.6 GB for 10M ids,
        where a hash group-by took 12 s and 2 GB.
        """
        import numpy as np
        import pyarrow.compute as pc

        column = self.spec.input.id_column
        chunks = []
        for f in plan.files:
            storage = Storage(f.uri, self.storage_options)
            with storage.errors("", "read"), storage.fs.open(storage.root, "rb") as fh:
                chunks += pq.read_table(fh, columns=[column]).column(column).cast(pa.string()).chunks
        ids = pa.concat_arrays(chunks) if chunks else pa.array([], pa.string())
        del chunks
        if len(ids) < 2:
            return {}
        order = pc.sort_indices(ids)
        ordered = ids.take(order)
        same = pc.equal(ordered.slice(1), ordered.slice(0, len(ordered) - 1)).fill_null(False)
        same = same.to_numpy(zero_copy_only=False)
        if not same.any():
            return {}
        order = order.to_numpy()
        starts = np.concatenate([[True], ~same])
        run_start = np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))
        later = np.nonzero(same)[0] + 1
        return {int(order[p]): int(order[run_start[p]]) for p in later}

    def _read_footer(self, uri: str) -> tuple[InputFile, pa.Schema]:
        storage = Storage(uri, self.storage_options)
        try:
            with storage.errors("", "read"):
                size = storage.fs.size(storage.root)
                with storage.fs.open(storage.root, "rb") as fh:
                    meta = pq.ParquetFile(fh).metadata
                    schema = meta.schema.to_arrow_schema()
        except StorageError as e:
            if not isinstance(e, (FileNotFoundError, PermissionError)):
                raise  # credentials or endpoint: the message already says what to set
            raise InputError(f"input file {uri} {'does not exist' if isinstance(e, FileNotFoundError) else 'cannot be read'}"
                             f": {e}") from None
        except FileNotFoundError:
            raise InputError(f"input file {uri} does not exist") from None
        except PermissionError as e:
            raise InputError(f"input file {uri} cannot be read (permission denied): {e}") from None
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"input file {uri} is not a readable Parquet file: {e}") from None
        if meta.num_rows == 0:
            raise InputError(f"input file {uri} has no rows; remove it from the input or fill it")
        groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        return InputFile(uri=uri, size=size, rows=meta.num_rows, row_groups=groups), schema

    def _check_columns(self, uri: str, schema: pa.Schema, passthrough: pa.Schema | None) -> pa.Schema:
        inp = self.spec.input
        names = set(schema.names)

        def need(column: str, what: str, string: bool) -> None:
            if column not in names:
                raise InputError(
                    f"input file {uri} has no {what} column {column!r} (columns: {', '.join(schema.names)}); "
                    f"set input.{what.replace(' ', '_')}_column to one of them"
                )
            if string and schema.field(column).type not in TEXT_TYPES:
                raise InputError(
                    f"input file {uri}: {what} column {column!r} has type {schema.field(column).type}, "
                    "expected string (or UTF-8 binary)"
                )

        need(inp.prompt_column, "prompt", string=True)
        if inp.id_column is not None:
            need(inp.id_column, "id", string=False)
        if inp.negative_prompt_column is not None:
            need(inp.negative_prompt_column, "negative prompt", string=True)
        for column in inp.passthrough_columns:
            if column not in names:
                raise InputError(f"input file {uri} has no passthrough column {column!r}")
        this = pa.schema([schema.field(c) for c in inp.passthrough_columns])
        if passthrough is not None and not this.equals(passthrough):
            raise InputError(f"input file {uri}: passthrough column types {this} differ from earlier files' {passthrough}")
        try:
            output_schema(this)
        except ValueError as e:
            raise InputError(str(e)) from None
        return this


def list_parquet(uri: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """A Parquet file, a folder or prefix (every *.parquet below it), or a glob; sorted."""
    storage = Storage(uri, storage_options)
    fs, root = storage.fs, storage.root
    protocol = uri.split("://", 1)[0] + "://" if is_remote(uri) else ""
    with storage.errors("", "list"):
        if _GLOB_CHARS & set(uri):
            found = sorted(fs.glob(root))
        elif fs.isdir(root):
            found = sorted(p for p in fs.find(root) if p.endswith(".parquet"))
        elif fs.exists(root):
            found = [root]
        else:
            bucket = root.split("/", 1)[0]
            if is_remote(uri) and not fs.exists(bucket):
                raise InputError(f"input.uri {uri} does not exist: there is no bucket {bucket!r} at this endpoint; "
                                 "check the bucket name, AWS_ENDPOINT_URL or input.storage_options")
            raise InputError(f"input.uri {uri} does not exist; give a Parquet file, a folder or prefix, or a glob")
    if not found:
        raise InputError(f"input.uri {uri} matches no Parquet files")
    return [protocol + p if protocol and not p.startswith(protocol) else p for p in found]

"""Planning: list the input, read Parquet footers only, expand the sweep, cut samples into shards.

The plan's data types live in `sdfleet.schemas.plan`, so that workers type against them.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from sdfleet.actors.storage import Storage
from sdfleet.jobs.content import input_file_identity
from sdfleet.schemas import layout
from sdfleet.schemas.errors import InputError, SpecError, StorageError
from sdfleet.schemas.families import DEFAULT_FAMILY, Family, Handover
from sdfleet.schemas.json_values import outside_python, passthrough_refusal
from sdfleet.schemas.locations import is_glob, is_remote
from sdfleet.schemas.passthrough import PassthroughClash, clash_message, renames
from sdfleet.schemas.plan import InputFile, Plan
from sdfleet.schemas.refiner import RefinerSpec
from sdfleet.schemas.rows import SOURCE_COLUMNS, TEXT_TYPES, output_schema
from sdfleet.schemas.samples import sweep_points
from sdfleet.schemas.spec import JobSpec
from sdfleet.schemas.tasks import MASKS_NOT_FROM_AN_OUTPUT, TASKS

if TYPE_CHECKING:  # numpy loads where ids are hashed, not on the CLI's import path
    import numpy as np

    from sdfleet.jobs.image_flops import MeasuredInputs

# Ids hashed at a time: the byte-wise temporaries stay a few MB whatever the input's size.
ID_BATCH_ROWS = 65536


def id_hashes(ids: pa.Array, first_row: int) -> np.ndarray:
    """A 64-bit hash of each string, vectorized: each byte times a fixed 64-bit weight for its
    position, summed per string (mod 2^64), with the length, then mixed. A null id gets a value
    from its row instead, so nulls never repeat each other. Collisions are possible, if rare:
    callers compare the strings of equal hashes."""
    import numpy as np

    arr = ids.cast(pa.large_string())
    n = len(arr)
    if n == 0:
        return np.empty(0, dtype=np.uint64)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
    base, lengths = int(offsets[0]), np.diff(offsets)
    data = arr.buffers()[2]
    raw = (
        np.frombuffer(data, dtype=np.uint8)[base : int(offsets[-1])]
        if data is not None
        else np.empty(0, np.uint8)
    )
    position = np.arange(len(raw), dtype=np.int64) - np.repeat(offsets[:-1] - base, lengths)
    # The weight of position p is mix(p), made odd: a fixed function, the same in every process.
    weights = _mix64(
        np.arange(int(lengths.max()), dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    ) | np.uint64(1)
    weighted = raw.astype(np.uint64) * weights[position]
    h = np.zeros(n, dtype=np.uint64)
    filled = lengths > 0
    if filled.any():
        h[filled] = np.add.reduceat(weighted, (offsets[:-1] - base)[filled])
    h += lengths.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
    if arr.null_count:
        nulls = np.asarray(arr.is_null())
        h[nulls] = np.arange(first_row, first_row + n, dtype=np.uint64)[nulls] ^ np.uint64(
            0xD1B54A32D192ED03
        )
    return _mix64(h)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every input bit moves every output bit (uint64 arithmetic wraps)."""
    import numpy as np

    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def estimate(
    plan: Plan, family: Family = DEFAULT_FAMILY, measured: MeasuredInputs | None = None
) -> dict[str, Any]:
    """FLOPs, GPU-hours and cost from the family's FLOPs (the checkpoint's family; SD2 where
    unknown) and a sustained throughput: for every planned sample, and with best-of-N
    (curation.images_per_prompt) the `_min` of each too, the cost if each prompt's first k
    candidates pass; the truth lies between. measured: an image task's first shard counted at
    its inputs' sizes (`sdfleet.jobs.image_flops`), whose mean stands for every sample."""
    if measured is not None:
        per_image = measured.tflop_per_image
        tflop = sum(per_image) / len(per_image) * plan.num_samples
    else:
        per_image = _per_point(plan, family)
        tflop = 0.0  # added in order, not with sum(): Python 3.12's sum() rounds differently
        for figure in per_image:
            tflop += figure
        tflop *= plan.num_rows
    return _totals(plan, family, per_image, tflop)


def _per_point(plan: Plan, family: Family) -> list[float]:
    """One image's FLOPs at each sweep point."""
    from sdfleet.jobs.image_flops import sequence_inputs

    gen = plan.spec.generation
    # Sizes the driver has not resolved (the image tasks' without a measure of their inputs)
    # count at the family's fallback size.
    return [
        _tflop_per_image(
            family,
            plan.spec.model.refiner,
            point.get("width", gen.width) or family.fallback_size,
            point.get("height", gen.height) or family.fallback_size,
            point.get("num_inference_steps", gen.num_inference_steps),
            point.get("guidance_scale", gen.guidance_scale),
            sequence_inputs(plan.spec, point),
        )
        for point in plan.points
    ]


def _totals(plan: Plan, family: Family, per_image: list[float], tflop: float) -> dict[str, Any]:
    """GPU-hours and cost of `tflop` for the whole plan, and the per-image range."""
    res = plan.spec.resources
    from sdfleet.jobs.throughput import sustained_tflops

    sustained, source = sustained_tflops(res.gpu_type, res.throughput_tflops, plan.spec.model.dtype)
    gpu_hours = tflop / sustained / 3600
    cost = gpu_hours * res.gpu_hour_usd if res.gpu_hour_usd is not None else None
    cur = plan.spec.curation
    fewest = (
        cur.images_per_prompt / cur.candidates if cur.best_of_n else 1.0
    )  # k of m candidates generated
    return {
        "tflop": tflop,
        "gpu_hours": gpu_hours,
        "cost_usd": cost,
        "sustained_tflops": sustained,
        "tflop_min": tflop * fewest,
        "gpu_hours_min": gpu_hours * fewest,
        "cost_usd_min": None if cost is None else cost * fewest,
        "throughput_source": source,
        "images_per_gpu_hour": plan.num_samples / gpu_hours if gpu_hours else None,
        "family": family.name,
        # One image's FLOPs, over the sweep's points (equal where nothing swept changes them).
        "tflop_per_image_min": min(per_image),
        "tflop_per_image_max": max(per_image),
    }


def _tflop_per_image(
    family: Family,
    refiner: RefinerSpec | None,
    width: int,
    height: int,
    steps: int,
    guidance_scale: float,
    sequence: dict,
) -> float:
    """One image's FLOPs: the family's (sequence: its T5 length and true-CFG scale), or with
    model.refiner its base + refiner figure."""
    if refiner is None:
        return family.tflop_per_image(width, height, steps, guidance_scale, **sequence)
    handover = Handover(
        refiner.denoising_start, refiner.steps(steps), refiner.guidance(guidance_scale)
    )
    return family.tflop_per_refined_image(width, height, steps, guidance_scale, handover)


class Planner:
    """Turns a spec into a Plan. Reads only Parquet footers, never row data."""

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.storage_options = spec.input.storage_options

    def plan(self) -> Plan:
        # 1. List the input files, in a stable order: Parquet files, or an earlier sdfleet
        #    output's committed shards (its ok rows, whose images are the inputs).
        #    What the task takes is checked first: an output that is not complete yet need not be
        #    waited for if the task could not read it anyway.
        is_output = self._input_is_an_output()
        self._check_image_inputs(is_output)
        source = self._source_output() if is_output else None
        uris = (
            list_parquet(self.spec.input.uri, self.storage_options)
            if source is None
            else list(source)
        )
        # 2. Read each footer: row counts per row group, and the columns the spec names.
        files, passthrough = [], None
        for uri in uris:
            f, schema = self._read_footer(uri)
            if source is not None:  # only the shard's ok rows are planned
                f = dataclasses.replace(f, rows=source[uri], row_groups=[source[uri]])
            files.append(f)
            passthrough = self._check_columns(uri, schema, passthrough, source is not None)
        # 3. Expand the sweep, and find repeated prompt ids (they would repeat keys' seeds and ids);
        #    a source output's rows are keyed by their unique source keys.
        plan = Plan(
            spec=self.spec,
            files=files,
            points=sweep_points(self.spec),
            passthrough_schema=passthrough,
            source_output=Storage(self.spec.input.uri, self.storage_options).uri
            if source
            else None,
        )
        if self.spec.input.id_column and source is None:
            plan = dataclasses.replace(plan, duplicate_rows=self._duplicate_ids(plan))
        return plan

    def _input_is_an_output(self) -> bool:
        """Whether input.uri is an earlier sdfleet output (a folder or prefix with _job.json)."""
        uri = self.spec.input.uri
        if is_glob(uri) or uri.endswith(".parquet"):
            return False
        storage = Storage(uri, self.storage_options)
        with storage.errors(layout.JOB_FILE, "check"):
            return storage.exists(layout.JOB_FILE)

    def _source_output(self) -> dict[str, int]:
        """input.uri, an earlier sdfleet output: its committed shards' Parquet URIs -> their ok
        rows, for shards with any. The output must be complete, so that every run of this job sees
        the same inputs."""
        from sdfleet.jobs.output import OutputReader

        uri = self.spec.input.uri
        storage = Storage(uri, self.storage_options)
        survey = OutputReader(storage).survey()
        if not (survey.complete and storage.exists(layout.SUCCESS_FILE)):
            raise InputError(
                f"input.uri {uri} is an sdfleet output that is not complete ({len(survey.committed)} of "
                f"{survey.num_shards} shards committed, {len(survey.quarantined)} quarantined): let its "
                "job finish (rerun it), then run this one"
            )
        shards = {
            storage.url(layout.parquet_file(name)): stats.ok
            for name, stats in sorted(survey.committed.items())
            if stats.ok
        }
        if not shards:
            raise InputError(
                f"input.uri {uri} is an sdfleet output with no ok image to use as input"
            )
        return shards

    def _check_image_inputs(self, is_output: bool) -> None:
        inp, name = self.spec.input, self.spec.model.task
        task = TASKS[name]
        if is_output:
            if not task.image:
                raise SpecError(
                    f"input.uri {inp.uri} is an sdfleet output, whose images are inputs; model.task="
                    f"{name} takes none: set model.task (e.g. upscale or image-to-image)"
                )
            if task.mask:
                raise SpecError(
                    f"input.uri {inp.uri}: model.task={name}: {MASKS_NOT_FROM_AN_OUTPUT}"
                )
            if inp.image_column:
                raise SpecError(
                    f"input.uri {inp.uri} is an sdfleet output: its images are the inputs, so "
                    "input.image_column must not be set"
                )
        elif task.image and not inp.image_column:
            raise SpecError(
                f"model.task={name} needs input.image_column: the column of input images (encoded "
                "bytes, or URIs inside the input's folder); or an sdfleet output as input.uri"
            )

    def _duplicate_ids(self, plan: Plan) -> dict[int, int]:
        """Read the id column alone and map every repeated id's later rows to its first row.

        Memory is 8 bytes per row, whatever the ids: pass 1 keeps a 64-bit hash of each id and
        sorts them (equal ids have equal hashes); pass 2 rereads the ids whose hash repeats and
        compares them as strings, so a hash collision is never taken for a repeat. 100M ids plan
        under 2 GB (bench/plan.py), where sorting the ids themselves took 4.5 GB.
        """
        import numpy as np

        # 1. Pass 1: every id's hash, in row order; then sorted, to find the hashes that repeat.
        hashes = np.empty(plan.num_rows, dtype=np.uint64)
        for row, ids in self._id_batches(plan):
            hashes[row : row + len(ids)] = id_hashes(ids, row)
        hashes.sort()
        repeated = np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
        del hashes
        if not len(repeated):
            return {}
        # 2. Pass 2: the rows whose hash repeats, by id; every row after an id's first maps to it.
        first: dict[str, int] = {}
        later: dict[int, int] = {}
        for row, ids in self._id_batches(plan):
            hits = np.nonzero(np.isin(id_hashes(ids, row), repeated))[0]
            for i, value in zip(hits.tolist(), ids.take(pa.array(hits)).to_pylist()):
                if value is None:
                    continue
                seen = first.setdefault(value, row + i)
                if seen != row + i:
                    later[row + i] = seen
        return later

    def _id_batches(self, plan: Plan):
        """(global row of the batch's first row, ids as strings) for the whole input, in row order."""
        column = self.spec.input.id_column
        for f, offset in zip(plan.files, plan.row_offsets):
            storage = Storage(f.uri, self.storage_options)
            row = offset
            with storage.errors("", "read"), storage.fs.open(storage.root, "rb") as fh:
                for batch in pq.ParquetFile(fh).iter_batches(
                    batch_size=ID_BATCH_ROWS, columns=[column]
                ):
                    ids = batch.column(0).cast(pa.string())
                    yield row, ids
                    row += len(ids)

    def _read_footer(self, uri: str) -> tuple[InputFile, pa.Schema]:
        storage = Storage(uri, self.storage_options)
        try:
            with storage.errors("", "read"):
                size = storage.fs.size(storage.root)
                with storage.fs.open(storage.root, "rb") as fh:
                    meta = pq.ParquetFile(fh).metadata
                    schema = meta.schema.to_arrow_schema()
                    content = input_file_identity(storage, fh, size)
        except StorageError as e:
            if not isinstance(e, (FileNotFoundError, PermissionError)):
                raise  # credentials or endpoint: the message already says what to set
            raise InputError(
                f"input file {uri} {'does not exist' if isinstance(e, FileNotFoundError) else 'cannot be read'}"
                f": {e}"
            ) from None
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"input file {uri} is not a readable Parquet file: {e}") from None
        if meta.num_rows == 0:
            raise InputError(f"input file {uri} has no rows; remove it from the input or fill it")
        self._check_dates_in_range(uri, meta)
        groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        return InputFile(uri, size, meta.num_rows, groups, content), schema

    def _check_dates_in_range(self, uri: str, meta: pq.FileMetaData) -> None:
        """A passthrough date or timestamp (at any depth) that Python cannot hold would fail its
        shard on reading: refused here, from the footer's statistics."""
        for j in range(meta.num_columns):
            column = meta.schema.column(j)
            root = column.path.split(".", 1)[0]
            if root not in renames(self.spec.input.passthrough_columns):
                continue
            logical = json.loads(column.logical_type.to_json())
            for g in range(meta.num_row_groups):
                stats = meta.row_group(g).column(j).statistics
                if stats is None or not stats.has_min_max:
                    continue
                if outside_python(logical, stats.min_raw, stats.max_raw):
                    raise InputError(
                        f"input file {uri}: passthrough column {root!r} holds a {logical['Type'].lower()} "
                        "outside the years 1 to 9999, which sdfleet cannot read into a row; fix or "
                        "null those values, or drop it from input.passthrough_columns"
                    )

    def _check_columns(
        self, uri: str, schema: pa.Schema, passthrough: pa.Schema | None, source: bool = False
    ) -> pa.Schema:
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
                    + (
                        "expected encoded image bytes (binary) or URIs (string)"
                        if what in ("image", "mask")
                        else "expected string (or UTF-8 binary)"
                    )
                )

        need(inp.prompt_column, "prompt", string=True)
        if source:
            for column in SOURCE_COLUMNS:
                if column not in names:
                    raise InputError(
                        f"input file {uri} has no {column!r} column: not an sdfleet shard's Parquet"
                    )
        elif inp.id_column is not None:
            need(inp.id_column, "id", string=False)
        if inp.negative_prompt_column is not None:
            need(inp.negative_prompt_column, "negative prompt", string=True)
        # Encoded bytes or URIs: the text types' Arrow types.
        if inp.image_column is not None:
            need(inp.image_column, "image", string=True)
        if inp.mask_column is not None:
            need(inp.mask_column, "mask", string=True)
        columns = renames(inp.passthrough_columns)
        for column in columns:
            if column not in names:
                raise InputError(f"input file {uri} has no passthrough column {column!r}")
        refused = next(filter(None, (passthrough_refusal(schema.field(c)) for c in columns)), None)
        if refused:
            raise InputError(f"input file {uri}: {refused}")
        # Under their output names: what the rows hold.
        this = pa.schema([schema.field(s).with_name(t) for s, t in columns.items()])
        if passthrough is not None and not this.equals(passthrough):
            raise InputError(
                f"input file {uri}: passthrough column types {this} differ from earlier files' {passthrough}"
            )
        try:
            output_schema(this)
        except PassthroughClash as e:
            raise InputError(clash_message(inp.passthrough_columns, e)) from None
        return this


def list_parquet(uri: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """A Parquet file, a folder or prefix (every *.parquet below it), or a glob; sorted."""
    storage = Storage(uri, storage_options)
    fs, root = storage.fs, storage.root
    protocol = uri.split("://", 1)[0] + "://" if is_remote(uri) else ""
    with storage.errors("", "list"):
        if is_glob(uri):
            found = sorted(fs.glob(root))
        elif fs.isdir(root):
            found = sorted(p for p in fs.find(root) if p.endswith(".parquet"))
        elif fs.exists(root):
            found = [root]
        else:
            bucket = root.split("/", 1)[0]
            if is_remote(uri) and not fs.exists(bucket):
                raise InputError(
                    f"input.uri {uri} does not exist: there is no bucket {bucket!r} at this endpoint; "
                    "check the bucket name, AWS_ENDPOINT_URL or input.storage_options"
                )
            raise InputError(
                f"input.uri {uri} does not exist; give a Parquet file, a folder or prefix, or a glob"
            )
    if not found:
        raise InputError(f"input.uri {uri} matches no Parquet files")
    return [protocol + p if protocol and not p.startswith(protocol) else p for p in found]

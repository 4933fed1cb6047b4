"""The shard reader: the prompt rows one shard needs, expanded into its samples.

Only the row groups the shard touches are read; a row that cannot be generated (a null or non-UTF-8
prompt, a duplicate id, an input image that does not decode) becomes a sample with its error, so it
fails alone and the rest of the shard goes on.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sdfleet.actors.inputs import InputImageReader, read_row_inputs, read_source_inputs
from sdfleet.actors.storage import Storage
from sdfleet.schemas.passthrough import renames
from sdfleet.schemas.plan import Plan
from sdfleet.schemas.rows import SOURCE_COLUMNS, STATUS_OK
from sdfleet.schemas.samples import Sample, resolve_params, sample_key


class PromptRow(NamedTuple):
    """One input row: the file it is in (its stem), the file's first global row, its values."""

    stem: str
    offset: int
    values: dict[str, Any]
    passthrough: dict[str, Any]  # the passthrough columns' values, by input column


def read_shard_samples(plan: Plan, shard_id: int) -> list[Sample]:
    """Read the prompt rows one shard needs (only the row groups it touches) and expand them."""
    start, end = plan.shard_range(shard_id)
    n_points = len(plan.points)
    # 1. The rows, file by file: global rows, inclusive; a shard may span two files.
    rows = _read_rows(plan, start // n_points, (end - 1) // n_points)
    # 2. The image tasks' inputs, one read and decode per row (its sweep points share them).
    inputs = _read_inputs(plan, rows)
    # 3. One sample per (row, sweep point).
    return [_sample(plan, shard_id, s, rows, inputs) for s in range(start, end)]


def _columns(plan: Plan) -> list[str]:
    inp = plan.spec.input
    if plan.source_output is None:
        extra = (inp.id_column, inp.negative_prompt_column, inp.image_column, inp.mask_column)
    else:  # an earlier output's rows: keyed by their keys, their images in the shards' tars
        extra = (inp.negative_prompt_column, *SOURCE_COLUMNS)
    columns = [inp.prompt_column] + [c for c in extra if c]
    return columns + [c for c in renames(inp.passthrough_columns) if c not in columns]


def _read_rows(plan: Plan, first_row: int, last_row: int) -> dict[int, PromptRow]:
    """Global rows first_row..last_row (inclusive), from the files that hold them."""
    inp, columns = plan.spec.input, _columns(plan)
    # Text columns are read as bytes and decoded per row, so one non-UTF-8 row fails alone.
    text = {c for c in (inp.prompt_column, inp.negative_prompt_column) if c}
    rows: dict[int, PromptRow] = {}
    for f, offset in zip(plan.files, plan.row_offsets):
        lo, hi = max(first_row, offset), min(last_row, offset + f.rows - 1)
        if lo > hi:
            continue
        table = _read_table(plan, f, columns, lo - offset, hi - offset)
        values = {
            c: _as_bytes(table.column(c)) if c in text else table.column(c).to_pylist()
            for c in columns
        }
        # A passthrough column that is also a text column keeps its own type (not bytes).
        kept = {c: table.column(c).to_pylist() for c in renames(inp.passthrough_columns)}
        for i in range(hi - lo + 1):
            row = {c: values[c][i] for c in columns}
            passthrough = {c: v[i] for c, v in kept.items()}
            rows[lo + i] = PromptRow(f.stem, offset, row, passthrough)
    return rows


def _read_table(plan: Plan, f, columns: list[str], lo: int, hi: int) -> pa.Table:
    """Rows lo..hi (inclusive, in the file's own numbering) of one input file."""
    groups, group_start, skip = [], 0, None
    for g, n in enumerate(f.row_groups):
        if group_start + n > lo and group_start <= hi:
            if skip is None:
                skip = lo - group_start
            groups.append(g)
        group_start += n
    storage = Storage(f.uri, plan.spec.input.storage_options)
    with storage.fs.open(storage.root, "rb") as fh:
        if plan.source_output is None:
            return (
                pq.ParquetFile(fh).read_row_groups(groups, columns=columns).slice(skip, hi - lo + 1)
            )
        # The file's ok rows, which are what the plan counted.
        table = pq.ParquetFile(fh).read(columns=columns)
        return table.filter(pc.equal(table.column("status"), STATUS_OK)).slice(lo, hi - lo + 1)


def _read_inputs(plan: Plan, rows: dict[int, PromptRow]) -> dict[int, Any]:
    """Global row -> its (input image, mask), or why it has none usable."""
    inp = plan.spec.input
    if plan.source_output is not None:
        return read_source_inputs(
            Storage(plan.source_output, inp.storage_options),
            {r: (v.stem, v.offset, v.values) for r, v in rows.items()},
        )
    if not inp.image_column:
        return {}
    reader = InputImageReader(inp.uri, inp.storage_options)
    return read_row_inputs(
        reader,
        {r: v.values[inp.image_column] for r, v in rows.items()},
        {r: v.values[inp.mask_column] for r, v in rows.items()} if inp.mask_column else None,
    )


def _sample(
    plan: Plan, shard_id: int, s: int, rows: dict[int, PromptRow], inputs: dict[int, Any]
) -> Sample:
    """Plan sample `s`: its row at its sweep point, with its key, seed and parameters; with
    best-of-N, each prompt's candidate slots (consecutive samples) form one group."""
    spec, inp, source = plan.spec, plan.spec.input, plan.source_output
    start, _ = plan.shard_range(shard_id)
    n_points = len(plan.points)
    row = s // n_points
    stem, offset, values, kept = rows[row]
    point = plan.points[s % n_points]
    key = sample_key(shard_id, s - start, plan.key_width)
    raw_id = values["key"] if source else values[inp.id_column] if inp.id_column else None
    prompt_id = f"{stem}:{row - offset}" if raw_id is None else str(raw_id)
    passthrough = {t: kept[s] for s, t in renames(inp.passthrough_columns).items()}
    prompt, error = _decode(values[inp.prompt_column], "prompt")
    negative, negative_error = (None, None)
    if inp.negative_prompt_column:
        negative, negative_error = _decode(
            values[inp.negative_prompt_column], "negative prompt", allow_empty=True
        )
    if row in plan.duplicate_rows:
        error = (
            f"duplicate prompt_id {prompt_id!r}: first at {plan.locate(plan.duplicate_rows[row])}"
        )
    error = error or negative_error
    params = resolve_params(spec, prompt or "", negative, prompt_id, point)
    if row in inputs:
        if isinstance(inputs[row], str):
            error = error or inputs[row]
        else:
            params.image, params.mask = inputs[row]
    candidates = spec.curation.candidates
    slot = (
        {"group": s // candidates, "candidate": s % candidates} if spec.curation.best_of_n else {}
    )
    origin = (
        {
            "source_output": source,
            "source_key": values["key"],
            "source_image_sha256": values["image_sha256"],
        }
        if source
        else {}
    )
    common = {"passthrough": passthrough, "prompt": prompt, "origin": origin, **slot}
    if error:  # not generated; what it would have used is kept for its row
        return Sample(key, shard_id, prompt_id, None, error, planned=params, **common)
    return Sample(key, shard_id, prompt_id, params, None, **common)


def _as_bytes(column) -> list[bytes | None]:
    target = (
        pa.large_binary()
        if pa.types.is_large_string(column.type) or pa.types.is_large_binary(column.type)
        else pa.binary()
    )
    return column.cast(target).to_pylist()


def _decode(
    raw: bytes | None, what: str, allow_empty: bool = False
) -> tuple[str | None, str | None]:
    """Text and None, or None and the reason this row cannot be generated."""
    if raw is None:
        return None, (None if allow_empty else f"{what} is null")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"{what} is not valid UTF-8 (byte {e.start}: {raw[e.start : e.start + 1]!r})"
    if not allow_empty and not text.strip():
        return None, f"{what} is empty or whitespace-only"
    return text, None

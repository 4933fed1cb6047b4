"""The plan: what the driver hands every worker. Data and pure functions only; `jobs.plan` makes it.

A plan holds no per-sample data. A shard is a range of global sample indices; sample s is sweep
point s % P of global prompt row s // P, so planning 10M prompts costs the same as 10.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from sdfleet.schemas.content import JobContent
from sdfleet.schemas.families import FAMILIES
from sdfleet.schemas.passthrough import PassthroughClash, clash_message
from sdfleet.schemas.rows import output_schema
from sdfleet.schemas.samples import key_width, shard_name
from sdfleet.schemas.spec import JobSpec


@dataclass
class InputFile:
    uri: str
    size: int
    rows: int
    row_groups: list[int]  # rows in each row group, to read only the groups a shard touches
    content: str = ""  # its content identity (sdfleet.jobs.content.input_file_identity)

    @property
    def stem(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]


@dataclass(frozen=True)
class Plan:
    """Frozen: made once by planning (`sdfleet.jobs.preflight`), then only read."""

    spec: JobSpec
    files: list[InputFile]
    points: list[dict[str, Any]]
    passthrough_schema: pa.Schema  # under their output names (input.passthrough_columns')
    row_offsets: list[int] = field(default_factory=list)  # global index of each file's first row
    # Rows whose prompt id appeared earlier in the input: global row -> global row of the first.
    duplicate_rows: dict[int, int] = field(default_factory=dict)
    # input.uri when it is an earlier sdfleet output: then `files` are its committed shards'
    # Parquet files, each file's `rows` counts its ok rows only, and those rows' images (from the
    # shard's tar) are the inputs, each row keyed by its source key.
    source_output: str | None = None
    # The checkpoint's family (its model_index.json class's), named by pre-flight so that the
    # schema every worker writes has the family's own columns; None: not read (SD2's columns).
    family: str | None = None
    # What the input files, the files rows point at and the checkpoint are, by content, as the
    # driver resolved them (`sdfleet.jobs.content`); None: not resolved (a plan made without the
    # driver's checks, or a job recorded before sdfleet recorded content, resumed as it was).
    content: JobContent | None = None

    def __post_init__(self):
        if not self.row_offsets:
            offsets, total = [], 0
            for f in self.files:
                offsets.append(total)
                total += f.rows
            object.__setattr__(self, "row_offsets", offsets)  # frozen: __init__'s own way

    @property
    def num_rows(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def num_samples(self) -> int:
        return self.num_rows * len(self.points)

    @property
    def samples_per_shard(self) -> int:
        return self.spec.output.samples_per_shard

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_samples / self.samples_per_shard)

    @property
    def key_width(self) -> int:
        return key_width(self.num_shards)

    def locate(self, row: int) -> str:
        """'<file>:<row in file>' for a global row index, for messages."""
        for f, offset in zip(reversed(self.files), reversed(self.row_offsets)):
            if row >= offset:
                return f"{f.uri.rsplit('/', 1)[-1]}:{row - offset}"
        raise IndexError(row)

    def shard_range(self, shard_id: int) -> tuple[int, int]:
        start = shard_id * self.samples_per_shard
        return start, min(start + self.samples_per_shard, self.num_samples)

    def shard_name(self, shard_id: int) -> str:
        return shard_name(shard_id, self.key_width)

    def output_schema(self) -> pa.Schema:
        """ValueError: a passthrough column clashes with the family's own (said in full)."""
        try:
            return output_schema(
                self.passthrough_schema,
                FAMILIES.get(self.family or ""),
                refiner=self.spec.model.refiner is not None,
                vae=self.spec.model.vae is not None,
                loras=bool(self.spec.model.loras),
            )
        except PassthroughClash as e:
            raise ValueError(clash_message(self.spec.input.passthrough_columns, e)) from None

    def input_manifest(self) -> list[dict[str, Any]]:
        return [{"uri": f.uri, "size": f.size, "rows": f.rows} for f in self.files]

    @property
    def fingerprint(self) -> str:
        """The spec's fingerprinted keys, the input files and, once resolved, their content."""
        content = self.content.to_json() if self.content is not None else None
        return self.spec.fingerprint(self.input_manifest(), content)

    @property
    def fingerprint_without_content(self) -> str:
        """The fingerprint as sdfleet made it before it recorded content, for resuming such jobs."""
        return self.spec.fingerprint(self.input_manifest())

"""Issue 30's prompt table through `sdfleet run` on Ray: passthrough columns of the temporal, decimal,
binary, non-finite float, list, struct and map types reach the Parquet rows under their own types
and values, and the tars' strict JSON as README's table says."""

from __future__ import annotations

import datetime as dt
import decimal
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import TINY_GENERATION, job_dict, run_cli, write_prompts, write_spec

pytestmark = pytest.mark.slow

UTC = dt.UTC
ROWS = 4  # the first three hold values, the last nulls (and the only finite score)


def column(value, dtype: pa.DataType) -> pa.Array:
    return pa.array([value] * (ROWS - 1) + [None], dtype)


PASSTHROUGH = {
    "ts_utc": column(dt.datetime(2024, 5, 1, 12, 30, tzinfo=UTC), pa.timestamp("us", tz="UTC")),
    # 2023-11-14T22:13:20.123456789Z, an hour later on a Paris clock
    "ts_paris": column(1_700_000_000_123_456_789, pa.timestamp("ns", tz="Europe/Paris")),
    "ts_naive": column(dt.datetime(2024, 5, 1, 12, 30, 0, 250000), pa.timestamp("ms")),
    "day": column(dt.date(2024, 2, 29), pa.date32()),
    "price": column(decimal.Decimal("19.90"), pa.decimal128(10, 2)),
    "blob": column(b"\x00\xffpng", pa.binary()),
    "score": pa.array([float("nan"), float("inf"), float("-inf"), 0.25]),
    "tags": column(["a", "b"], pa.list_(pa.string())),
    "ratios": column([1.5, float("nan")], pa.list_(pa.float64())),
    "meta": column(
        {"at": dt.date(2020, 1, 1), "raw": b"x", "n": float("inf")},
        pa.struct([("at", pa.date32()), ("raw", pa.binary()), ("n", pa.float64())]),
    ),
    "wait": column(-1500, pa.duration("ms")),
    "tod": column(dt.time(1, 2, 3, 1), pa.time64("us")),
    "kv": column([("a", 1)], pa.map_(pa.string(), pa.int64())),
}

# README's encodings, written out by hand.
AS_DOCUMENTED = {
    "ts_utc": "2024-05-01T12:30:00.000000+00:00",
    "ts_paris": "2023-11-14T23:13:20.123456789+01:00",
    "ts_naive": "2024-05-01T12:30:00.250",
    "day": "2024-02-29",
    "price": "19.90",
    "blob": "AP9wbmc=",
    "tags": ["a", "b"],
    "ratios": [1.5, None],
    "meta": {"at": "2020-01-01", "raw": "eA==", "n": None},
    "wait": "-PT1.500S",
    "tod": "01:02:03.000001",
    "kv": [{"key": "a", "value": 1}],
}


def strict_loads(data: bytes):
    def refuse(token):
        raise ValueError(f"non-JSON constant {token}")

    return json.loads(data, parse_constant=refuse)


def comparable(values: list) -> str:
    # NaN, at any depth, is never equal to itself; its repr is (and a value's repr names its type).
    return repr(values)


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_model, ray_cluster):
    tmp = tmp_path_factory.mktemp("coltypes")
    write_prompts(
        tmp / "in" / "p.parquet", [f"a red cube, view {i}" for i in range(ROWS)], **PASSTHROUGH
    )
    spec = job_dict(
        tiny_model,
        tmp / "in",
        tmp / "out",
        generation=TINY_GENERATION,
        input={"passthrough_columns": list(PASSTHROUGH)},
        output={"samples_per_shard": 2},
    )
    path = write_spec(tmp, spec, "job.yaml")
    done = run_cli("run", str(path), "--address", ray_cluster.address, "--no-progress")
    return tmp / "out", done


def test_run_succeeds_and_every_tar_json_is_strict_and_as_documented(job):
    out, done = job
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {}
    for tar_path in sorted(Path(out).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    row = strict_loads(tar.extractfile(member).read())
                    rows[row["prompt_id"]] = row
    assert sorted(rows) == [f"p{i:03d}" for i in range(ROWS)]
    for i in range(ROWS - 1):
        row = rows[f"p{i:03d}"]
        assert {c: row[c] for c in AS_DOCUMENTED} == AS_DOCUMENTED
        assert row["score"] is None  # NaN, +inf, -inf
    last = rows[f"p{ROWS - 1:03d}"]
    assert last["score"] == 0.25 and all(last[c] is None for c in AS_DOCUMENTED)


def test_parquet_rows_keep_the_input_types_and_values(job):
    out, done = job
    assert done.returncode == 0, done.stderr[-3000:]
    table = pa.concat_tables(pq.read_table(p) for p in sorted(Path(out).glob("*.parquet")))
    table = table.sort_by("prompt_id")
    given = pq.read_table(Path(out).parent / "in" / "p.parquet")
    for name in PASSTHROUGH:
        assert table.schema.field(name).type == given.schema.field(name).type, name
        assert comparable(table.column(name).to_pylist()) == comparable(
            given.column(name).to_pylist()
        ), name


def test_the_parquet_bytes_of_a_passthrough_column_equal_the_input(job):
    """Beyond equal Python values: the binary and nanosecond columns are bit-for-bit the input's."""
    out, _ = job
    table = pa.concat_tables(pq.read_table(p) for p in sorted(Path(out).glob("*.parquet")))
    table = table.sort_by("prompt_id")
    given = pq.read_table(io.BytesIO((Path(out).parent / "in" / "p.parquet").read_bytes()))
    for name in ("ts_paris", "blob", "price", "wait"):
        assert table.column(name).combine_chunks().equals(given.column(name).combine_chunks())

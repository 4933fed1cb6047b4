"""The tars' JSON encoding per Arrow type (sdfleet.schemas.json_values), each value read back from
a Parquet file as the shard reader reads it, and the types planning refuses."""

import datetime as dt
import decimal
import io
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import job_dict, run_cli, write_prompts, write_spec
from sdfleet.jobs.plan import Planner
from sdfleet.schemas.errors import InputError
from sdfleet.schemas.json_values import (
    REFUSED,
    RULES,
    json_value,
    passthrough_refusal,
    refusal,
    row_json,
)
from sdfleet.schemas.spec import parse_spec

README = Path(__file__).resolve().parents[1] / "README.md"


def strict_loads(data: bytes):
    def refuse(token):
        raise ValueError(f"non-JSON constant {token}")

    return json.loads(data, parse_constant=refuse)


def through_parquet(array: pa.Array) -> tuple[object, pa.DataType]:
    """The first value of `array` as a Parquet round trip and to_pylist give it, and its type."""
    buf = io.BytesIO()
    pq.write_table(pa.table({"c": array}), buf)
    column = pq.read_table(io.BytesIO(buf.getvalue())).column("c")
    return column.to_pylist()[0], column.type


def encoded(array: pa.Array):
    value, dtype = through_parquet(array)
    assert refusal(dtype) is None
    return strict_loads(row_json({"c": value}, pa.schema([("c", dtype)])))["c"]


PARIS = 1_700_000_000_123_456_789  # 2023-11-14T22:13:20.123456789Z, 23:13 in Paris


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (pa.array([None], pa.null()), None),
        (pa.array([True]), True),
        (pa.array([2**64 - 1], pa.uint64()), 2**64 - 1),
        (pa.array([-7], pa.int8()), -7),
        (pa.array([0.1]), 0.1),
        (pa.array([1.5], pa.float16()), 1.5),
        (pa.array([float("nan")]), None),
        (pa.array([float("inf")], pa.float32()), None),
        (pa.array([float("-inf")]), None),
        (pa.array([decimal.Decimal("-1.20")], pa.decimal128(5, 2)), "-1.20"),
        (
            pa.array([decimal.Decimal("123456789012345678901234567890.5")], pa.decimal256(40, 1)),
            "123456789012345678901234567890.5",
        ),
        (pa.array(["ünïcode"]), "ünïcode"),
        (pa.array([b"\x00\xffbytes"]), "AP9ieXRlcw=="),
        (pa.array([b"\x00\x01"], pa.large_binary()), "AAE="),
        (pa.array([b"abcd"], pa.binary(4)), "YWJjZA=="),
        (pa.array([dt.date(2024, 2, 29)]), "2024-02-29"),
        (pa.array([dt.date(1969, 7, 20)], pa.date64()), "1969-07-20"),
        (
            pa.array([PARIS], pa.timestamp("ns", tz="Europe/Paris")),
            "2023-11-14T23:13:20.123456789+01:00",
        ),
        (
            pa.array([PARIS // 1000], pa.timestamp("us", tz="UTC")),
            "2023-11-14T22:13:20.123456+00:00",
        ),
        (
            pa.array([PARIS // 10**6], pa.timestamp("ms", tz="-05:30")),
            "2023-11-14T16:43:20.123-05:30",
        ),
        (pa.array([PARIS], pa.timestamp("ns")), "2023-11-14T22:13:20.123456789"),
        (pa.array([1_700_000_000_000_000], pa.timestamp("us")), "2023-11-14T22:13:20.000000"),
        (pa.array([3_723_250], pa.time32("ms")), "01:02:03.250"),
        # Parquet has no seconds unit: a time32[s] column reads back as time32[ms].
        (pa.array([3_723], pa.time32("s")), "01:02:03.000"),
        (pa.array([3_723_000_001], pa.time64("us")), "01:02:03.000001"),
        (pa.array([3_723_000_000_001], pa.duration("ns")), "PT3723.000000001S"),
        (pa.array([-1_500], pa.duration("ms")), "-PT1.500S"),
        (pa.array([90], pa.duration("s")), "PT90S"),
        (pa.array([[1.0, float("nan"), None]]), [1.0, None, None]),
        (pa.array([[b"x", b"y"]], pa.list_(pa.binary(), 2)), ["eA==", "eQ=="]),
        (pa.array([[dt.date(2020, 1, 1)]], pa.large_list(pa.date32())), ["2020-01-01"]),
        (
            pa.array([{"at": dt.datetime(2020, 1, 1, 12), "n": float("inf"), "tags": ["a"]}]),
            {"at": "2020-01-01T12:00:00.000000", "n": None, "tags": ["a"]},
        ),
        (
            pa.array(
                [[(2, decimal.Decimal("1.5")), (1, None)]], pa.map_(pa.int32(), pa.decimal128(3, 1))
            ),
            [{"key": 2, "value": "1.5"}, {"key": 1, "value": None}],
        ),
        (pa.array(["red", "red"]).dictionary_encode(), "red"),
    ],
    ids=lambda v: str(v.type) if isinstance(v, pa.Array) else None,
)
def test_each_type_encodes_as_documented(array, expected):
    assert encoded(array) == expected


@pytest.mark.parametrize(
    ("dtype", "why"),
    [
        (pa.time64("ns"), "nanosecond times of day"),
        (pa.uuid(), "extension type"),
        (pa.month_day_nano_interval(), "no JSON encoding"),
        (pa.struct([("a", pa.int8()), ("a", pa.int8())]), "two struct fields share a name ('a')"),
        (pa.list_(pa.struct([("t", pa.time64("ns"))])), "nanosecond times of day"),
        (pa.map_(pa.string(), pa.uuid()), "extension type"),
        (pa.dictionary(pa.int8(), pa.time64("ns")), "nanosecond times of day"),
    ],
    ids=str,
)
def test_types_without_an_encoding_are_refused_naming_the_column(dtype, why):
    line = passthrough_refusal(pa.field("when", dtype))
    assert why in line and "'when'" in line and str(dtype) in line and "\n" not in line


def test_ordinary_rows_encode_as_plain_json_dumps_did():
    """SD2's columns (strings, ints, finite floats, lists of structs, tuples) write the bytes that
    json.dumps(sort_keys=True, ensure_ascii=False) wrote before the rules existed."""
    row = {
        "key": "000000001",
        "prompt": 'a café, "quoted"',
        "seed": 2**40,
        "guidance_scale": 7.5,
        "strength": None,
        "vae_tiling": False,
        "nsfw_scores": [{"label": "porn", "score": 0.125}],
        "original_size": (1024, 1024),
        "not_in_schema": [1, {"x": 2.5}],
    }
    schema = pa.schema(
        [
            ("key", pa.string()),
            ("prompt", pa.string()),
            ("seed", pa.int64()),
            ("guidance_scale", pa.float64()),
            ("strength", pa.float64()),
            ("vae_tiling", pa.bool_()),
            ("nsfw_scores", pa.list_(pa.struct([("label", pa.string()), ("score", pa.float32())]))),
            ("original_size", pa.list_(pa.int64())),
        ]
    )
    before = json.dumps(row, sort_keys=True, ensure_ascii=False).encode()
    assert row_json(row, schema) == before


def test_readme_shows_every_rule_and_refusal():
    text = README.read_text()
    table = text[text.index("| Arrow type | tar JSON |") :].split("\n\n", 1)[0]
    for rule in RULES:
        assert f"| {rule.types} | {rule.encoding} |" in table, rule.types
    for types in REFUSED:
        assert re.search(rf"\| {re.escape(types)} \| refused", table), types


def test_plan_and_run_refuse_a_column_without_an_encoding_before_any_worker(tmp_path, tiny_model):
    """One line naming the column and its type, exit 1, from `plan` and from `run` (which never
    reaches Ray: no address is given, so a start would have begun an embedded cluster)."""
    write_prompts(
        tmp_path / "in" / "p.parquet",
        ["a red cube", "a blue cube"],
        lang=["en", "fr"],
        at=pa.array([1, 2], pa.time64("ns")),
    )
    spec = write_spec(
        tmp_path,
        job_dict(tiny_model, tmp_path / "in", tmp_path / "out"),
        input={"passthrough_columns": ["lang", "at"]},
    )
    for command in ("plan", "run"):
        out = run_cli(command, str(spec), env={"AWS_EC2_METADATA_DISABLED": "true"})
        assert out.returncode == 1, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "passthrough column 'at' has type time64[ns]" in lines[0]
        assert "Traceback" not in out.stderr and not (tmp_path / "out").exists()
        assert "ray" not in out.stdout.lower() + out.stderr.lower()


@pytest.mark.parametrize(
    ("array", "refused"),
    [
        (pa.array([dt.date(9999, 12, 31), dt.date(1, 1, 1)]), False),
        (pa.array([2_932_897], pa.date32()), True),  # 10000-01-01
        (pa.array([dt.datetime(9999, 12, 30, 23, 59)], pa.timestamp("ms", tz="UTC")), False),
        (pa.array([253_402_300_800], pa.timestamp("s")), True),  # 10000-01-01T00:00Z
        (pa.array([[-62_135_596_800_000_001]], pa.list_(pa.timestamp("us"))), True),  # year 0
        (pa.array([2**62], pa.timestamp("ns")), False),  # pandas' Timestamp holds any
    ],
    ids=str,
)
def test_plan_refuses_dates_python_cannot_hold_from_the_footer(tmp_path, array, refused):
    """pyarrow cannot give such a value to a row (OverflowError): the shard would fail on reading."""
    value, _ = through_parquet(array) if not refused else (None, None)
    write_prompts(tmp_path / "in" / "p.parquet", ["a red cube"] * len(array), when=array)
    spec = parse_spec(
        job_dict(
            "unused", tmp_path / "in", tmp_path / "out", input={"passthrough_columns": ["when"]}
        )
    )
    if not refused:
        assert Planner(spec).plan().num_samples == len(array) and value is not None
        return
    with pytest.raises(
        InputError, match=r"passthrough column 'when' holds a \w+ outside the years"
    ):
        Planner(spec).plan()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (decimal.Decimal("19.90"), "19.90"),
        (dt.time(1, 2, 3, 1), "01:02:03.000001"),
        (dt.timedelta(seconds=-1.5), "-PT1.500000S"),
        (b"\x00", "AA=="),
        ([float("inf"), {"d": dt.date(2020, 1, 1)}], [None, {"d": "2020-01-01"}]),
    ],
    ids=repr,
)
def test_a_value_outside_a_schema_is_encoded_by_the_type_arrow_infers(value, expected):
    """The preview gallery's rows (and any key a row has outside its schema) go this way."""
    assert json.loads(json.dumps(json_value(value, None), allow_nan=False)) == expected

"""How each Arrow type reaches the tars' `{key}.json`: the one rule per type, which `sdfleet plan`
checks passthrough columns against (a type without a rule is refused before any worker starts)
and which the shard writer encodes every row with. README's "Output columns" shows this table.

The JSON is strict (no NaN or Infinity tokens). The Parquet rows are not affected: every column
there keeps its Arrow type and value. Values arrive as pyarrow's `to_pylist` gives them (datetime,
Decimal, bytes, pandas' Timestamp and Timedelta for nanosecond units, ...)."""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

T = pa.types

# Fraction digits of a temporal unit: a timestamp[ms] is written with milliseconds, always, so
# every value of one column has one shape.
FRACTION_DIGITS = {"s": 0, "ms": 3, "us": 6, "ns": 9}


def _nanos_of_second(value: Any) -> int:
    # pandas' Timestamp adds `nanosecond` to datetime's fields; datetime.time and datetime have none.
    return value.microsecond * 1000 + getattr(value, "nanosecond", 0)


def _with_fraction(head: str, at: int, value: Any, unit: str) -> str:
    """`head` (an isoformat to the second) with the unit's fraction digits inserted at `at`."""
    digits = FRACTION_DIGITS[unit]
    if not digits:
        return head
    fraction = f"{_nanos_of_second(value):09d}"[:digits]
    return f"{head[:at]}.{fraction}{head[at:]}"


def iso_timestamp(value: Any, dtype: pa.TimestampType) -> str:
    # "2024-05-01T12:30:00.000000+02:00": the column's zone's offset where it has one (the value
    # as pyarrow gives it is in that zone), none for a naive timestamp (a wall-clock time).
    return _with_fraction(value.isoformat(timespec="seconds"), 19, value, dtype.unit)


def iso_time(value: Any, dtype: pa.DataType) -> str:
    return _with_fraction(value.isoformat(timespec="seconds"), 8, value, dtype.unit)


def iso_duration(value: Any, dtype: pa.DurationType) -> str:
    # ISO 8601 in seconds only ("PT90061.5S", "-PT5S", as java.time.Duration and xsd:duration
    # parse it): exact at every unit, where a float of seconds would round nanoseconds away.
    nanos = getattr(value, "value", None)  # pandas' Timedelta: nanoseconds
    if nanos is None:
        nanos = ((value.days * 86400 + value.seconds) * 10**6 + value.microseconds) * 1000
    sign, nanos = ("-" if nanos < 0 else ""), abs(nanos)
    seconds, rest = divmod(nanos, 10**9)
    digits = FRACTION_DIGITS[dtype.unit]
    fraction = f".{rest:09d}"[: digits + 1] if digits else ""
    return f"{sign}PT{seconds}{fraction}S"


def finite(value: Any, dtype: pa.DataType | None = None) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


@dataclass(frozen=True)
class TypeRule:
    """One row of the table: the Arrow types it covers, how the tar's JSON holds their values."""

    types: str  # as README names them
    matches: Callable[[pa.DataType], bool]
    encoding: str  # as README says it
    encode: Callable[[Any, Any], Any]  # (value, its Arrow type) -> a JSON value


def _same(value: Any, dtype: pa.DataType) -> Any:
    return value


def _list(value: Any, dtype: pa.DataType) -> list:
    return [json_value(item, dtype.value_type) for item in value]


def _struct(value: dict, dtype: pa.StructType) -> dict:
    types = {f.name: f.type for f in dtype}
    return {name: json_value(item, types.get(name)) for name, item in value.items()}


def _map(value: list, dtype: pa.MapType) -> list:
    # Arrow's own layout (a list of key/value structs): keys of any type, in order, duplicates kept.
    return [
        {"key": json_value(k, dtype.key_type), "value": json_value(v, dtype.item_type)}
        for k, v in value
    ]


def _is_list(t: pa.DataType) -> bool:
    return (
        T.is_list(t)
        or T.is_large_list(t)
        or T.is_fixed_size_list(t)
        or T.is_list_view(t)
        or T.is_large_list_view(t)
    )


def _is_text(t: pa.DataType) -> bool:
    return T.is_string(t) or T.is_large_string(t) or T.is_string_view(t)


def _is_binary(t: pa.DataType) -> bool:
    return (
        T.is_binary(t) or T.is_large_binary(t) or T.is_fixed_size_binary(t) or T.is_binary_view(t)
    )


RULES: tuple[TypeRule, ...] = (
    TypeRule("null", T.is_null, "null", _same),
    TypeRule("bool", T.is_boolean, "true / false", _same),
    TypeRule("int8 … int64, uint8 … uint64", T.is_integer, "number (exact)", _same),
    TypeRule("float16, float32, float64", T.is_floating, "number; NaN and ±infinity: null", finite),
    TypeRule(
        "decimal32 … decimal256",
        T.is_decimal,
        'string, plain notation with the column\'s scale ("-1.20")',
        lambda v, t: format(v, "f"),
    ),
    TypeRule("string, large_string, string_view", _is_text, "string", _same),
    TypeRule(
        "binary, large_binary, fixed_size_binary, binary_view",
        _is_binary,
        "string: standard base64, padded",
        lambda v, t: base64.b64encode(v).decode("ascii"),
    ),
    TypeRule(
        "date32, date64",
        lambda t: T.is_date32(t) or T.is_date64(t),
        'string, ISO 8601 date ("2024-05-01")',
        lambda v, t: v.isoformat(),
    ),
    TypeRule(
        "timestamp (any unit, with or without time zone)",
        T.is_timestamp,
        "string, ISO 8601 with the unit's fraction digits, and the zone's offset where the column "
        'has a zone ("2024-05-01T12:30:00.000+02:00"; naive: no offset)',
        iso_timestamp,
    ),
    TypeRule(
        "time32 (s, ms), time64 (us)",
        lambda t: (T.is_time32(t) or T.is_time64(t)) and t.unit != "ns",
        'string, ISO 8601 time of day with the unit\'s fraction digits ("12:30:00.250")',
        iso_time,
    ),
    TypeRule(
        "duration (any unit)",
        T.is_duration,
        'string, ISO 8601 duration in seconds with the unit\'s fraction digits ("PT90.5S", "-PT5S")',
        iso_duration,
    ),
    TypeRule(
        "list, large_list, fixed_size_list, list_view",
        _is_list,
        "array, items by these rules",
        _list,
    ),
    TypeRule("struct", T.is_struct, "object, fields by these rules", _struct),
    TypeRule(
        "map",
        T.is_map,
        'array of {"key": …, "value": …} objects in order (keys need not be strings)',
        _map,
    ),
    TypeRule(
        "dictionary",
        T.is_dictionary,
        "its value type's encoding",
        lambda v, t: json_value(v, t.value_type),
    ),
)


def rule_for(dtype: pa.DataType) -> TypeRule | None:
    return next((r for r in RULES if r.matches(dtype)), None)


# What has no rule, and why; README's table lists these too.
REFUSED = {
    "time64 (ns)": "nanosecond times of day lose their last digits on reading; cast to time64('us')",
    "extension types (uuid, json, …)": "an extension type; cast it to its storage type",
    "a struct with two fields of one name": "two struct fields share a name",
    "interval, union, run-end encoded, any other": "no JSON encoding (Parquet cannot hold it either)",
}


def refusal(dtype: pa.DataType) -> str | None:
    """Why values of `dtype` cannot reach the tars' JSON as documented (None: they can), checking
    what a list, struct, map or dictionary holds too."""
    if isinstance(dtype, pa.BaseExtensionType):
        return f"{REFUSED['extension types (uuid, json, …)']} ({dtype.storage_type})"
    if T.is_time64(dtype) and dtype.unit == "ns":
        return REFUSED["time64 (ns)"]
    if rule_for(dtype) is None:
        return REFUSED["interval, union, run-end encoded, any other"]
    if T.is_struct(dtype):
        names = [f.name for f in dtype]
        if len(set(names)) != len(names):
            twice = next(n for n in names if names.count(n) > 1)
            return f"{REFUSED['a struct with two fields of one name']} ({twice!r})"
    children = (
        [dtype.value_type]
        if _is_list(dtype) or T.is_dictionary(dtype)
        else [dtype.key_type, dtype.item_type]
        if T.is_map(dtype)
        else [f.type for f in dtype]
        if T.is_struct(dtype)
        else []
    )
    return next((why for why in map(refusal, children) if why), None)


# pyarrow gives a row's dates and timestamps as Python's date and datetime, which hold the years 1 to
# 9999 (nanosecond timestamps as pandas' Timestamp, whose range fits any int64): a value outside them
# fails its whole shard on reading, so planning refuses a column whose Parquet footer shows one.
# Timestamps keep a day's margin at either end, for a zone's offset.
PYTHON_DAYS = (
    (dt.date.min - dt.date(1970, 1, 1)).days + 1,
    (dt.date.max - dt.date(1970, 1, 1)).days - 1,
)
PER_DAY = {"milliseconds": 86_400_000, "microseconds": 86_400_000_000}


def outside_python(logical_type: dict, low: int, high: int) -> bool:
    """Whether a Parquet column's stored minimum or maximum (its statistics' raw values) is a date
    or timestamp Python cannot hold; `logical_type`: the column's Parquet logical type as JSON."""
    if logical_type.get("Type") == "Date":
        first, last = PYTHON_DAYS[0] - 1, PYTHON_DAYS[1] + 1
    elif logical_type.get("Type") == "Timestamp" and logical_type.get("timeUnit") in PER_DAY:
        per_day = PER_DAY[logical_type["timeUnit"]]
        first, last = PYTHON_DAYS[0] * per_day, (PYTHON_DAYS[1] + 1) * per_day - 1
    else:
        return False
    return low < first or high > last


def passthrough_refusal(field: pa.Field) -> str | None:
    """The one-line refusal of a passthrough column whose type has no encoding (None: it has)."""
    why = refusal(field.type)
    if why is None:
        return None
    return (
        f"passthrough column {field.name!r} has type {field.type}, which sdfleet cannot write to "
        f"the tars' JSON: {why}; change it in the input or drop it from input.passthrough_columns"
    )


def json_value(value: Any, dtype: pa.DataType | None) -> Any:
    """`value` as the JSON holds it, by its Arrow type's rule (dtype None: a value outside a
    schema, by the Arrow type pyarrow infers from its Python type)."""
    if value is None:
        return None
    if dtype is None:
        if isinstance(value, (list, tuple)):
            return [json_value(item, None) for item in value]
        if isinstance(value, dict):
            return {k: json_value(item, None) for k, item in value.items()}
        if isinstance(value, (str, int, float)):  # bool is an int
            return finite(value)
        dtype = pa.scalar(value).type  # Decimal, date, time, timedelta, bytes...: as Arrow infers
        if hasattr(value, "asm8"):  # pandas' Timestamp and Timedelta hold nanoseconds
            dtype = pa.duration("ns") if T.is_duration(dtype) else pa.timestamp("ns", dtype.tz)
    rule = rule_for(dtype)
    if rule is None:  # planning refuses these; a row never holds one
        raise TypeError(f"no JSON encoding for Arrow type {dtype}")
    return rule.encode(value, dtype)


def row_json(row: dict[str, Any], schema: pa.Schema) -> bytes:
    """A row as the tar's `{key}.json`: keys sorted, UTF-8, strict (allow_nan=False)."""
    types = {f.name: f.type for f in schema}
    encoded = {k: json_value(v, types.get(k)) for k, v in row.items()}
    return json.dumps(encoded, sort_keys=True, ensure_ascii=False, allow_nan=False).encode()

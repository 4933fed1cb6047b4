"""input.passthrough_columns' two forms (issue 33 item 7): a list keeps each column under its own
name; a mapping renames it, so that an input column named like an output column (`created_at`)
can be kept. Spec parsing, planning and the reader here; the CLI's refusal of a clash; and one job
through `sdfleet run` on Ray whose Parquet rows and tar JSON hold the renamed column."""

from __future__ import annotations

import datetime as dt
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import REPO, TINY_GENERATION, job_dict, run_cli, spec_dict, write_prompts, write_spec
from sdfleet.actors.reader import read_shard_samples
from sdfleet.jobs.plan import Planner
from sdfleet.schemas.errors import InputError, SpecError
from sdfleet.schemas.spec import parse_spec

UTC = dt.UTC
CREATED = [dt.datetime(2021, 3, d, 8, 15, tzinfo=UTC) for d in (1, 2, 3)]


def spec(tmp_path, passthrough, **sections):
    base = {
        "input": {"uri": str(tmp_path / "in"), "passthrough_columns": passthrough},
        "output": {"uri": str(tmp_path / "out"), "samples_per_shard": 2},
    }
    return parse_spec(spec_dict(base, **sections))


def prompts(tmp_path):
    write_prompts(
        tmp_path / "in" / "p.parquet",
        ["a red cube", "a blue ball", "a green cone"],
        created_at=pa.array(CREATED, pa.timestamp("us", tz="UTC")),
        lang=["en", "fr", "de"],
    )


# ------------------------------------------------------------------------------ the spec


def test_the_list_form_and_the_mapping_form_parse():
    listed = parse_spec(spec_dict({"input": {"uri": "/in"}, "output": {"uri": "/out"}}))
    assert listed.input.passthrough_columns == []
    s = spec(Path("/x"), ["lang", "created_at"])
    assert s.input.passthrough_columns == ["lang", "created_at"]
    s = spec(Path("/x"), {"created_at": "source_created_at", "lang": "lang"})
    assert s.input.passthrough_columns == {"created_at": "source_created_at", "lang": "lang"}


@pytest.mark.parametrize(
    "value, said",
    [
        ({"created_at": 5}, "'created_at': 5 does not map a column name to a column name"),
        ({"created_at": ["a"]}, "does not map a column name to a column name"),
        ({"created_at": ""}, "'created_at': '' has an empty name"),
        ({"a": "x", "b": "x"}, "output column 'x' is named twice"),
        (["lang", "lang"], "output column 'lang' is named twice"),
        ([3], "3 is not a column name"),
        ("created_at", "give a list of input columns, or a mapping input column: output column"),
    ],
)
def test_a_bad_passthrough_value_is_one_line_naming_the_key(value, said):
    with pytest.raises(SpecError) as e:
        spec(Path("/x"), value)
    lines = str(e.value).splitlines()[1:]
    assert len(lines) == 1, lines
    assert lines[0].startswith("  input.passthrough_columns=") and said in lines[0], lines[0]


def test_a_rename_changes_the_fingerprint_and_an_identity_mapping_does_not():
    at = Path("/x")
    listed = spec(at, ["lang", "created_at"]).fingerprint()
    assert spec(at, {"lang": "lang", "created_at": "created_at"}).fingerprint() == listed
    renamed = spec(at, {"lang": "lang", "created_at": "source_created_at"}).fingerprint()
    other = spec(at, {"lang": "lang", "created_at": "origin_created_at"}).fingerprint()
    # The mapping's order is the output columns' order, so it counts too.
    reordered = spec(at, {"created_at": "source_created_at", "lang": "lang"}).fingerprint()
    assert len({listed, renamed, other, reordered}) == 4


# ------------------------------------------------------------------- planning and reading


def test_a_renamed_column_reaches_each_sample_under_its_new_name(tmp_path):
    prompts(tmp_path)
    plan = Planner(spec(tmp_path, {"created_at": "source_created_at", "lang": "lang"})).plan()
    assert plan.passthrough_schema.names == ["source_created_at", "lang"]
    assert plan.passthrough_schema.field("source_created_at").type == pa.timestamp("us", tz="UTC")
    assert "source_created_at" in plan.output_schema().names
    samples = [s for shard in range(plan.num_shards) for s in read_shard_samples(plan, shard)]
    assert [s.passthrough for s in samples] == [
        {"source_created_at": c, "lang": lang} for c, lang in zip(CREATED, ["en", "fr", "de"])
    ]


def test_the_prompt_column_passed_through_keeps_its_string_type(tmp_path):
    """The reader reads the prompt as bytes (a non-UTF-8 row fails alone); its passthrough copy
    is the column as the input types it."""
    prompts(tmp_path)
    plan = Planner(spec(tmp_path, {"prompt": "original_prompt"})).plan()
    samples = read_shard_samples(plan, 0)
    assert [s.passthrough for s in samples] == [
        {"original_prompt": "a red cube"},
        {"original_prompt": "a blue ball"},
    ]


def test_a_clash_names_the_input_column_the_output_column_and_the_fix(tmp_path):
    prompts(tmp_path)
    with pytest.raises(InputError) as e:
        Planner(spec(tmp_path, ["lang", "created_at"])).plan()
    assert str(e.value) == (
        "input column 'created_at' clashes with sdfleet's output column created_at: rename it, "
        "input.passthrough_columns: {created_at: source_created_at}"
    )
    assert str(e.value) in (REPO / "README.md").read_text()  # the README shows it as it is
    with pytest.raises(InputError) as e:
        Planner(spec(tmp_path, {"lang": "seed"})).plan()
    assert str(e.value).startswith(
        "input column 'lang' is renamed to 'seed', which clashes with sdfleet's output column seed:"
    )


def test_sdfleet_plan_refuses_a_clash_in_one_line(tmp_path):
    prompts(tmp_path)
    path = write_spec(
        tmp_path,
        job_dict("unused-model", tmp_path / "in", tmp_path / "out"),
        input={"passthrough_columns": ["created_at"]},
    )
    out = run_cli("plan", str(path))
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "input column 'created_at' clashes with sdfleet's output column created_at" in lines[0]
    assert "passthrough_columns: {created_at: source_created_at}" in lines[0]


# ----------------------------------------------------------------------------- on Ray


@pytest.mark.slow
def test_sdfleet_run_writes_the_renamed_column_to_rows_and_tars(tmp_path, tiny_model, ray_cluster):
    prompts(tmp_path)
    job = job_dict(
        tiny_model,
        tmp_path / "in",
        tmp_path / "out",
        generation=TINY_GENERATION,
        input={"passthrough_columns": {"created_at": "source_created_at", "lang": "lang"}},
        output={"samples_per_shard": 2},
    )
    path = write_spec(tmp_path, job, "job.yaml")
    done = run_cli("run", str(path), "--address", ray_cluster.address, "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "out"
    # 1. The Parquet rows: the input's values under the new name and type, beside sdfleet's own.
    table = pa.concat_tables(pq.read_table(p) for p in sorted(out.glob("*.parquet")))
    table = table.sort_by("prompt_id")
    assert table.schema.field("source_created_at").type == pa.timestamp("us", tz="UTC")
    assert table.column("source_created_at").to_pylist() == CREATED
    assert table.column("lang").to_pylist() == ["en", "fr", "de"]
    assert all(c > CREATED[-1] for c in table.column("created_at").to_pylist())
    # 2. The tars' JSON: the same column, as README's timestamp encoding writes it.
    rows = {}
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    row = json.loads(tar.extractfile(m).read())
                    rows[row["prompt_id"]] = row
    assert [rows[k]["source_created_at"] for k in sorted(rows)] == [
        c.isoformat(timespec="microseconds") for c in CREATED
    ]

"""Bad input: rows that cannot be generated are recorded and the job goes on; input that cannot be
planned (wrong columns or types, empty or unreadable files, bad sizes, pickle-only weights) is refused
before any worker starts."""

from __future__ import annotations

import shutil
import tarfile

import pyarrow.parquet as pq
import pytest

from helpers import TINY_GENERATION, job_dict, rows_of, run_cli, write_spec


@pytest.mark.slow
def test_bad_rows_are_recorded_and_the_job_goes_on(tmp_path, tiny_model, ray_cluster):
    import pyarrow as pa

    long_prompt = " ".join(["a very long and detailed prompt about mountains"] * 20)
    prompts = [
        b"a good prompt",
        None,
        b"",
        b"   ",
        b"caf\xe9 in latin-1",
        b"a duplicate id",
        long_prompt.encode(),
        b"escaping paths",
        b"absolute paths",
    ]
    ids = ["ok", "null", "empty", "blank", "latin1", "ok", "long", "../../x", "/etc/passwd"]
    (tmp_path / "in").mkdir()
    pq.write_table(
        pa.table({"prompt_id": ids, "prompt": pa.array(prompts, pa.binary())}),
        tmp_path / "in" / "p.parquet",
    )
    spec = job_dict(
        tiny_model,
        tmp_path / "in",
        tmp_path / "out",
        generation=TINY_GENERATION,
        output={"samples_per_shard": 4},
    )
    write_spec(tmp_path, spec, "job.yaml")
    done = run_cli(
        "run", str(tmp_path / "job.yaml"), "--address", ray_cluster.address, "--no-progress"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {
        r["prompt_id"] if r["prompt_id"] != "ok" or r["status"] == "ok" else "dup": r
        for r in rows_of(str(tmp_path / "out"))
    }
    assert len(rows) == 9
    assert rows["null"]["status"] == "failed" and rows["null"]["error"] == "prompt is null"
    assert rows["empty"]["error"] == rows["blank"]["error"] == "prompt is empty or whitespace-only"
    assert rows["latin1"]["status"] == "failed" and "not valid UTF-8" in rows["latin1"]["error"]
    assert (
        rows["dup"]["status"] == "failed"
        and rows["dup"]["error"] == "duplicate prompt_id 'ok': first at p.parquet:0"
    )
    assert rows["dup"]["prompt"] == "a duplicate id"
    long = rows["long"]
    assert (
        long["status"] == "ok" and long["prompt_truncated"] is True and long["prompt_tokens"] > 77
    )
    assert rows["ok"]["prompt_truncated"] is False and rows["ok"]["prompt_tokens"] < 77
    # Ids that look like paths are data, never paths: every file is named by its key.
    assert rows["../../x"]["status"] == "ok" and rows["/etc/passwd"]["status"] == "ok"
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [
        "00000.parquet",
        "00000.tar",
        "00000_stats.json",
        "00001.parquet",
        "00001.tar",
        "00001_stats.json",
        "00002.parquet",
        "00002.tar",
        "00002_stats.json",
        "README.md",
        "_SUCCESS",
        "_driver.json",
        "_job.json",
        "preview",
        "sizes.json",
    ]
    assert [p.name for p in (tmp_path / "out" / "preview").iterdir()] == ["card_contact_sheet.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "job.yaml", "out"]
    with tarfile.open(tmp_path / "out" / "00001.tar") as tar:
        assert all(n.startswith("0000100") for n in tar.getnames())


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing-column", "has no prompt column 'text'"),
        ("wrong-type", "prompt column 'prompt' has type int64"),
        ("empty-file", "has no rows"),
        ("unreadable", "is not a readable Parquet file"),
        ("bad-size", "generation.width=100"),
        ("pickle-model", "only pickle weights"),
    ],
)
def test_bad_input_is_refused_before_any_worker_starts(case, message, tmp_path, tiny_model):
    import pyarrow as pa

    (tmp_path / "in").mkdir()
    spec = job_dict(tiny_model, tmp_path / "in", tmp_path / "out")
    table = pa.table({"prompt_id": ["a"], "prompt": ["fine"]})
    if case == "missing-column":
        spec["input"]["prompt_column"] = "text"
    elif case == "wrong-type":
        table = pa.table({"prompt_id": ["a"], "prompt": [1]})
    elif case == "empty-file":
        table = table.slice(0, 0)
    elif case == "bad-size":
        spec["generation"] = {"width": 100}
    elif case == "pickle-model":
        shutil.copytree(tiny_model, tmp_path / "pickled")
        for f in (tmp_path / "pickled").rglob("*.safetensors"):
            f.with_suffix(".bin").write_bytes(b"pickle")
            f.unlink()
        spec["model"]["source"] = str(tmp_path / "pickled")
    pq.write_table(table, tmp_path / "in" / "p.parquet")
    if case == "unreadable":
        (tmp_path / "in" / "p.parquet").write_bytes(b"PAR1 not really")
    write_spec(tmp_path, spec, "job.yaml")
    done = run_cli("run", str(tmp_path / "job.yaml"), env={"RAY_ADDRESS": ""})
    assert done.returncode == 1, done.stderr[-2000:]
    assert message in done.stderr
    if case in ("missing-column", "wrong-type", "empty-file", "unreadable"):
        assert "p.parquet" in done.stderr  # names the file
    assert not (tmp_path / "out").exists()  # refused before anything was written
    assert "Ray" not in done.stderr  # nor any worker started

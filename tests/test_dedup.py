"""`sdfleet dedup`: job-wide near-duplicates and evaluation-set contamination, on an output made by a
real tiny job with curation.save_embeddings (the tiny random CLIP of jobs.tiny, as test_curation's).

The tiny random CLIP embeds every image almost alike (cosines 0.98 to 0.998 between the 12 distinct
images of this job: `test_the_tiny_clips_embeddings_are_near_identical`), so "distinct images are
not flagged" cannot be shown on them. Its real embeddings are checked against a naive reference of
the rule instead; the other tests write controlled vectors into a copy of the real output, in its
layout (seeded random unit vectors, one per image, float16, the job's keys and metadata untouched),
and make duplicates by copying one image's row over another's: which rows match is then known.
"""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import loaded_by, run_tiny_job
from test_empty_shards import run_snippet
from test_score import readme_block

PROMPTS = [
    "a lighthouse at dusk",
    "a red fox in the snow",
    "a bowl of ramen",
    "a city at night, rain",
    "two cats on a red sofa",
    "a quiet harbour",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_model):
    """6 prompts x 2 seeds in 3 shards of 4, with the tiny CLIP's embeddings saved."""
    from sdfleet.jobs.tiny import write_tiny_clip

    tmp = tmp_path_factory.mktemp("dedup-job")
    return run_tiny_job(
        tmp,
        tiny_model,
        PROMPTS,
        sweep={"seeds": 2},
        output={"samples_per_shard": 4},
        curation={"clip_model": str(write_tiny_clip(tmp / "clip")), "save_embeddings": True},
    )


def copy_of(dataset, tmp_path):
    out = tmp_path / "OUTPUT"
    shutil.copytree(dataset, out)
    return out


def embeddings(out, shard: str) -> np.ndarray:
    return np.load(out / "img_emb" / f"img_emb_{shard}.npy")


def keys(out, shard: str) -> list[str]:
    return pq.read_table(out / "metadata" / f"metadata_{shard}.parquet")["key"].to_pylist()


def copy_row(out, src: tuple[str, int], dst: tuple[str, int]) -> None:
    """Image dst's embedding becomes image src's (the .npy rewritten as the job writes it)."""
    m = embeddings(out, dst[0])
    m[dst[1]] = embeddings(out, src[0])[src[1]]
    np.save(out / "img_emb" / f"img_emb_{dst[0]}.npy", m)


def controlled_copy(dataset, tmp_path):
    """A copy of the output whose embeddings are seeded random unit vectors of the same width and
    rows: distinct images, far apart (16-d random directions), as a real CLIP would make them."""
    out = copy_of(dataset, tmp_path)
    rng = np.random.default_rng(7)
    for f in sorted((out / "img_emb").glob("*.npy")):
        m = rng.standard_normal(np.load(f).shape)
        np.save(f, (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float16))
    return out


def naive_flags(out, threshold: float) -> list[tuple[str, str]]:
    """naive_rule over the output's embeddings and keys, in shard order."""
    shards = sorted(p.name[len("img_emb_") : -4] for p in (out / "img_emb").glob("*.npy"))
    x = np.concatenate([embeddings(out, s) for s in shards])
    return naive_rule(x, [k for s in shards for k in keys(out, s)], threshold)


def naive_rule(x: np.ndarray, names: list[str], threshold: float) -> list[tuple[str, str]]:
    """The rule, spelled out over all pairs in float64: (key, the earliest kept key it matches)
    per duplicate."""
    x = x.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    kept, found = [], []
    for i in range(len(x)):
        match = next((j for j in kept if x[i] @ x[j] >= threshold - 1e-6), None)
        if match is None:
            kept.append(i)
        else:
            found.append((names[i], names[match]))
    return found


def flags(out, name: str = "dedup") -> list[dict]:
    return pq.read_table(out / "_dedup" / f"{name}.parquet").to_pylist()


def dedup(*args: str):
    from sdfleet.jobs.cli import main

    return main(["dedup", *args])


# ------------------------------------------------------------------------------- the data itself


@pytest.mark.slow
def test_the_tiny_clips_embeddings_are_near_identical(dataset):
    """Why the tests below write controlled vectors: these cannot show distinct images apart."""
    m = np.concatenate([embeddings(dataset, s) for s in ("00000", "00001", "00002")])
    assert m.shape == (12, 16) and m.dtype == np.float16
    x = m.astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    off = (x @ x.T)[~np.eye(len(x), dtype=bool)]
    assert off.min() > 0.95  # every pair a "duplicate" at the default threshold
    assert len({row.tobytes() for row in m}) == 12  # yet no two the same


@pytest.mark.slow
@pytest.mark.parametrize("block_rows", [4096, 3])
def test_the_jobs_own_embeddings_are_flagged_as_a_naive_reference_of_the_rule_says(
    dataset, tmp_path, monkeypatch, block_rows
):
    """On the real embeddings, at thresholds that split them into groups; block_rows=3 makes blocks
    cross shard ends (shards hold 4), so kept rows of earlier blocks must be found in order."""
    import sdfleet.jobs.dedup.run as run

    monkeypatch.setattr(run, "BLOCK_ROWS", block_rows)
    out = copy_of(dataset, tmp_path)
    for threshold in ("0.99", "0.995"):
        assert dedup(str(out), "--threshold", threshold, "--out", threshold) == 0
        expected = naive_flags(out, float(threshold))
        assert 0 < len(expected) < 11  # some kept besides the first, some not
        got = [(r["key"], r["match"]) for r in flags(out, threshold)]
        assert got == expected


@pytest.mark.parametrize("block_rows", [4096, 7, 1])
def test_the_scan_of_many_small_shards_follows_the_rule(monkeypatch, block_rows):
    """Clusters of near-copies spread over 24 shards of 5, blocks of 7 or 1 rows crossing shard
    ends: the same flags as the rule over all pairs. No output: the scan alone, in memory."""
    import sdfleet.jobs.dedup.run as run

    monkeypatch.setattr(run, "BLOCK_ROWS", block_rows)
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((12, 32))
    x = centres[rng.integers(0, 12, 120)] + 0.2 * rng.standard_normal((120, 32))
    raw = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    names = [f"{i:09d}" for i in range(120)]
    scan = run.Scan(0.97, [])
    for s in range(24):
        rows = slice(5 * s, 5 * s + 5)
        vectors = raw[rows].astype(np.float32) * run.inverse_norms(raw[rows])[:, None]
        scan.add(f"{s:05d}", run.Embeddings(vectors, raw[rows], names[rows], [None] * 5))
    scan.finish()
    expected = naive_rule(raw, names, 0.97)
    assert 20 < len(expected) < 100
    assert [(f["key"], f["match"]) for f in scan.flags] == expected
    assert scan.images == 120 and len(scan.kept_keys) == 120 - len(expected)
    # Kept rows in chunks of a block or more, however small the shards: few products per block.
    assert all(len(chunk) >= min(block_rows, 120) for chunk, _ in scan.kept[:-1])


@pytest.mark.slow
def test_controlled_vectors_of_distinct_images_differ(dataset, tmp_path):
    out = controlled_copy(dataset, tmp_path)
    x = np.concatenate([embeddings(out, s) for s in ("00000", "00001", "00002")]).astype(np.float32)
    off = (x @ x.T)[~np.eye(len(x), dtype=bool)]
    assert off.max() < 0.9


@pytest.mark.slow
def test_distinct_images_are_not_flagged_and_the_summary_says_what_was_read(
    dataset, tmp_path, capsys
):
    out = controlled_copy(dataset, tmp_path)
    assert dedup(str(out)) == 0
    printed = capsys.readouterr().out
    assert flags(out) == []
    summary = json.loads((out / "_dedup" / "dedup_summary.json").read_text())
    assert summary["images_read"] == 12 and summary["shards_read"] == 3
    assert summary["counts"] == {"duplicate": 0, "contaminated": 0}
    assert summary["threshold"] == 0.95 and summary["dataset_complete"] is True
    assert summary["embedding_model"]["clip_model"].endswith("clip")
    assert len(summary["embedding_model"]["sha256"]) == 1
    assert "read          12 images in 3 shards" in printed
    assert "duplicates    0" in printed and "pd.read_parquet(" in printed


@pytest.mark.slow
def test_exact_duplicates_across_shards_name_the_earliest_kept_image(dataset, tmp_path, capsys):
    out = controlled_copy(dataset, tmp_path)
    k0, k1, k2 = keys(out, "00000"), keys(out, "00001"), keys(out, "00002")
    copy_row(out, ("00000", 0), ("00001", 1))  # across shards
    copy_row(out, ("00000", 0), ("00002", 0))  # a third copy: still the first's duplicate
    copy_row(out, ("00001", 3), ("00002", 2))  # a later kept image has its own group
    copy_row(out, ("00002", 1), ("00002", 3))  # within one shard
    assert dedup(str(out), "--threshold", "0.95") == 0
    got = [(f["key"], f["reason"], f["match"], f["shard"]) for f in flags(out)]
    assert got == [
        (k1[1], "duplicate", k0[0], "00001"),
        (k2[0], "duplicate", k0[0], "00002"),
        (k2[2], "duplicate", k1[3], "00002"),
        (k2[3], "duplicate", k2[1], "00002"),
    ]
    rows = flags(out)
    assert all(abs(r["similarity"] - 1) < 1e-3 and r["match_source"] is None for r in rows)
    prompt_of = {
        r["key"]: r["prompt_id"]
        for s in ("00000", "00001", "00002")
        for r in pq.read_table(out / "metadata" / f"metadata_{s}.parquet").to_pylist()
    }
    assert all(r["prompt_id"] == prompt_of[r["key"]] for r in rows)
    assert "duplicates    4" in capsys.readouterr().out
    # README's snippet, run as a user runs it (cwd holds OUTPUT), reads the rows less those four.
    snippet = readme_block("**Dedup across the job and against an evaluation set.**")
    report = (
        "\nimport json\n"
        "print(json.dumps([sorted(rows['key']), sorted(s['__key__'] for s in ds)]))\n"
    )
    every = sorted(k0 + k1 + k2)
    kept = [k for k in every if k not in {g[0] for g in got}]
    assert run_snippet(snippet + report, tmp_path) == [kept, kept]
    # Threshold 1 still catches exact copies (float16 rows renormalized in float32).
    assert dedup(str(out), "--threshold", "1", "--out", "exact") == 0
    assert len(flags(out, "exact")) == 4


@pytest.mark.slow
def test_the_result_is_the_same_twice_and_a_partial_output_reads_its_committed_shards(
    dataset, tmp_path
):
    out = controlled_copy(dataset, tmp_path)
    copy_row(out, ("00000", 2), ("00002", 1))
    assert dedup(str(out), "--out", "a") == 0 and dedup(str(out), "--out", "b") == 0
    a, b = (out / "_dedup" / "a.parquet").read_bytes(), (out / "_dedup" / "b.parquet").read_bytes()
    assert a == b and len(flags(out, "a")) == 1
    # Shard 00002 uncommitted (its stats file gone): read no further than 00001.
    (out / "00002_stats.json").unlink()
    shutil.rmtree(out / "_index", ignore_errors=True)
    assert dedup(str(out), "--out", "partial") == 0
    summary = json.loads((out / "_dedup" / "partial_summary.json").read_text())
    assert summary["images_read"] == 8 and summary["dataset_complete"] is False
    assert flags(out, "partial") == []


@pytest.mark.slow
def test_against_a_npy_flags_exactly_that_image_and_an_output_flags_its_own(dataset, tmp_path):
    out = controlled_copy(dataset, tmp_path)
    target = keys(out, "00001")[2]
    rng = np.random.default_rng(0)
    others = rng.standard_normal((5, 16)).astype(np.float32)
    evalset = np.concatenate([others, embeddings(out, "00001")[2:3].astype(np.float32)])
    evalset /= np.linalg.norm(evalset, axis=1, keepdims=True)
    np.save(tmp_path / "eval.npy", evalset)
    assert dedup(str(out), "--against", str(tmp_path / "eval.npy")) == 0
    rows = flags(out)
    assert [(r["key"], r["reason"], r["match"], r["match_index"]) for r in rows] == [
        (target, "contaminated", "5", 5)
    ]
    assert rows[0]["match_source"] == str(tmp_path / "eval.npy") and rows[0]["similarity"] > 0.999
    # An sdfleet output as the evaluation set: against itself, each image matches its own key.
    assert dedup(str(out), "--against", str(out), "--out", "self") == 0
    rows = flags(out, "self")
    assert len(rows) == 12 and all(r["match"] == r["key"] for r in rows)
    assert {r["match_source"] for r in rows} == {str(out)}


# ---------------------------------------------------------------------------------- refusals


@pytest.mark.slow
def test_refusals_name_the_value_and_what_to_do(dataset, tmp_path, capsys):
    out = controlled_copy(dataset, tmp_path)

    def refused(*args: str) -> str:
        assert dedup(*args) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("sdfleet: error: ") and "\n" not in err, err
        return err

    for bad in ("0", "1.5", "-0.2", "abc"):
        assert f"--threshold {bad}: give a cosine similarity in (0, 1]" in refused(
            str(out), "--threshold", bad
        )
    np.save(tmp_path / "wide.npy", np.ones((3, 8), np.float32))
    err = refused(str(out), "--against", str(tmp_path / "wide.npy"))
    assert "wide.npy" in err and "are 8 wide" in err and "16" in err
    # An existing name is never replaced.
    assert dedup(str(out)) == 0
    before = (out / "_dedup" / "dedup.parquet").read_bytes()
    err = refused(str(out), "--threshold", "0.5")
    assert "_dedup/dedup.parquet exists: pass --out" in err
    assert (out / "_dedup" / "dedup.parquet").read_bytes() == before
    assert not (out / "_dedup" / "dedup-2.parquet").exists()
    # A committed shard without its embeddings file.
    (out / "img_emb" / "img_emb_00001.npy").unlink()
    err = refused(str(out), "--out", "x")
    assert "img_emb_00001.npy is missing" in err and "curation.save_embeddings: true" in err
    # The job record of a job run without curation.save_embeddings.
    record = json.loads((out / "_job.json").read_text())
    record["spec"]["curation"]["save_embeddings"] = False
    (out / "_job.json").write_text(json.dumps(record))
    err = refused(str(out), "--out", "y")
    assert "has no image embeddings: rerun the job with curation.save_embeddings: true" in err


def test_importing_dedup_loads_no_heavy_frameworks():
    """The CLI imports the package to build its parser; numpy and the reader load only to run."""
    heavy = ("torch", "ray", "tensorflow", "numpy", "pyarrow")
    assert loaded_by("sdfleet.jobs.dedup, sdfleet.jobs.cli", heavy) == []


# ---------------------------------------------------------------------------------------- S3


@pytest.mark.slow
def test_dedup_reads_and_writes_s3(dataset, s3, tmp_path):
    """The output and the evaluation .npy in a bucket (moto over HTTP); the flags land there."""
    local = controlled_copy(dataset, tmp_path)
    copy_row(local, ("00000", 1), ("00002", 3))
    root = s3.bucket
    s3.put(str(local) + "/", f"{root}/out/", recursive=True)
    one = embeddings(local, "00001")[0:1]
    buf = io.BytesIO()
    np.save(buf, one)
    s3.pipe(f"{root}/eval/coco.npy", buf.getvalue())
    assert dedup(f"s3://{root}/out", "--against", f"s3://{root}/eval/coco.npy") == 0
    rows = pq.read_table(io.BytesIO(s3.cat_file(f"{root}/out/_dedup/dedup.parquet"))).to_pylist()
    assert [(r["key"], r["reason"], r["match"]) for r in rows] == [
        (keys(local, "00001")[0], "contaminated", "0"),
        (keys(local, "00002")[3], "duplicate", keys(local, "00000")[1]),
    ]
    summary = json.loads(s3.cat_file(f"{root}/out/_dedup/dedup_summary.json"))
    assert summary["against"] == [
        {"source": f"s3://{root}/eval/coco.npy", "kind": "npy", "rows": 1}
    ]
    assert dedup(f"s3://{root}/out") == 1  # the name exists in the bucket too

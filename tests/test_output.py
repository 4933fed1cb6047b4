"""The output folder's contract, without Ray: the survey classifies every planned shard from its
records alone (`OutputReader.survey`); the finalizer declares a dataset complete only when the
Parquet footers add up (`Finalizer`), with a card that says what the dataset holds (`dataset_card`).
The commit of one shard by racing writers is tests/test_commit.py's."""

from __future__ import annotations

import dataclasses
import io
import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import job_dict, write_prompts
from sdfleet.actors.storage import Storage
from sdfleet.actors.writer import ShardWriter
from sdfleet.jobs.finalize import dataset_card
from sdfleet.jobs.output import NotAnOutput, OutputReader, Survey
from sdfleet.jobs.plan import Planner
from sdfleet.jobs.sink import Finalizer, IncompleteOutput, job_record
from sdfleet.schemas import layout
from sdfleet.schemas.errors import StorageError
from sdfleet.schemas.layout import FailedShard, JobTotals, ShardAttemptError, ShardStats
from sdfleet.schemas.rows import output_schema
from sdfleet.schemas.samples import sample_key
from sdfleet.schemas.spec import parse_spec

# The job of `output`: 7 prompts x 1 seed, 2 samples per shard.
SAMPLES_PER_SHARD = {"00000": 2, "00001": 2, "00002": 2, "00003": 1}


def shard_stats(shard: str, fingerprint: str, samples: int, **fields) -> ShardStats:
    """A stats record for `shard`: every sample ok and in the tar, unless `fields` say otherwise."""
    record = dict(
        shard=shard,
        shard_id=int(shard),
        fingerprint=fingerprint,
        samples=samples,
        ok=samples,
        filtered=0,
        failed=0,
        images_in_tar=samples,
        quarantined_images=0,
        flagged=0,
        flagged_by_class={},
        safety_detector="none",
        safety_model_sha256=None,
        attempt=1,
        batch_size=samples,
        engine_speed_ups=[],
        dtype="float32",
        device="cpu",
        worker_node="node-1",
        worker_id="worker-1",
        gpu_id="0",
        gen_seconds=1.0,
        gpu_seconds=1.0,
        images_per_gpu_hour=None,
        wall_seconds=2.0,
        started_at="2026-11-29T00:00:00+00:00",
        finished_at="2026-11-29T00:00:02+00:00",
        started_ts=0.0,
        generate_started_ts=0.5,
        generate_finished_ts=1.5,
        finished_ts=2.0,
        tar_sha256="0" * 64,
        parquet_sha256="0" * 64,
    )
    return ShardStats(**{**record, **fields})


def failed_shard(shard: str, fingerprint: str) -> FailedShard:
    return FailedShard(
        shard_id=int(shard),
        attempts=3,
        fingerprint=fingerprint,
        errors=[
            ShardAttemptError(attempt=i, error="Traceback ...\nOSError: disk full", at=float(i))
            for i in (1, 2, 3)
        ],
    )


def put_record(storage: Storage, name: str, record) -> None:
    storage.write_json(name, record.model_dump(mode="json"))


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 40 % 256, 90, 160)).save(buf, format="PNG")
    return buf.getvalue()


def write_shard(reader: OutputReader, shard: str, parquet_rows: int | None = None) -> ShardStats:
    """Write the shard's tar and Parquet as a worker does (tiny PNGs, every sample ok) and commit it;
    `parquet_rows` makes the Parquet hold another number of rows than the stats say."""
    job = reader.job
    samples = SAMPLES_PER_SHARD[shard]
    rows = [
        {
            "key": sample_key(int(shard), i, job["key_width"]),
            "shard_id": int(shard),
            "status": "ok",
            "prompt": f"a quiet harbour {i}",
            "width": 8,
            "height": 8,
            "image_format": "png",
        }
        for i in range(samples if parquet_rows is None else parquet_rows)
    ]
    writer = ShardWriter(reader.storage, "png")
    spooled = writer.spool(
        shard, rows, {r["key"]: png(i) for i, r in enumerate(rows)}, output_schema()
    )
    try:
        return writer.commit(
            shard,
            spooled,
            shard_stats(
                shard,
                job["fingerprint"],
                samples,
                tar_sha256=spooled.sha256[layout.tar_file(shard)],
                parquet_sha256=spooled.sha256[layout.parquet_file(shard)],
            ),
        )
    finally:
        spooled.close()


def started_output(tmp_path, uri: str) -> OutputReader:
    """A started job's output at `uri`: its `_job.json` (7 samples in 4 shards), no shard yet."""
    write_prompts(
        tmp_path / "in" / "p.parquet", [f"a quiet harbour, variation {i}" for i in range(7)]
    )
    spec = parse_spec(
        {
            "name": "harbours",
            "input": {"uri": str(tmp_path / "in")},
            "output": {"uri": uri, "samples_per_shard": 2, "image_format": "png"},
            "safety": {"detector": "none"},
        }
    )
    plan = Planner(spec).plan()
    storage = Storage(spec.output.uri)
    storage.write_json(layout.JOB_FILE, job_record(plan))
    return OutputReader(storage)


@pytest.fixture
def output(tmp_path) -> OutputReader:
    return started_output(tmp_path, str(tmp_path / "out"))


# ------------------------------------------------------------------------------------- survey


def test_survey_classifies_every_planned_shard_by_its_records(output):
    job, storage = output.job, output.storage
    put_record(storage, layout.stats_file("00000"), shard_stats("00000", job["fingerprint"], 2))
    put_record(storage, layout.stats_file("00001"), shard_stats("00001", "another job", 2))
    put_record(storage, layout.failed_file("00002"), failed_shard("00002", job["fingerprint"]))
    survey = output.survey()
    assert (survey.num_shards, survey.num_samples) == (4, 7)
    assert list(survey.committed) == ["00000"]
    assert list(survey.quarantined) == ["00002"]
    assert survey.quarantined["00002"].last_error_line() == "OSError: disk full"
    # A stats file of another job commits nothing here: the shard is made again.
    assert survey.pending == ["00001", "00003"]
    assert survey.committed_samples == 2 and not survey.complete


def test_survey_totals_add_up_the_committed_shards_only(output):
    job, storage = output.job, output.storage
    put_record(
        storage,
        layout.stats_file("00000"),
        shard_stats(
            "00000",
            job["fingerprint"],
            2,
            ok=1,
            filtered=1,
            images_in_tar=1,
            quarantined_images=1,
            flagged=1,
            flagged_by_class={"porn": 1},
            gpu_seconds=1.5,
            dtype="float16",
            safety_model_sha256="b" * 64,
        ),
    )
    put_record(
        storage,
        layout.stats_file("00001"),
        shard_stats(
            "00001",
            job["fingerprint"],
            2,
            ok=1,
            failed=1,
            images_in_tar=1,
            flagged=2,
            flagged_by_class={"porn": 1, "hentai": 1},
            gpu_seconds=0.5,
            safety_model_sha256="a" * 64,
        ),
    )
    put_record(
        storage,
        layout.stats_file("00002"),
        shard_stats("00002", "another job", 2, gpu_seconds=100.0),
    )
    totals = output.survey().totals()
    assert isinstance(totals, JobTotals)
    assert dataclasses.asdict(totals) == {
        "samples": 4,
        "ok": 2,
        "filtered": 1,
        "failed": 1,
        "rejected": 0,
        "duplicate": 0,
        "skipped": 0,
        "images_in_tar": 2,
        "quarantined_images": 1,
        "flagged": 3,
        "gpu_seconds": 2.0,
        "gen_seconds": 2.0,
        "flagged_by_class": {"hentai": 1, "porn": 2},
        "gated": 0,
        "gate_failures": {},
        "by_sweep_point": {},
        "images_per_gpu_hour": 3600.0,
        "dtypes": ["float16", "float32"],
        "safety_model_sha256": ["a" * 64, "b" * 64],
    }


def test_status_prints_the_typed_totals_and_curations_counts(output, capsys):
    from sdfleet.jobs.cli import main
    from sdfleet.jobs.output import curation_counts

    job, storage = output.job, output.storage
    put_record(
        storage,
        layout.stats_file("00000"),
        shard_stats("00000", job["fingerprint"], 4, ok=1, failed=1, rejected=1, skipped=1),
    )
    totals = output.survey().totals()
    assert totals.count("ok") == 1 and totals.count("duplicate") == 0
    assert curation_counts(totals) == ", 1 rejected, 1 skipped"
    main(["status", str(storage.url())])
    assert "with rows: 1 ok, 0 filtered, 1 failed, 1 rejected, 1 skipped" in capsys.readouterr().out


def test_survey_is_complete_only_when_the_committed_samples_are_the_planned_ones(output):
    job, storage = output.job, output.storage
    for shard, samples in SAMPLES_PER_SHARD.items():
        put_record(
            storage, layout.stats_file(shard), shard_stats(shard, job["fingerprint"], samples)
        )
    assert output.survey().complete
    put_record(storage, layout.stats_file("00003"), shard_stats("00003", job["fingerprint"], 0))
    assert not output.survey(refresh=True).complete


def test_survey_names_a_record_it_cannot_read(output):
    output.storage.write_json(layout.stats_file("00001"), {"samples": 2})
    with pytest.raises(StorageError, match=r"00001_stats.json is not a valid ShardStats record"):
        output.survey()


def test_a_folder_without_a_job_record_is_not_an_output(tmp_path):
    with pytest.raises(NotAnOutput, match=r"_job.json"):
        OutputReader(Storage(str(tmp_path))).survey()


# ----------------------------------------------------------------------------------- finalize


def completion_files(storage: Storage) -> dict[str, bool]:
    return {
        name: storage.exists(name)
        for name in (layout.SIZES_FILE, layout.CARD_FILE, layout.CARD_SHEET, layout.SUCCESS_FILE)
    }


def test_finalizer_writes_nothing_while_a_shard_is_pending_or_quarantined(output):
    for shard in ("00000", "00001", "00002"):
        write_shard(output, shard)
    assert Finalizer(output).finalize() is False
    put_record(
        output.storage,
        layout.failed_file("00003"),
        failed_shard("00003", output.job["fingerprint"]),
    )
    assert Finalizer(output).finalize() is False
    assert not any(completion_files(output.storage).values())
    assert "results" not in output.storage.read_json(layout.JOB_FILE)


def test_finalizer_declares_a_complete_output(output):
    for shard in SAMPLES_PER_SHARD:
        write_shard(output, shard)
    job_before = output.job
    assert Finalizer(output).finalize() is True
    storage = output.storage
    assert all(completion_files(storage).values())
    assert storage.read_json(layout.SIZES_FILE) == {
        f"{s}.tar": n for s, n in SAMPLES_PER_SHARD.items()
    }
    job = storage.read_json(layout.JOB_FILE)
    assert {k: v for k, v in job.items() if k != "results"} == job_before
    assert job["results"]["samples"] == job["results"]["ok"] == 7
    card = storage.read_bytes(layout.CARD_FILE).decode()
    assert card == dataset_card(job_before, output.survey(), layout.CARD_SHEET)
    assert Image.open(io.BytesIO(storage.read_bytes(layout.CARD_SHEET))).format == "PNG"


def test_finalizer_refuses_a_parquet_whose_footer_disagrees_with_its_stats(output):
    for shard in SAMPLES_PER_SHARD:
        write_shard(output, shard, parquet_rows=1 if shard == "00001" else None)
    assert pq.read_metadata(output.storage.path("00001.parquet")).num_rows == 1
    with pytest.raises(IncompleteOutput, match=r"00001.parquet has 1 rows but its stats say 2"):
        Finalizer(output).finalize()
    assert not any(completion_files(output.storage).values())


@pytest.mark.parametrize("where", ["local", "s3"])
def test_survey_and_footers_read_many_records_at_once(where, tmp_path, request):
    """One listing, then the stats (and the Parquet footers' tails) read many at a time: the same
    answers from a folder and from S3 over HTTP."""
    uri = (
        f"s3://{request.getfixturevalue('s3').bucket}/out"
        if where == "s3"
        else str(tmp_path / "out")
    )
    output = started_output(tmp_path, uri)
    for shard in SAMPLES_PER_SHARD:
        write_shard(output, shard)
    survey = output.survey(refresh=True)
    assert sorted(survey.committed) == sorted(SAMPLES_PER_SHARD) and not survey.pending
    assert (
        survey.listing[layout.tar_file("00003")]
        == survey.committed["00003"].files[layout.tar_file("00003")].size
    )
    assert output.parquet_rows(sorted(SAMPLES_PER_SHARD)) == SAMPLES_PER_SHARD
    assert Finalizer(output).finalize()


def stats_reads(monkeypatch) -> list[str]:
    """The stats files the survey reads itself (a spy on the one read path; nothing is faked)."""
    reads: list[str] = []
    real = Storage.read_many

    def read_many(self, names, tails=None):
        reads.extend(n for n in names if n.endswith("_stats.json"))
        return real(self, names, tails)

    monkeypatch.setattr(Storage, "read_many", read_many)
    return reads


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_index_spares_the_next_survey_every_read_and_never_outlives_a_changed_record(
    where, tmp_path, request, monkeypatch
):
    import sdfleet.jobs.output as output_module

    monkeypatch.setattr(output_module, "INDEX_AFTER_READS", 2)
    uri = (
        f"s3://{request.getfixturevalue('s3').bucket}/out"
        if where == "s3"
        else str(tmp_path / "out")
    )
    output = started_output(tmp_path, uri)
    for shard in SAMPLES_PER_SHARD:
        write_shard(output, shard)
    reads = stats_reads(monkeypatch)
    first = OutputReader(output.storage).survey()
    assert sorted(reads) == [layout.stats_file(s) for s in sorted(SAMPLES_PER_SHARD)]
    assert [n for n in output.storage.listing() if layout.is_index_file(n)]  # it wrote an index

    reads.clear()
    second = OutputReader(output.storage).survey()
    assert reads == [] and second.committed == first.committed

    # A stats file written again (its commit withdrawn and made anew): the index's copy is stale.
    stats = output.storage.read_json(layout.stats_file("00002"))
    output.storage.delete(layout.stats_file("00002"))
    put_record(
        output.storage, layout.stats_file("00002"), ShardStats(**{**stats, "gpu_seconds": 99.0})
    )
    reads.clear()
    third = OutputReader(output.storage).survey()
    assert reads == [layout.stats_file("00002")] and third.committed["00002"].gpu_seconds == 99.0
    assert third.committed["00001"] == first.committed["00001"]

    # A damaged index (a foreign writer, a truncated upload) costs reads, never a wrong answer.
    (index,) = [n for n in output.storage.listing() if layout.is_index_file(n)]
    output.storage.write_bytes(index, b"not parquet")
    reads.clear()
    assert OutputReader(output.storage).survey().committed == third.committed
    assert len(reads) == len(SAMPLES_PER_SHARD)


def test_the_driver_s_own_records_spare_the_finalizer_s_reads_on_s3(s3, tmp_path, monkeypatch):
    output = started_output(tmp_path, f"s3://{s3.bucket}/out")
    committed = [write_shard(output, shard) for shard in SAMPLES_PER_SHARD]
    reads = stats_reads(monkeypatch)
    reader = OutputReader(output.storage)
    reader.remember(committed)
    assert Finalizer(reader).finalize()
    assert reads == []
    # A record that is not what the file holds is not taken: the file is read.
    reader = OutputReader(output.storage)
    reader.remember([committed[0].model_copy(update={"gpu_seconds": 5.0})])
    assert reader.survey().committed["00000"].gpu_seconds == committed[0].gpu_seconds
    assert layout.stats_file("00000") in reads


def test_a_parquet_footer_larger_than_the_tail_read_is_read_whole(output, monkeypatch):
    import sdfleet.actors.storage as storage

    for shard in SAMPLES_PER_SHARD:
        write_shard(output, shard)
    monkeypatch.setattr(storage, "TAIL_BYTES", 16)  # far less than any footer
    assert output.parquet_rows(sorted(SAMPLES_PER_SHARD)) == SAMPLES_PER_SHARD


def test_a_parquet_that_is_not_one_is_named_by_the_footer_check(output):
    for shard in SAMPLES_PER_SHARD:
        write_shard(output, shard)
    size = output.storage.listing()[layout.parquet_file("00001")]
    output.storage.write_bytes(layout.parquet_file("00001"), b"x" * size)
    with pytest.raises(
        StorageError, match=r"00001\.parquet is not a readable Parquet file: no PAR1 at its end"
    ):
        output.parquet_rows(sorted(SAMPLES_PER_SHARD))


def test_finalizer_refuses_a_tar_that_is_not_the_one_committed_and_names_it(output):
    for shard in SAMPLES_PER_SHARD:
        write_shard(output, shard)
    output.storage.write_bytes(layout.tar_file("00002"), b"a tar someone else wrote")
    with pytest.raises(
        IncompleteOutput, match=r"shard 00002: .*00002\.tar has 24 bytes; its commit says"
    ):
        Finalizer(output).finalize()
    assert not any(completion_files(output.storage).values())


def test_finalizer_publishes_a_commit_whose_writer_died_before_publishing_and_discards_leftovers(
    output,
):
    from sdfleet.actors.writer import ShardCommit

    for shard in ("00000", "00001", "00002"):
        write_shard(output, shard)
    writer = ShardWriter(output.storage, "png")
    rows = [{"key": sample_key(3, 0, 5), "shard_id": 3, "status": "ok", "prompt": "p"}]
    spooled = writer.spool("00003", rows, {rows[0]["key"]: png(0)}, output_schema())
    stats = shard_stats(
        "00003",
        output.job["fingerprint"],
        1,
        tar_sha256=spooled.sha256["00003.tar"],
        parquet_sha256=spooled.sha256["00003.parquet"],
    )
    died = ShardCommit(output.storage, "00003", spooled, stats).steps()
    for _ in range(3):  # staged both files, committed; died before publishing
        next(died)
    loser = ShardCommit(
        output.storage, "00003", spooled, stats.model_copy(update={"worker_id": "lost"})
    ).steps()
    next(loser)  # a second writer staged its tar, then died too
    assert not output.storage.exists("00003.tar")
    assert Finalizer(output).finalize() is True
    assert output.storage.exists("00003.tar")
    assert OutputReader(output.storage).verify(deep=True) == {}
    assert not list(Path(output.storage.root).rglob(".*.staged"))  # the dead loser's file is gone
    spooled.close()


# -------------------------------------------------------------------------------- dataset card


def card_for(reader: OutputReader, sheet: str | None = None, **spec_sections) -> str:
    """The card of the `output` job with every shard committed: 7 samples, 2 of them filtered by the
    detector; `spec_sections` update the job's spec."""
    job = json.loads(json.dumps(reader.job))
    for section, values in spec_sections.items():
        job["spec"][section].update(values)
    survey = Survey(
        num_shards=4,
        num_samples=7,
        committed={
            shard: shard_stats(shard, job["fingerprint"], n, gpu_seconds=900.0)
            for shard, n in SAMPLES_PER_SHARD.items()
        },
    )
    survey.committed["00001"] = shard_stats(
        "00001",
        job["fingerprint"],
        2,
        ok=0,
        filtered=2,
        images_in_tar=0,
        flagged=2,
        flagged_by_class={"porn": 1, "sexy": 1},
        gpu_seconds=900.0,
        safety_model_sha256="c0ffee" * 10 + "abcd",
    )
    return dataset_card(job, survey, sheet)


def test_dataset_card_counts_what_the_dataset_holds(output):
    card = card_for(output)
    for line in (
        "# harbours",
        "| samples planned | 7 |",
        "| images (status ok) | 5 |",
        "| flagged by safety | 2 (action `drop`) |",
        "| filtered (not in the tars) | 2 |",
        "| kept aside in `quarantine/` | 0 |",
        "| failed | 0 |",
        "| shards | 4 |",
        "| GPU-hours | 1.0000 (3600.0 GPU-seconds) |",
        "| images per GPU-hour | 5.0 |",
    ):
        assert f"\n{line}\n" in card, line
    assert card.startswith("---\n") and "![" not in card


def test_dataset_card_says_whether_and_how_images_were_checked(output):
    assert "\n- safety: none (no detector ran; safety columns are null)\n" in card_for(output)
    card = card_for(
        output, safety={"detector": "nsfw-detector", "threshold": 0.7, "action": "quarantine"}
    )
    assert (
        "\n- safety: `nsfw-detector` (weights sha256 c0ffeec0ffee), threshold 0.7, action `quarantine`; "
        "flagged per class: porn 1, sexy 1\n"
    ) in card


@pytest.mark.parametrize(
    "image_format, extension", [("jpeg", "jpg"), ("png", "png"), ("webp", "webp")]
)
def test_dataset_card_names_the_tar_members_by_the_images_extension(
    output, image_format, extension
):
    card = card_for(output, output={"image_format": image_format})
    assert f"WebDataset shards with `{{key}}.{extension}`, `{{key}}.txt` (prompt)" in card


def test_dataset_card_shows_the_contact_sheet_it_is_given(output):
    assert "\n![A sample of the images](preview/card_contact_sheet.png)\n" in card_for(
        output, layout.CARD_SHEET
    )


# ------------------------------------------------------------------------------------ the job claim


@pytest.mark.parametrize("where", ["local", "s3"])
def test_of_two_drivers_with_different_specs_starting_at_once_exactly_one_claims_the_output(
    where, tmp_path, request
):
    import threading

    from sdfleet.jobs.sink import OutputSink
    from sdfleet.schemas.errors import SpecError

    write_prompts(tmp_path / "in" / "p.parquet", ["a quiet harbour", "a loud harbour"])
    out = (
        f"s3://{request.getfixturevalue('s3').bucket}/claimed"
        if where == "s3"
        else str(tmp_path / "out")
    )
    specs = [
        parse_spec(
            {
                "input": {"uri": str(tmp_path / "in")},
                "output": {"uri": out},
                "generation": {"guidance_scale": g},
                "safety": {"detector": "none"},
            }
        )
        for g in (3.0, 7.5)
    ]
    plans = [Planner(spec).plan() for spec in specs]
    sinks = [OutputSink(Storage(s.output.uri, s.output.storage_options)) for s in specs]
    start, outcomes = threading.Barrier(2), [None, None]

    def claim(i: int) -> None:
        start.wait()
        try:
            sinks[i].claim(plans[i], sinks[i].judge(plans[i]))
            outcomes[i] = plans[i].fingerprint
        except SpecError as e:
            outcomes[i] = e

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    [winner] = [o for o in outcomes if isinstance(o, str)]
    [refused] = [o for o in outcomes if isinstance(o, SpecError)]
    assert "another driver" in str(refused)
    assert re.search(r"generation\.guidance_scale: (7\.5 -> 3\.0|3\.0 -> 7\.5)", str(refused))
    assert Storage(out).read_json(layout.JOB_FILE)["fingerprint"] == winner


def test_an_output_with_files_but_no_job_record_is_refused_naming_them(tmp_path, tiny_model):
    from sdfleet.jobs.preflight import Preflight
    from sdfleet.schemas.errors import SpecError

    write_prompts(tmp_path / "in" / "p.parquet", ["a quiet harbour"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "00000.tar").write_bytes(b"someone else's shard")
    spec = parse_spec(job_dict(tiny_model, tmp_path / "in", tmp_path / "out"))
    with pytest.raises(SpecError, match=r"holds 1 file\(s\) but no _job.json \(e.g. 00000.tar\)"):
        Preflight(spec).check()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00000.tar"]  # nothing written


OLD_JOB = {  # a job that committed nothing, claimed long ago by a driver that is gone
    "spec": {"name": "old"},
    "fingerprint": "0" * 32,
    "fingerprint_fields": {},
    "input_files": [],
    "num_shards": 1,
    "num_samples": 1,
    "key_width": 5,
    "created_at": "2026-01-01T00:00:00+00:00",
}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_of_two_drivers_replacing_one_job_record_exactly_one_does(where, tmp_path, request):
    """Both judge the old record replaceable, then both replace it: the second's replace is
    conditional on the version it read, so it is refused naming the record, and the record is the
    first's whole (its history names the old job once)."""
    from sdfleet.jobs.sink import OutputSink
    from sdfleet.schemas.errors import SpecError

    write_prompts(tmp_path / "in" / "p.parquet", ["a quiet harbour", "a loud harbour"])
    out = (
        f"s3://{request.getfixturevalue('s3').bucket}/replaced"
        if where == "s3"
        else str(tmp_path / "out")
    )
    Storage(out).write_json(layout.JOB_FILE, OLD_JOB)
    specs = [
        parse_spec(
            {
                "input": {"uri": str(tmp_path / "in")},
                "output": {"uri": out},
                "generation": {"guidance_scale": g},
                "safety": {"detector": "none"},
            }
        )
        for g in (3.0, 7.5)
    ]
    plans = [Planner(spec).plan() for spec in specs]
    sinks = [OutputSink(Storage(out)) for _ in specs]
    verdicts = [sink.judge(plan) for sink, plan in zip(sinks, plans)]
    assert [v.action for v in verdicts] == ["replace", "replace"]
    sinks[0].claim(plans[0], verdicts[0])
    with pytest.raises(SpecError) as refused:
        sinks[1].claim(plans[1], verdicts[1])
    assert f"{Storage(out).url(layout.JOB_FILE)} was replaced by another driver" in str(
        refused.value
    )
    job = Storage(out).read_json(layout.JOB_FILE)
    assert job["fingerprint"] == plans[0].fingerprint
    assert [h["fingerprint"] for h in job["history"]] == [OLD_JOB["fingerprint"]]
    if where == "local":
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [layout.JOB_FILE]


def test_a_foreign_job_record_is_refused_like_any_foreign_file(tmp_path):
    from sdfleet.jobs.sink import OutputSink
    from sdfleet.schemas.errors import SpecError

    write_prompts(tmp_path / "in" / "p.parquet", ["a quiet harbour"])
    out = tmp_path / "out"
    out.mkdir()
    (out / layout.JOB_FILE).write_text('{"job": "someone else\'s"}')
    spec = parse_spec(
        {
            "input": {"uri": str(tmp_path / "in")},
            "output": {"uri": str(out)},
            "safety": {"detector": "none"},
        }
    )
    with pytest.raises(
        SpecError,
        match=r"holds 1 file\(s\) but no _job.json that sdfleet wrote \(e.g. _job.json\): it is not "
        r"an sdfleet output",
    ):
        OutputSink(Storage(str(out))).judge(Planner(spec).plan())
    assert (out / layout.JOB_FILE).read_text() == '{"job": "someone else\'s"}'

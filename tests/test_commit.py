"""Exactly-once when writers disagree: the commit protocol of `sdfleet.actors.writer`.

The invariant: for two (and three) writers of one shard, each with different bytes (as two batch
sizes or two GPU types make), for every interleaving of their steps and a crash of any writer after
any step, the end state is either no commit (and nothing visible under the shard's names) or a commit
whose stats describe, by size and sha256, exactly the tar and Parquet on storage, with every row
once. After a schedule has run, whoever looks next rolls a commit forward (`publish_committed`), as
`status`, a rerun and the finalizer do. On the local filesystem and on the local S3 server over HTTP.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import tarfile
import threading
import uuid
from collections import Counter

import pyarrow.parquet as pq
import pytest

from sdfleet.actors.storage import Storage
from sdfleet.actors.writer import (
    ShardCommit,
    ShardWriter,
    Spooled,
    committed_file_problems,
    publish_committed,
)
from sdfleet.schemas import layout
from sdfleet.schemas.layout import ShardStats
from sdfleet.schemas.rows import output_schema

SHARD = "00000"
KEYS = [f"{SHARD}{i:04d}" for i in range(3)]
FILES = (layout.tar_file(SHARD), layout.parquet_file(SHARD))
STEPS = 2 * len(FILES) + 1  # stage each file, commit, publish or discard each file


def stats_for(writer: int, spooled: Spooled) -> ShardStats:
    return ShardStats(
        shard=SHARD,
        shard_id=0,
        fingerprint="f" * 32,
        samples=3,
        ok=3,
        filtered=0,
        failed=0,
        images_in_tar=3,
        quarantined_images=0,
        flagged=0,
        flagged_by_class={},
        safety_detector="none",
        safety_model_sha256=None,
        attempt=1,
        batch_size=writer + 1,
        engine_speed_ups=[],
        dtype="float32",
        device="cpu",
        worker_node="node",
        worker_id=f"writer-{writer}",
        gpu_id=None,
        gen_seconds=0.0,
        gpu_seconds=0.0,
        images_per_gpu_hour=None,
        wall_seconds=0.0,
        started_at="",
        finished_at="",
        started_ts=0.0,
        generate_started_ts=0.0,
        generate_finished_ts=0.0,
        finished_ts=0.0,
        tar_sha256=spooled.sha256[FILES[0]],
        parquet_sha256=spooled.sha256[FILES[1]],
    )


@pytest.fixture(scope="module")
def spools():
    """Each writer's finished shard on local disk: its own image bytes and its own worker_id column."""
    made = []
    for w in range(3):
        rows = [
            {
                "key": k,
                "shard_id": 0,
                "status": "ok",
                "prompt": f"prompt {k}",
                "worker_id": f"writer-{w}",
            }
            for k in KEYS
        ]
        images = {k: f"writer {w}, image {k}; ".encode() * (40 + w) for k in KEYS}
        made.append(ShardWriter(None, "png").spool(SHARD, rows, images, output_schema()))
    yield made
    for s in made:
        s.close()


def storage_maker(where: str, request, tmp_path):
    """A function that returns an empty output folder (a new one each call), local or on S3."""
    if where == "s3":
        bucket = request.getfixturevalue("s3").bucket
        return lambda: Storage(f"s3://{bucket}/{uuid.uuid4().hex[:12]}")
    return lambda: Storage(str(tmp_path / uuid.uuid4().hex[:12]))


@pytest.fixture(params=["local", "s3"])
def new_storage(request, tmp_path):
    return storage_maker(request.param, request, tmp_path)


def check_end_state(storage: Storage) -> str:
    """Roll forward as the next reader would, then check the invariant. Returns who committed."""
    visible = set(storage.list("*"))
    if layout.stats_file(SHARD) not in visible:
        assert not visible & set(FILES), "shard files visible without a commit"
        return "no commit"
    stats = ShardStats.model_validate(storage.read_json(layout.stats_file(SHARD)))
    publish_committed(
        storage, stats
    )  # it also checks each file's size (and S3 ETag) against the stats
    assert set(stats.files) == set(FILES)
    data = {name: storage.read_bytes(name) for name in FILES}
    for name, content in data.items():
        assert (len(content), hashlib.sha256(content).hexdigest()) == (
            stats.files[name].size,
            stats.files[name].sha256,
        ), name
    rows = pq.read_table(io.BytesIO(data[layout.parquet_file(SHARD)])).to_pylist()
    assert [r["key"] for r in rows] == KEYS and {r["worker_id"] for r in rows} == {stats.worker_id}
    with tarfile.open(fileobj=io.BytesIO(data[layout.tar_file(SHARD)])) as tar:
        assert sorted(tar.getnames()) == sorted(
            f"{k}.{e}" for k in KEYS for e in ("png", "txt", "json")
        )
    return stats.worker_id


def run_schedule(
    storage: Storage, spools: list[Spooled], schedule: list[int], per_turn: list[int]
) -> str:
    """Advance writer `schedule[i]` by `per_turn[j]` steps at its j-th turn; writers with turns left
    when the schedule ends have crashed there."""
    writers = sorted(set(schedule))
    steps = {
        w: ShardCommit(storage, SHARD, spools[w], stats_for(w, spools[w])).steps() for w in writers
    }
    turns = Counter()
    for w in schedule:
        for _ in range(per_turn[turns[w]]):
            next(steps[w])
        turns[w] += 1
    return check_end_state(storage)


def interleavings(lengths: list[int]):
    """Every order of turns for writers with these numbers of turns (writer w appears lengths[w] times)."""

    def extend(prefix, left):
        if not any(left):
            yield prefix
            return
        for w, n in enumerate(left):
            if n:
                yield from extend(prefix + [w], left[:w] + [n - 1] + left[w + 1 :])

    yield from extend([], list(lengths))


def schedules(writers: int, turns: int):
    """Every interleaving of every crash: each writer stops after any number of its turns (all = no crash)."""
    for stops in itertools.product(range(turns + 1), repeat=writers):
        yield from interleavings(list(stops))


# Turns: how many steps of `ShardCommit.steps()` a writer takes at each of its turns. Staging a file
# touches only that writer's own invisible upload (its own temp file), so staging steps commute
# with every step of the other writers: after the fine-grained run on the local filesystem, the
# S3 run and the three-writer runs stage both files in one turn, and the three writers all stage
# before the first commit. A writer that dies while staging leaves only invisible leftovers.
FINE = [1] * STEPS  # stage tar, stage Parquet, commit, publish/discard tar, publish/discard Parquet
STAGE_AS_ONE = [len(FILES), 1, 1, 1]  # stage both, commit, publish/discard tar, then Parquet


@pytest.mark.slow
@pytest.mark.parametrize(
    "where, turns, expected",
    [
        ("local", FINE, 923),
        ("s3", STAGE_AS_ONE, 251),
    ],
)
def test_two_writers_every_interleaving_and_every_crash(
    where, turns, expected, request, tmp_path, spools
):
    new_storage = storage_maker(where, request, tmp_path)
    outcomes = Counter(
        run_schedule(new_storage(), spools, s, turns) for s in schedules(2, len(turns))
    )
    assert sum(outcomes.values()) == expected
    assert outcomes["no commit"] and outcomes["writer-0"] and outcomes["writer-1"]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_three_writers_every_interleaving_and_every_crash(where, request, tmp_path, spools):
    """All three stage first; then each commits and publishes (or discards) both files, or dies
    before either."""
    new_storage = storage_maker(where, request, tmp_path)
    outcomes = Counter()
    for schedule in schedules(3, 2):
        storage = new_storage()
        outcomes[
            run_schedule(storage, spools, [0, 1, 2] + schedule, [len(FILES), 1, len(FILES)])
        ] += 1
    assert sum(outcomes.values()) == 271
    assert {"writer-0", "writer-1", "writer-2", "no commit"} <= set(outcomes)


def test_racing_threads_commit_once_and_all_agree_on_the_winner(new_storage, spools):
    storage = new_storage()
    results = [None] * 3

    def write(w: int) -> None:
        results[w] = ShardWriter(storage, "png").commit(SHARD, spools[w], stats_for(w, spools[w]))

    threads = [threading.Thread(target=write, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winner = check_end_state(storage)
    assert {r.worker_id for r in results} == {winner}
    assert committed_file_problems(storage, results[0], deep=True) == []


def test_staged_files_are_invisible_until_published(new_storage, spools):
    storage = new_storage()
    attempt = ShardCommit(storage, SHARD, spools[0], stats_for(0, spools[0]))
    steps = attempt.steps()
    for _ in range(len(FILES) + 1):  # staged and committed, not yet published
        next(steps)
    assert storage.list("*.tar") == [] and storage.list("*.parquet") == []
    assert storage.exists(layout.stats_file(SHARD))
    assert check_end_state(storage) == "writer-0"  # the next reader publishes it


def test_a_lost_writers_leftovers_are_discarded_and_the_winners_kept(new_storage, spools):
    storage = new_storage()
    winner = ShardCommit(storage, SHARD, spools[0], stats_for(0, spools[0]))
    for _ in winner.steps():
        pass
    crashed = ShardCommit(storage, SHARD, spools[1], stats_for(1, spools[1]))
    next(crashed.steps())  # staged its tar, then died
    referenced = {s.upload_id or s.temp for s in winner.result.files.values()}
    assert storage.discard_leftovers(referenced) == 1
    assert storage.discard_leftovers(referenced) == 0
    assert check_end_state(storage) == "writer-0"


def test_local_files_and_their_folder_reach_the_disk_before_the_commit(
    tmp_path, spools, monkeypatch
):
    """A power cut after the stats file exists must not leave a commit whose files are lost: the
    staged tar and Parquet, and the folder naming them, are fsynced before the stats file is made."""
    import os

    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    storage = Storage(str(tmp_path / "out"))
    steps = ShardCommit(storage, SHARD, spools[0], stats_for(0, spools[0])).steps()
    for _ in FILES:
        next(steps)
    staged = [n for n in synced if n.endswith(".staged")]
    assert sorted(n.split("/")[-1].split(".")[1] for n in staged) == [
        "00000",
        "00000",
    ]  # tar and Parquet
    assert str(tmp_path / "out") in synced  # the folder, so the staged names survive a crash too
    next(steps)  # the commit
    assert storage.exists(layout.stats_file(SHARD))


def test_status_finds_a_committed_file_that_was_changed_and_verify_finds_same_size_tampering(
    tmp_path, spools
):
    from helpers import run_cli
    from sdfleet.jobs.output import OutputReader

    storage = Storage(str(tmp_path / "out"))
    storage.write_json(
        layout.JOB_FILE,
        {
            "spec": {"name": "t"},
            "fingerprint": "f" * 32,
            "num_shards": 1,
            "num_samples": 3,
            "key_width": 5,
        },
    )
    ShardWriter(storage, "png").commit(SHARD, spools[0], stats_for(0, spools[0]))
    assert OutputReader(storage).verify(deep=True) == {}
    tar = tmp_path / "out" / layout.tar_file(SHARD)
    tar.write_bytes(bytes(len(tar.read_bytes())))  # same size, other bytes
    assert OutputReader(storage).verify() == {}
    [problem] = OutputReader(storage).verify(deep=True)[SHARD]
    assert str(tar) in problem and "sha256" in problem
    done = run_cli("status", str(tmp_path / "out"), "--verify")
    assert done.returncode == 2 and f"shard {SHARD}: {tar}" in done.stdout
    tar.write_bytes(b"truncated")
    assert run_cli("status", str(tmp_path / "out")).returncode == 2
    [problem] = OutputReader(storage).verify()[SHARD]
    assert "has 9 bytes; its commit says" in problem


# ------------------------------------------------------------------ ambiguous outcomes


def test_a_commit_whose_answer_was_lost_on_s3_is_won_by_reading_the_stats(s3, s3_endpoint, spools):
    """The stats file's conditional PUT reaches S3, its answer is lost (the proxy closes the
    connection unanswered), the client sends it again and gets 412: the writer reads the stats,
    finds its own id, and publishes its files instead of discarding them."""
    from s3proxy import Rule, S3Proxy

    proxy = S3Proxy(
        s3_endpoint,
        [
            Rule(
                path=r"/lost/\d+_stats\.json$",
                action="drop_response",
                methods=("PUT",),
                header="If-None-Match",
                times=1,
            )
        ],
    )
    try:
        storage = Storage(f"s3://{s3.bucket}/lost", {"endpoint_url": proxy.url})
        result = ShardWriter(storage, "png").commit(SHARD, spools[0], stats_for(0, spools[0]))
        assert proxy.rules[0].fired == 1
    finally:
        proxy.close()
    direct = Storage(f"s3://{s3.bucket}/lost")
    assert sorted(direct.list("00000.*")) == sorted(FILES)  # published by the writer itself
    assert (
        result.worker_id == "writer-0" and committed_file_problems(direct, result, deep=True) == []
    )
    assert check_end_state(direct) == "writer-0"


def test_a_local_link_answered_eexist_after_it_succeeded_is_won(tmp_path, spools, monkeypatch):
    """The local twin: `link` makes the stats file and then answers EEXIST (an NFS retransmit of a
    link that had succeeded). The seam is os.link itself, for stats files only."""
    import errno
    import os

    real_link, fired = os.link, []

    def link_then_eexist(src, dst, *args, **kwargs):
        real_link(src, dst, *args, **kwargs)
        if str(dst).endswith("_stats.json") and not fired:
            fired.append(dst)
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))

    monkeypatch.setattr(os, "link", link_then_eexist)
    storage = Storage(str(tmp_path / "out"))
    result = ShardWriter(storage, "png").commit(SHARD, spools[0], stats_for(0, spools[0]))
    assert fired and result.worker_id == "writer-0"
    assert sorted(storage.list("00000*")) == sorted([*FILES, layout.stats_file(SHARD)])
    assert list((tmp_path / "out").glob(".*")) == []  # nothing left staged
    assert check_end_state(storage) == "writer-0"


def test_a_stats_file_of_another_job_is_an_error_naming_it(new_storage, spools):
    from sdfleet.actors.writer import ForeignCommit

    storage = new_storage()
    other = stats_for(1, spools[1]).model_copy(update={"fingerprint": "e" * 32})
    storage.write_json(layout.stats_file(SHARD), other.model_dump(mode="json"))
    with pytest.raises(ForeignCommit) as refused:
        ShardWriter(storage, "png").commit(SHARD, spools[0], stats_for(0, spools[0]))
    assert storage.url(layout.stats_file(SHARD)) in str(refused.value)
    assert "e" * 32 in str(refused.value) and "f" * 32 in str(refused.value)
    assert storage.list("00000.*") == []  # neither published nor adopted


def test_a_commit_whose_staged_files_are_gone_says_how_to_clear_it(tmp_path, spools):
    """A writer died between its commit and its publish, and its staged files went (a bucket's
    lifecycle rule aborts old uploads): no reader can roll it forward. Each says so in one line
    naming `sdfleet withdraw`, which takes the commit back (and refuses a good shard); the shard
    is then pending again."""
    from helpers import run_cli
    from sdfleet.actors.writer import UnpublishableCommit
    from sdfleet.jobs.output import OutputReader

    out = tmp_path / "out"
    storage = Storage(str(out))
    storage.write_json(
        layout.JOB_FILE,
        {
            "spec": {"name": "t"},
            "fingerprint": "f" * 32,
            "num_shards": 1,
            "num_samples": 3,
            "key_width": 5,
        },
    )
    good = run_cli("withdraw", str(out), SHARD)
    assert good.returncode == 1 and "not committed" in good.stderr
    attempt = ShardCommit(storage, SHARD, spools[0], stats_for(0, spools[0]))
    steps = attempt.steps()
    for _ in range(len(FILES) + 1):  # staged and committed; then the writer died
        next(steps)
    for final, staged in attempt.staged.items():
        storage.discard(final, staged)
    command = f"sdfleet withdraw {storage.url()} {SHARD}"
    with pytest.raises(UnpublishableCommit, match=command):
        publish_committed(
            storage, ShardStats.model_validate(storage.read_json(layout.stats_file(SHARD)))
        )
    [problem] = OutputReader(storage).verify()[SHARD]
    assert problem.startswith(storage.url(SHARD)) and " is missing, and the staged file" in problem
    status = run_cli("status", str(out))
    assert status.returncode == 2 and command in status.stdout and "Traceback" not in status.stderr
    done = run_cli("withdraw", str(out), SHARD)
    assert done.returncode == 0, done.stderr
    assert f"withdrew shard {SHARD}" in done.stdout
    assert not storage.exists(layout.stats_file(SHARD))
    assert OutputReader(storage).survey().pending == [SHARD]


def test_withdraw_refuses_a_good_shard(tmp_path, spools):
    from helpers import run_cli

    out = tmp_path / "out"
    storage = Storage(str(out))
    storage.write_json(
        layout.JOB_FILE,
        {
            "spec": {"name": "t"},
            "fingerprint": "f" * 32,
            "num_shards": 1,
            "num_samples": 3,
            "key_width": 5,
        },
    )
    ShardWriter(storage, "png").commit(SHARD, spools[0], stats_for(0, spools[0]))
    refused = run_cli("withdraw", str(out), SHARD)
    assert refused.returncode == 1 and "a good commit is never withdrawn" in refused.stderr
    assert storage.exists(layout.stats_file(SHARD))

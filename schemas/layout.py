"""The output folder: the name of every file sdfleet writes, and the schemas of its JSON records.

This module is the one owner of the layout. Writers (actors) and readers (status, preview, score,
the finalizer) import the names from here; none spells a file name itself.

    OUTPUT/
      _job.json                the job record: resolved spec, fingerprint, input files, versions
      _driver.json             the lease of the driver running the job (host, pid, last refresh)
      _spent.json              `UncommittedSpend`: GPU-seconds of attempts that committed nothing
      {shard}.tar              {key}.{ext} image, {key}.txt prompt, {key}.json row; none for a
                               shard that kept no image (never an empty tar)
      {shard}.parquet          one row per planned sample
      {shard}_stats.json       `ShardStats`; written LAST: its presence = the shard is committed
      {shard}_failed.json      `FailedShard`; only for a quarantined shard
      quarantine/{shard}.tar   images flagged under safety.action=quarantine, with
      quarantine/{shard}.parquet   their rows
      img_emb/img_emb_{shard}.npy  curation.save_embeddings: the CLIP image embedding of each image
      metadata/metadata_{shard}.parquet  in the tar (float16, L2-normalized), and their keys in the
                               same order: the layout clip-retrieval writes and autofaiss reads
      sizes.json               {"00000.tar": images in it, ...} for every tar; only when complete
      README.md                the dataset card; only when complete
      preview/                 previews: contact_sheet.png, xy_*.png, index.html, the card's sheet
      _scores/                 `sdfleet score`: {name}.parquet, {name}_summary.json, the FID plot
      _dedup/                  `sdfleet dedup`: {name}.parquet (one row per flagged image: a
                               near-duplicate, or contaminated by an evaluation set), {name}_summary.json
      _index/stats-*.parquet   a cache of the stats files' contents, each entry valid only while its
                               file's listing tag is the one recorded (status reads it, not 100k files)
      _SUCCESS                 written last of all, only when every planned sample has its row
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict

JOB_FILE = "_job.json"
# Which driver runs the job now: refreshed while it runs, released when it ends.
DRIVER_FILE = "_driver.json"
SUCCESS_FILE = "_SUCCESS"
# The GPU-seconds of attempts that committed nothing (failed, lost a race, timed out, died), which
# the budget counts beside the committed shards' own; written only once there are any.
SPENT_FILE = "_spent.json"
SIZES_FILE = "sizes.json"
CARD_FILE = "README.md"
QUARANTINE_DIR = "quarantine"
PREVIEW_DIR = "preview"
# clip-retrieval's folder names, so its tools and autofaiss read the embeddings where they are.
EMBEDDINGS_DIR = "img_emb"
EMBEDDINGS_METADATA_DIR = "metadata"
# Objects a run writes and deletes at once to learn what the store does (exclusive create, write
# access); one left behind by a crash is not an output file. At the top, not in a folder: a local
# folder emptied by one worker could vanish under another worker's probe.
PROBE_PREFIX = "_probe-"


def is_transient(name: str) -> bool:
    """A name sdfleet uses while writing, never an output file: a probe, a local write's hidden temp
    file, a staged file not yet published."""
    base = name.rsplit("/", 1)[-1]
    return base.startswith(PROBE_PREFIX) or (
        base.startswith(".") and base.endswith((".tmp", ".staged"))
    )


# A small sample of the images, embedded in the dataset card.
CARD_SHEET = f"{PREVIEW_DIR}/card_contact_sheet.png"
CONTACT_SHEET = f"{PREVIEW_DIR}/contact_sheet.png"
GALLERY_PAGE = f"{PREVIEW_DIR}/index.html"

INDEX_DIR = "_index"


def index_file(stamp: str) -> str:
    return f"{INDEX_DIR}/stats-{stamp}.parquet"


def is_index_file(name: str) -> bool:
    return name.startswith(f"{INDEX_DIR}/stats-") and name.endswith(".parquet")


_STATS_SUFFIX = "_stats.json"
_FAILED_SUFFIX = "_failed.json"
STATS_GLOB = f"*{_STATS_SUFFIX}"
FAILED_GLOB = f"*{_FAILED_SUFFIX}"

# image_format (the spec's word) -> the tar member's extension (the WebDataset key readers match on).
IMAGE_EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}
# Extension -> MIME type, for every extension an image file may carry (reference folders use .jpeg too).
MIME_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
# Content types of what an output holds, so a browser shows the gallery and the card instead of
# downloading them (S3 serves binary/octet-stream otherwise).
CONTENT_TYPES = {
    **MIME_TYPES,
    "tar": "application/x-tar",
    "parquet": "application/vnd.apache.parquet",
    "json": "application/json",
    "html": "text/html; charset=utf-8",
    "md": "text/markdown; charset=utf-8",
}


def content_type(name: str) -> str:
    return CONTENT_TYPES.get(name.rsplit(".", 1)[-1].lower(), "application/octet-stream")


def tar_file(shard: str) -> str:
    return f"{shard}.tar"


def parquet_file(shard: str) -> str:
    return f"{shard}.parquet"


def stats_file(shard: str) -> str:
    return f"{shard}{_STATS_SUFFIX}"


def failed_file(shard: str) -> str:
    return f"{shard}{_FAILED_SUFFIX}"


def quarantine_tar(shard: str) -> str:
    return f"{QUARANTINE_DIR}/{shard}.tar"


def quarantine_parquet(shard: str) -> str:
    return f"{QUARANTINE_DIR}/{shard}.parquet"


def embeddings_file(shard: str) -> str:
    return f"{EMBEDDINGS_DIR}/img_emb_{shard}.npy"


def embeddings_metadata_file(shard: str) -> str:
    return f"{EMBEDDINGS_METADATA_DIR}/metadata_{shard}.parquet"


def xy_grid_file(x: str, y: str, prompt_id: str | None = None) -> str:
    """preview/xy_{x}_{y}.png; another prompt than the first adds a hash of its id (ids are free
    text, never part of a path). x and y are column names, checked by the caller."""
    suffix = "" if prompt_id is None else "_" + hashlib.sha256(prompt_id.encode()).hexdigest()[:10]
    return f"{PREVIEW_DIR}/xy_{x}_{y}{suffix}.png"


# `sdfleet score`'s folder: the top level holds only the dataset's own files, so that a glob of
# OUTPUT/*.parquet reads exactly its rows; the underscore keeps pyarrow's and Spark's dataset
# discovery out of it, as it does for _index/.
SCORES_DIR = "_scores"


def score_files(name: str, folder: str = SCORES_DIR) -> dict[str, str]:
    """The files `sdfleet score --out NAME` writes into the output, by role. folder="": where
    sdfleet wrote them before they had a folder, the output's top level."""
    where = f"{folder}/" if folder else ""
    return {
        "scores": f"{where}{name}.parquet",
        "summary": f"{where}{name}_summary.json",
        "plot": f"{where}{name}_fid_vs_clip.png",
    }


# `sdfleet dedup`'s folder, beside _scores/ and for the same reason: the flags are about the dataset's
# rows, not rows of it, so no reader of OUTPUT/*.parquet may take them for rows.
DEDUP_DIR = "_dedup"


def dedup_files(name: str) -> dict[str, str]:
    """The files `sdfleet dedup --out NAME` writes into the output, by role."""
    return {"flags": f"{DEDUP_DIR}/{name}.parquet", "summary": f"{DEDUP_DIR}/{name}_summary.json"}


def image_member(key: str, image_format: str) -> str:
    return f"{key}.{IMAGE_EXTENSIONS[image_format]}"


class _Record(BaseModel):
    # A record another sdfleet wrote: unknown keys mean another version or a stray file, not ours.
    model_config = ConfigDict(extra="forbid")


class StagedFile(_Record):
    """One file of a shard's commit as its writer staged it: enough to publish it, and to check
    that what is visible under its name is it (see sdfleet.actors.writer)."""

    size: int
    sha256: str
    upload_id: str | None = None  # S3: the uncompleted multipart upload at the final key
    parts: list[str] | None = None  # S3: the ETag of each part, in order
    temp: str | None = None  # local: the hidden file beside the final name, renamed on publish


class ShardStats(_Record):
    """`{shard}_stats.json`: what one committed shard holds and how it was made."""

    shard: str
    shard_id: int
    fingerprint: str  # the job's; a stats file of another job does not commit this job's shard
    # Counts. samples = ok + filtered + failed (+ rejected + duplicate + skipped, with curation);
    # images_in_tar counts ok rows with an image.
    samples: int
    ok: int
    filtered: int
    failed: int
    rejected: int = 0
    duplicate: int = 0
    skipped: int = 0
    images_in_tar: int
    quarantined_images: int
    flagged: int
    flagged_by_class: dict[str, int]
    safety_detector: str
    safety_model_sha256: str | None
    # How it was made.
    attempt: int
    batch_size: int
    engine_speed_ups: list[str]  # what the engine applied in fact (compile `auto` may fall back)
    dtype: str
    device: str
    worker_node: str
    worker_id: str
    gpu_id: str | None
    # Time. gpu_seconds is the shard's turn on the pipeline: its reads and uploads overlap other
    # shards' turns, so it adds up over a worker without counting the overlap twice.
    gen_seconds: float
    gpu_seconds: float
    images_per_gpu_hour: float | None
    wall_seconds: float
    started_at: str
    finished_at: str
    # Seconds the worker spent per stage beside the pipeline: read (prompt rows, token counts),
    # score, curate (curation.*), encode, hash (per image), write (rows, tar and Parquet on local
    # disk), upload (staging them on storage). Wall time of the thread doing each: where a shard's
    # time beside the GPU goes.
    stage_seconds: dict[str, float] = {}
    # curation.*: the sha256 of each scoring model's files, by key (clip_model, aesthetic_model, nsfw_model).
    curation_models_sha256: dict[str, str] = {}
    # curation.* (sdfleet.actors.curation.tally): images that reached the gates, how many failed each,
    # and per sweep point the candidates generated and kept (with best-of-N, prompts short of k).
    gated: int = 0
    gate_failures: dict[str, int] = {}
    by_sweep_point: dict[str, dict[str, int]] = {}
    # Epoch seconds: throughput over a whole job, and the overlap of neighbouring shards.
    started_ts: float
    generate_started_ts: float
    generate_finished_ts: float
    finished_ts: float
    # What it commits: the writer, and each file it staged by final name (tar, Parquet and, under
    # safety.action=quarantine, the quarantine files). Empty for shards committed before sdfleet
    # staged files, which have only the two hashes. No tar_sha256: the shard kept no image, so it
    # has no tar.
    tar_sha256: str | None
    parquet_sha256: str
    writer_id: str | None = None
    files: dict[str, StagedFile] = {}


# ShardStats' counts and times that add up over shards, in the order the totals list them.
SUMMED = (
    "samples",
    "ok",
    "filtered",
    "failed",
    "rejected",
    "duplicate",
    "skipped",
    "images_in_tar",
    "quarantined_images",
    "flagged",
    "gpu_seconds",
    "gen_seconds",
)


@dataclass(frozen=True)
class JobTotals:
    """Counts and times summed over a job's committed shards: for status, the card and budgets.
    Each count of a status is named as the status is (`count(status)`)."""

    samples: int
    ok: int
    filtered: int
    failed: int
    rejected: int
    duplicate: int
    skipped: int
    images_in_tar: int
    quarantined_images: int
    flagged: int
    gpu_seconds: float
    gen_seconds: float
    flagged_by_class: dict[str, int]
    gated: int  # images that reached curation's gates
    gate_failures: dict[str, int]
    by_sweep_point: dict[str, dict[str, int]]  # label -> generated, ok (and short, prompts)
    images_per_gpu_hour: float | None
    dtypes: list[str]
    safety_model_sha256: list[str]

    @classmethod
    def add_up(cls, shards: Iterable[ShardStats]) -> JobTotals:
        shards = list(shards)
        summed = {k: round(sum(getattr(s, k) for s in shards), 3) for k in SUMMED}
        points: dict[str, dict[str, int]] = {}
        for s in shards:
            for label, counts in s.by_sweep_point.items():
                points[label] = _add_up([points.get(label, {}), counts])
        gpu_seconds = summed["gpu_seconds"]
        return cls(
            **summed,
            flagged_by_class=_add_up(s.flagged_by_class for s in shards),
            gated=sum(s.gated for s in shards),
            gate_failures=_add_up(s.gate_failures for s in shards),
            by_sweep_point=dict(sorted(points.items())),
            images_per_gpu_hour=(
                round(summed["ok"] / gpu_seconds * 3600, 1) if gpu_seconds else None
            ),
            dtypes=sorted({s.dtype for s in shards}),
            safety_model_sha256=sorted(
                {s.safety_model_sha256 for s in shards if s.safety_model_sha256}
            ),
        )

    def count(self, status: str) -> int:
        """The rows with this status (a `sdfleet.schemas.rows` STATUS_*); skipped included."""
        return getattr(self, status)


def _add_up(counts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in counts:
        for k, n in c.items():
            out[k] = out.get(k, 0) + n
    return dict(sorted(out.items()))


class UncommittedSpend(_Record):
    """`_spent.json`: what a job's attempts that committed nothing used of the GPUs, over all its
    runs; the committed shards' own GPU-seconds are in their stats files."""

    fingerprint: str
    gpu_seconds: float = 0.0
    attempts: int = 0


class ShardAttemptError(_Record):
    attempt: int
    error: str
    at: float


class FailedShard(_Record):
    """`{shard}_failed.json`: a shard quarantined after max_attempts, with every attempt's error."""

    shard_id: int
    attempts: int
    errors: list[ShardAttemptError]
    fingerprint: str

    def last_error_line(self) -> str:
        lines = self.errors[-1].error.strip().splitlines() if self.errors else []
        return lines[-1] if lines else "?"

"""One scoring of one output: score every ok image of the committed shards, summarise per sweep point, write."""

from __future__ import annotations

import io
import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from sdfleet.actors.model_cache import local_copy, weights_sha256
from sdfleet.actors.storage import Storage, json_bytes
from sdfleet.jobs.output import OutputReader, Survey, check_names_free, create_tool_file
from sdfleet.jobs.score import DEFAULT_FID_SIZE, DEFAULT_OUT, LOUD_NOTE, ScoreError
from sdfleet.jobs.score.clip import ClipScorer
from sdfleet.jobs.score.fid import SweepFID, fid_array
from sdfleet.jobs.score.inception import load_feature_extractor
from sdfleet.jobs.score.plot import plot_fid_vs_clip
from sdfleet.jobs.score.sanity import model_notes
from sdfleet.schemas import layout
from sdfleet.schemas.rows import OUTPUT_FIELDS, STATUS_OK

log = logging.getLogger("sdfleet")

# The columns of a dataset row that identify a scored image in NAME.parquet, ahead of its sweep columns.
ID_COLUMNS = ("key", "shard_id", "sample_id", "prompt_id", "seed")


def run_score(
    output: str,
    clip_model: str,
    reference: str | None,
    out: str | None = None,
    batch_size: int = 32,
    device: str | None = None,
    *,
    fid_weights: str | None = None,
    fid_size: int = DEFAULT_FID_SIZE,
    note: str | None = None,
    storage_options: dict[str, Any] | None = None,
    workers: int = 4,
) -> dict[str, Any]:
    """Score an sdfleet output; write NAME.parquet, NAME_summary.json, NAME_fid_vs_clip.png into
    its _scores/ folder (layout.score_files).

    Args:
        output: the sdfleet output folder (local or s3://) holding `_job.json`, tars and Parquet.
        clip_model: a transformers CLIP checkpoint (CLIPModel + CLIPProcessor files, safetensors
            weights): a local folder, an s3:// folder (copied once per node) or a hub id (only if the
            hub or its cache is reachable). torchmetrics' CLIPScore default is openai/clip-vit-large-patch14.
        reference: folder (local or s3://) of reference images for FID, e.g. COCO val2017; every
            *.png|jpg|jpeg|webp directly in it. None skips FID.
        out: base name of the files written into `output`'s _scores/ (default "scores").
        batch_size: images per CLIP / Inception forward.
        device: "cuda" or "cpu" (default: cuda when available).
        fid_weights: the FID InceptionV3 weights as .safetensors (local or s3://); None skips FID.
        fid_size: side every image is centre-cropped and resized to before the feature extractor.
        note: free text added to the summary's notes and to the plot.
        storage_options: fsspec options for output, reference and s3:// models (default: environment).
        workers: threads that read and decode images.

    Returns the summary dict (also written as NAME_summary.json).
    """
    name = out or DEFAULT_OUT
    if not name or name.startswith("/") or ".." in name.split("/"):
        raise ScoreError(f"--out {out!r}: give a plain file name stem such as 'scores'")
    if batch_size < 1:
        raise ScoreError(f"--batch-size {batch_size}: must be >= 1")
    if bool(reference) != bool(fid_weights):
        raise ScoreError(
            "FID needs both --reference (the real images) and --fid-weights (the InceptionV3 "
            "weights as .safetensors); give both, or neither to compute CLIP scores only"
        )
    run = ScoreRun(
        OutputReader.open(output, storage_options),
        clip_model,
        reference,
        fid_weights,
        name=name,
        batch_size=batch_size,
        device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
        fid_size=fid_size,
        note=note,
        storage_options=storage_options,
        workers=workers,
    )
    return run.run()


class ScoreRun:
    """The steps of `run_score`, each a method; the state they share is all set here."""

    def __init__(
        self,
        reader: OutputReader,
        clip_model: str,
        reference: str | None,
        fid_weights: str | None,
        *,
        name: str,
        batch_size: int,
        device: str,
        fid_size: int,
        note: str | None,
        storage_options: dict[str, Any] | None,
        workers: int,
    ):
        self.started = time.time()
        self.reader = reader
        self.job = reader.job  # NotAnOutput here, before any model loads
        self.clip_source = clip_model
        self.reference = reference
        self.fid_weights = fid_weights
        self.name = name
        self.files = layout.score_files(name)
        # Before any model loads: a rerun under the same name would replace the earlier scores.
        check_names_free(reader.storage, self.files.values(), name)
        self.batch_size = batch_size
        self.device = device
        self.fid_size = fid_size
        self.note = note
        self.storage_options = storage_options
        self.pool = ThreadPoolExecutor(max(1, workers))
        # Seeds are not an axis: all seeds of a point count together.
        axes = list(self.job["spec"]["sweep"]["axes"])
        self.group_cols = ["guidance_scale"] + [a for a in axes if a != "guidance_scale"]
        # Set by the steps.
        self.clip: ClipScorer | None = None
        self.fid: SweepFID | None = None  # None: FID not computed
        self.fid_info: dict[str, Any] = {"weights": fid_weights, "size": fid_size}
        self.model_notes: list[str] = []
        self.results: list[dict[str, Any]] = []
        self.missing_images = 0

    def run(self) -> dict[str, Any]:
        survey = self.reader.survey()
        if not survey.complete:
            log.warning(
                "%s is not complete: scoring the %d committed shards only",
                self.reader.storage.url(),
                len(survey.committed),
            )
        self.load_models()
        with self.pool:
            if self.fid:
                self.fid.read_reference(
                    Storage(self.reference, self.storage_options), self.fid_size, self.pool
                )
            self.score_shards()
        points = self.points()
        summary = self.summary(survey, points)
        self.write(summary, points)
        return summary

    # ------------------------------------------------------------------ models

    def load_models(self) -> None:
        self.clip = ClipScorer(self.clip_source, self.device, self.storage_options)
        if self.reference:
            extractor = load_feature_extractor(self.fid_weights, self.device, self.storage_options)
            self.fid_info.update(
                arch=extractor.arch,
                num_features=extractor.num_features,
                sha256=weights_sha256(local_copy(self.fid_weights, self.storage_options)),
            )
            self.fid = SweepFID(extractor, self.device, self.batch_size)
        self.model_notes = model_notes(self.clip.info, self.fid.extractor if self.fid else None)

    # ------------------------------------------------------------------ images

    def score_shards(self) -> None:
        """Score every ok image of the committed shards, `batch_size` at a time across shard ends."""
        batch: list[tuple[dict[str, Any], bytes]] = []
        for shard in self.reader.shards:
            for item in self.ok_images(shard):
                batch.append(item)
                if len(batch) >= self.batch_size:
                    self.score_batch(batch)
                    batch = []
            log.info("scored shard %s (%d images so far)", shard, len(self.results) + len(batch))
        if batch:
            self.score_batch(batch)

    def ok_images(self, shard: str) -> Iterator[tuple[dict[str, Any], bytes]]:
        """(row, encoded image) for every ok row of the shard, streamed from its tar."""
        rows = {r["key"]: r for r in self.reader.rows(shard) if r["status"] == STATUS_OK}
        if not rows:
            return
        found = 0
        for key, _, data in self.reader.stream_images(layout.tar_file(shard), set(rows)):
            found += 1
            yield rows[key], data
        if found < len(rows):
            log.warning(
                "%s: %d ok rows have no image in %s",
                shard,
                len(rows) - found,
                layout.tar_file(shard),
            )
            self.missing_images += len(rows) - found

    def score_batch(self, batch: list[tuple[dict[str, Any], bytes]]) -> None:
        decoded = list(self.pool.map(self.decode, [data for _, data in batch]))
        scores = self.clip.scores(
            [pixels for pixels, _ in decoded], [row["prompt"] or "" for row, _ in batch]
        )
        for (row, _), (_, array), score in zip(batch, decoded, scores):
            record = {c: row[c] for c in ID_COLUMNS}
            record.update({c: row.get(c) for c in self.group_cols})
            record["clip_score"] = float(score)
            record["safety_flagged"] = row.get("safety_flagged")
            self.results.append(record)
            if self.fid:
                self.fid.add(self.point_of(record), array)

    def decode(self, data: bytes) -> tuple[torch.Tensor, np.ndarray | None]:
        """Encoded image -> (CLIP pixel values, FID uint8 array or None); runs in worker threads."""
        with Image.open(io.BytesIO(data)) as im:
            rgb = im.convert("RGB")
        return self.clip.pixel_values(rgb), (fid_array(rgb, self.fid_size) if self.fid else None)

    # ------------------------------------------------------------------ summary

    def point_of(self, record: dict[str, Any]) -> tuple:
        return tuple(record.get(c) for c in self.group_cols)

    def points(self) -> list[dict[str, Any]]:
        """Per sweep point: n, mean and std CLIP score, and FID (None when not computed)."""
        clip_scores: dict[tuple, list[float]] = defaultdict(list)
        for record in self.results:
            clip_scores[self.point_of(record)].append(record["clip_score"])
        points = []
        for key in sorted(clip_scores, key=sweep_order):
            values = np.asarray(clip_scores[key], dtype=np.float64)
            point = dict(zip(self.group_cols, key))
            point.update(
                n=int(values.size),
                clip_score_mean=float(values.mean()),
                clip_score_std=float(values.std()),
                fid=None,
            )
            if self.fid and values.size < 2:
                point["fid_error"] = "fewer than 2 images"
            elif self.fid:
                point["fid"] = self.fid.compute(key)
            points.append(point)
        return points

    def notes(self, survey: Survey, flagged: int) -> list[str]:
        """What a reader of the figures must know, the loudest first."""
        notes = []
        if self.model_notes:
            notes.append(f"{LOUD_NOTE}: " + "; ".join(self.model_notes))
        if not self.fid:
            notes.append("FID not computed: no --reference and --fid-weights given")
        if self.note:
            notes.append(self.note)
        if self.missing_images:
            notes.append(f"{self.missing_images} ok rows had no image in their tar")
        if not survey.complete:
            notes.append(
                f"dataset incomplete: scored the {len(survey.committed)} committed shards of "
                f"{survey.num_shards}"
            )
        if flagged:
            notes.append(
                f"{flagged} scored images were flagged by the safety detector (with action blackout they "
                "are black images, which FID counts)"
            )
        return notes

    def summary(self, survey: Survey, points: list[dict[str, Any]]) -> dict[str, Any]:
        flagged = sum(1 for r in self.results if r.get("safety_flagged"))
        notes = self.notes(survey, flagged)
        return {
            "output": self.reader.storage.url(),
            "job_name": self.job["spec"].get("name"),
            "job_fingerprint": self.job.get("fingerprint"),
            "dataset_complete": survey.complete,
            "shards_scored": len(survey.committed),
            "images_scored": len(self.results),
            "missing_images": self.missing_images,
            "safety_flagged_images": flagged,
            "group_by": self.group_cols,
            "sweep_axes": self.job["spec"]["sweep"]["axes"],
            "clip_model": self.clip.info,
            "fid": {
                **self.fid_info,
                "computed": bool(self.fid),
                "reference": self.reference,
                "reference_images": self.fid.reference_images if self.fid else 0,
                "implementation": "torchmetrics.image.fid.FrechetInceptionDistance",
            },
            "clip_score_definition": "max(100 * cos(image_embeds, text_embeds), 0), as torchmetrics CLIPScore",
            "device": self.device,
            "figures_meaningful": not self.model_notes,
            "note": notes[0] if notes else None,
            "notes": notes,
            "points": points,
            "files": {
                "scores": self.files["scores"],
                "summary": self.files["summary"],
                "plot": None,
            },
            "seconds": None,
        }

    # ------------------------------------------------------------------ write

    def write(self, summary: dict[str, Any], points: list[dict[str, Any]]) -> None:
        """NAME.parquet, the plot when there is an FID to plot, and NAME_summary.json last."""
        storage = self.reader.storage
        buf = io.BytesIO()
        pq.write_table(
            pa.Table.from_pylist(self.results, schema=scores_schema(self.group_cols)), buf
        )
        create_tool_file(storage, self.files["scores"], buf.getvalue(), self.name)
        if self.fid and any(p["fid"] is not None for p in points):
            plot = plot_fid_vs_clip(points, self.group_cols, summary)
            create_tool_file(storage, self.files["plot"], plot, self.name)
            summary["files"]["plot"] = self.files["plot"]
        summary["seconds"] = round(time.time() - self.started, 2)
        create_tool_file(storage, self.files["summary"], json_bytes(summary), self.name)
        log.info("wrote %s", ", ".join(storage.url(f) for f in summary["files"].values() if f))
        retire_top_level_scores(storage, self.name)


def retire_top_level_scores(storage: Storage, name: str) -> None:
    """An earlier sdfleet wrote NAME.parquet and its companions at the output's top level, where
    the dataset's row readers (OUTPUT/*.parquet) took the scores for rows. Once this scoring's
    files are in _scores/, those are removed; only a Parquet file that is a scores file (a
    clip_score, no status) and its companions, never a shard's."""
    old = layout.score_files(name, folder="")
    if not storage.exists(old["scores"]):
        return
    columns = pq.read_schema(io.BytesIO(storage.read_bytes(old["scores"]))).names
    if "clip_score" not in columns or "status" in columns:
        return
    for f in old.values():
        if storage.exists(f):
            storage.delete(f)
    log.warning(
        "removed %s and its summary and plot, written at the output's top level by an earlier "
        "sdfleet: this scoring's files are in %s/",
        storage.url(old["scores"]),
        layout.SCORES_DIR,
    )


def sweep_order(point: tuple) -> tuple:
    """Sort key for sweep points: None last, and values of different types never compared."""
    return tuple((v is None, type(v).__name__, 0 if v is None else v) for v in point)


def scores_schema(group_cols: list[str]) -> pa.Schema:
    """NAME.parquet: the id columns, the sweep columns typed as in the dataset, clip_score, safety_flagged."""
    types = {f.name: f.type for f in OUTPUT_FIELDS}
    fields = [
        pa.field("key", pa.string()),
        pa.field("shard_id", pa.int64()),
        pa.field("sample_id", pa.string()),
        pa.field("prompt_id", pa.string()),
        pa.field("seed", pa.int64()),
    ]
    fields += [pa.field(c, types.get(c, pa.string())) for c in group_cols]
    fields += [pa.field("clip_score", pa.float64()), pa.field("safety_flagged", pa.bool_())]
    return pa.schema(fields)

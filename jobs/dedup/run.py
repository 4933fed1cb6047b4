"""One dedup pass over one output: read its embeddings in shard order, flag near-duplicates and
contaminated images, write the flags and a summary into its _dedup/ folder."""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sdfleet.actors.storage import Storage, json_bytes
from sdfleet.jobs.dedup import (
    DEFAULT_OUT,
    DEFAULT_THRESHOLD,
    REASON_CONTAMINATED,
    REASON_DUPLICATE,
    DedupError,
    threshold_value,
)
from sdfleet.jobs.output import OutputReader, Survey, check_names_free, create_tool_file
from sdfleet.schemas import layout
from sdfleet.schemas.locations import is_remote

log = logging.getLogger("sdfleet")

# Rows of the output compared at once: a block's similarities to 4096 kept (or evaluation) rows
# are 64 MiB of float32.
BLOCK_ROWS = 4096
# Renormalized float16 embeddings of one image give a cosine of 1 within float32 rounding, which
# may land just under 1: --threshold 1 must still catch exact copies.
TOLERANCE = 1e-6

FLAGS_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("prompt_id", pa.string()),
        ("reason", pa.string()),
        ("match", pa.string()),
        ("match_source", pa.string()),
        ("match_index", pa.int64()),
        ("similarity", pa.float32()),
    ]
)


@dataclass
class Embeddings:
    """One shard's embeddings as float32 unit rows, as read (float16), with their keys."""

    vectors: np.ndarray
    raw: np.ndarray
    keys: list[str]
    prompt_ids: list[str | None] = field(default_factory=list)


@dataclass
class EvalSet:
    source: str
    kind: str  # "npy" or "output"
    vectors: np.ndarray
    keys: list[str] | None  # an output's keys; None for a .npy (its rows are named by index)


def run_dedup(
    output: str,
    threshold: float = DEFAULT_THRESHOLD,
    against: list[str] | None = None,
    out: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Flag the output's near-duplicates and, with `against`, its images too close to an evaluation
    set; write layout.dedup_files(out) into it. Returns the summary (also written).

    1. Check the arguments and that the output has embeddings, before reading any.
    2. Load the evaluation sets (each checked for the output's width).
    3. Scan the output's shards in order: each block against the kept images, then itself; and
       against every evaluation set.
    4. Write the flags, then the summary (exclusive creates: nothing is replaced).
    """
    started = time.time()
    name = out or DEFAULT_OUT
    if not name or name.startswith("/") or ".." in name.split("/"):
        raise DedupError(f"--out {out!r}: give a plain file name stem such as 'dedup'")
    threshold = threshold_value(threshold)
    # 1. The output, its embeddings and the name's files.
    reader = OutputReader.open(output, storage_options)
    spec = reader.job["spec"]
    if not spec.get("curation", {}).get("save_embeddings"):
        raise DedupError(
            f"{reader.storage.url()} has no image embeddings: rerun the job with "
            "curation.save_embeddings: true (and curation.clip_model) to write img_emb/"
        )
    files = layout.dedup_files(name)
    check_names_free(reader.storage, files.values(), name)
    survey = reader.survey()
    if not survey.complete:
        log.warning(
            "%s is not complete: reading the %d committed shards only",
            reader.storage.url(),
            len(survey.committed),
        )
    # 2. The evaluation sets.
    width = _output_width(reader)
    evals = [
        load_eval_set(src, storage_options, reader.storage.url(), width) for src in against or []
    ]
    # 3. The scan.
    scan = Scan(threshold, evals)
    for shard in reader.shards:
        scan.add(shard, shard_embeddings(reader, shard, width))
    scan.finish()
    # 4. Write.
    summary = _summary(reader, survey, scan, width, files)
    # Keys run in scan order (shard, then offset): sorted, each block's duplicates and
    # contaminations interleave as the images came.
    flags = sorted(scan.flags, key=lambda f: (f["key"], f["reason"]))
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(flags, schema=FLAGS_SCHEMA), buf)
    create_tool_file(reader.storage, files["flags"], buf.getvalue(), name)
    summary["seconds"] = round(time.time() - started, 2)
    create_tool_file(reader.storage, files["summary"], json_bytes(summary), name)
    return summary


class Scan:
    """The flags of the images seen so far, and the embeddings of those kept (float16, in order)."""

    def __init__(self, threshold: float, evals: list[EvalSet]):
        self.given = threshold
        self.threshold = threshold - TOLERANCE
        self.evals = evals
        # The kept rows as read (float16: half the memory) with their inverse norms, in scan order:
        # float16 of the renormalized rows would put an exact copy's cosine ~1e-4 under 1.
        self.kept: list[tuple[np.ndarray, np.ndarray]] = []
        self.kept_keys: list[str] = []
        self.flags: list[dict[str, Any]] = []
        self.images = 0
        self.pending: list[tuple[str, Embeddings]] = []
        self.pending_rows = 0

    def add(self, shard: str, emb: Embeddings) -> None:
        """Queue a shard's rows; they are compared BLOCK_ROWS at a time across shard ends, so a job
        of many small shards costs as few matrix products as one of large shards."""
        self.pending.append((shard, emb))
        self.pending_rows += len(emb.keys)
        if self.pending_rows >= BLOCK_ROWS:
            self.finish()

    def finish(self) -> None:
        """Compare every queued row (the caller's last call: the rows left at the end)."""
        if not self.pending:
            return
        shards = [shard for shard, emb in self.pending for _ in emb.keys]
        keys = [k for _, emb in self.pending for k in emb.keys]
        prompt_ids = [p for _, emb in self.pending for p in emb.prompt_ids]
        block = np.concatenate([emb.vectors for _, emb in self.pending])
        raw = np.concatenate([emb.raw for _, emb in self.pending])
        self.pending, self.pending_rows = [], 0
        for a in range(0, len(keys), BLOCK_ROWS):
            b = a + BLOCK_ROWS
            self.compare(shards[a:b], keys[a:b], prompt_ids[a:b], block[a:b], raw[a:b])

    def compare(
        self,
        shards: list[str],
        keys: list[str],
        prompt_ids: list,
        block: np.ndarray,
        raw: np.ndarray,
    ) -> None:
        """One block of at most BLOCK_ROWS rows, in scan order."""
        # 1. Against the images kept before the block, 2. the block's own rows in order.
        match, sim = self.against_kept(block)
        self.within(block, match, sim)
        # 3. Its kept rows join the kept ones (the indices `within` gave them), then the flags.
        keep = match < 0
        self.keep(raw[keep])
        self.kept_keys += [k for k, kept in zip(keys, keep) if kept]
        for i in np.flatnonzero(~keep):
            self.flag(
                shards[i],
                keys[i],
                prompt_ids[i],
                REASON_DUPLICATE,
                self.kept_keys[match[i]],
                None,
                None,
                sim[i],
            )
        # 4. Against every evaluation set.
        for e in self.evals:
            self.contamination(shards, keys, prompt_ids, block, e)
        self.images += len(keys)

    def keep(self, raw: np.ndarray) -> None:
        """Append kept rows, topping up the last chunk first: chunks stay about BLOCK_ROWS long,
        so a block meets the kept images in few products whatever the number of shards."""
        if self.kept and len(self.kept[-1][0]) < BLOCK_ROWS:
            raw = np.concatenate([self.kept.pop()[0], raw])
        self.kept.append((raw, inverse_norms(raw)))

    def against_kept(self, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per row of the block: the index (into kept_keys) of the earliest kept image it matches,
        -1 for none, and that similarity. Kept blocks are visited in order, so the first match
        found for a row is its earliest."""
        match = np.full(len(block), -1, dtype=np.int64)
        sim = np.zeros(len(block), dtype=np.float32)
        offset = 0
        for kept, scale in self.kept:
            open_rows = np.flatnonzero(match < 0)
            if open_rows.size and len(kept):
                s = (block[open_rows] @ kept.astype(np.float32).T) * scale
                hit = s >= self.threshold
                found = hit.any(axis=1)
                first = hit.argmax(axis=1)
                rows = open_rows[found]
                match[rows] = offset + first[found]
                sim[rows] = s[found, first[found]]
            offset += len(kept)
        return match, sim

    def within(self, block: np.ndarray, match: np.ndarray, sim: np.ndarray) -> None:
        """The block's own rows in order: a row no earlier image matched is kept, and every later
        unmatched row close to it becomes its duplicate. A kept row's index is the one it gets in
        kept_keys once the block's kept rows are appended, in order."""
        s = block @ block.T
        next_kept = len(self.kept_keys)
        for i in range(len(block)):
            if match[i] >= 0:
                continue
            later = np.arange(i + 1, len(block))
            hits = later[(match[i + 1 :] < 0) & (s[i, i + 1 :] >= self.threshold)]
            match[hits] = next_kept
            sim[hits] = s[i, hits]
            next_kept += 1

    def contamination(
        self, shards: list[str], keys: list[str], prompt_ids: list, block: np.ndarray, e: EvalSet
    ) -> None:
        best = np.full(len(block), -np.inf, dtype=np.float32)
        where = np.zeros(len(block), dtype=np.int64)
        for start in range(0, len(e.vectors), BLOCK_ROWS):
            s = block @ e.vectors[start : start + BLOCK_ROWS].T
            top, sim = s.argmax(axis=1), s.max(axis=1)
            better = sim > best  # ties keep the earlier row
            best[better], where[better] = sim[better], start + top[better]
        for i in np.flatnonzero(best >= self.threshold):
            j = int(where[i])
            self.flag(
                shards[i],
                keys[i],
                prompt_ids[i],
                REASON_CONTAMINATED,
                e.keys[j] if e.keys is not None else str(j),
                e.source,
                j,
                best[i],
            )

    def flag(self, shard, key, prompt_id, reason, match, source, index, similarity) -> None:
        self.flags.append(
            {
                "key": key,
                "shard": shard,
                "prompt_id": prompt_id,
                "reason": reason,
                "match": match,
                "match_source": source,
                "match_index": index,
                "similarity": float(similarity),
            }
        )


def _summary(
    reader: OutputReader, survey: Survey, scan: Scan, width: int | None, files: dict[str, str]
) -> dict[str, Any]:
    """NAME_summary.json, less the seconds taken."""
    shards = reader.shards
    return {
        "output": reader.storage.url(),
        "job_name": reader.job["spec"].get("name"),
        "job_fingerprint": reader.job.get("fingerprint"),
        "dataset_complete": survey.complete,
        "shards_read": len(shards),
        "images_read": scan.images,
        "embedding_width": width,
        "threshold": scan.given,
        "counts": {
            REASON_DUPLICATE: sum(f["reason"] == REASON_DUPLICATE for f in scan.flags),
            REASON_CONTAMINATED: sum(f["reason"] == REASON_CONTAMINATED for f in scan.flags),
        },
        "flagged_images": len({f["key"] for f in scan.flags}),
        "embedding_model": _embedding_model(reader),
        "against": [
            {"source": e.source, "kind": e.kind, "rows": len(e.vectors)} for e in scan.evals
        ],
        "rule": "scan in (shard, row) order; an image with cosine >= threshold to an earlier kept "
        "image is a duplicate of the earliest such; contaminated: max cosine to an evaluation "
        "set's embeddings >= threshold",
        "files": {role: reader.storage.url(f) for role, f in files.items()},
    }


# ---------------------------------------------------------------------------- reading embeddings


def shard_embeddings(reader: OutputReader, shard: str, width: int | None) -> Embeddings:
    """A committed shard's embeddings and keys (in tar order), checked against each other and the
    width of the output's other shards."""
    name = layout.embeddings_file(shard)
    if not reader.storage.exists(name):
        raise DedupError(
            f"{reader.storage.url(name)} is missing: committed shard {shard} has no embeddings; "
            "rerun the job with curation.save_embeddings: true"
        )
    raw = _matrix(reader.storage.read_bytes(name), reader.storage.url(name))
    vectors = raw.astype(np.float32) * inverse_norms(raw)[:, None]
    meta = pq.read_table(
        io.BytesIO(reader.storage.read_bytes(layout.embeddings_metadata_file(shard))),
        columns=["key", "prompt_id"],
    )
    keys = meta.column("key").to_pylist()
    if len(keys) != len(vectors):
        raise DedupError(
            f"{reader.storage.url(name)} holds {len(vectors)} embeddings but "
            f"{layout.embeddings_metadata_file(shard)} {len(keys)} keys: the shard's files "
            "differ from their commit (`sdfleet status --verify` names it)"
        )
    if width is not None and vectors.shape[1] != width:
        raise DedupError(
            f"{reader.storage.url(name)} holds {vectors.shape[1]}-wide embeddings, the output's "
            f"first shard {width}-wide ones: they come from different CLIP models"
        )
    return Embeddings(vectors, raw, keys, meta.column("prompt_id").to_pylist())


def load_eval_set(
    source: str, storage_options: dict[str, Any] | None, output_url: str, width: int | None
) -> EvalSet:
    """An evaluation set: a .npy of embeddings, or another sdfleet output's img_emb/."""
    if source.endswith(".npy"):
        if is_remote(source):
            folder, _, file = source.rstrip("/").rpartition("/")
        else:
            path = Path(source.removeprefix("file://")).absolute()
            folder, file = str(path.parent), path.name
        storage = Storage(folder, storage_options)
        m = _matrix(storage.read_bytes(file), source).astype(np.float32)
        found = EvalSet(source, "npy", m * inverse_norms(m)[:, None], None)
    else:
        other = OutputReader.open(source, storage_options)
        if not other.job["spec"].get("curation", {}).get("save_embeddings"):
            raise DedupError(
                f"--against {source}: an sdfleet output without image embeddings; give a .npy, or "
                "an output made with curation.save_embeddings: true"
            )
        parts = [shard_embeddings(other, s, None) for s in other.shards]
        vectors = (
            np.concatenate([p.vectors for p in parts])
            if parts
            else np.zeros((0, width or 0), np.float32)
        )
        found = EvalSet(source, "output", vectors, [k for p in parts for k in p.keys])
    got = found.vectors.shape[1]
    if width is not None and len(found.vectors) and got != width:
        raise DedupError(
            f"--against {source}: its embeddings are {got} wide, those of {output_url} {width}: "
            "embed the evaluation set with the job's curation.clip_model"
        )
    return found


def _matrix(data: bytes, where: str) -> np.ndarray:
    """A .npy's 2-D float matrix, as stored."""
    try:
        m = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:
        raise DedupError(f"{where}: not a .npy of embeddings ({e})") from None
    if m.ndim != 2 or not np.issubdtype(m.dtype, np.floating):
        raise DedupError(
            f"{where}: a {m.ndim}-D {m.dtype} array; give embeddings as a 2-D float array "
            "(one row per image)"
        )
    return m


def inverse_norms(m: np.ndarray) -> np.ndarray:
    """1 / each row's length in float32 (0 for a zero row, which then matches nothing): float16
    rows are only near length 1, and cosines are computed exactly from them."""
    norms = np.linalg.norm(m.astype(np.float32), axis=1)
    return np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)


def _output_width(reader: OutputReader) -> int | None:
    """The width of the output's embeddings, from its first committed shard (None: no shard)."""
    for shard in reader.shards:
        return shard_embeddings(reader, shard, None).vectors.shape[1]
    return None


def _embedding_model(reader: OutputReader) -> dict[str, Any]:
    """The CLIP model the job embedded with, as its spec and its shards' stats record it."""
    hashes = sorted(
        {
            s.curation_models_sha256["clip_model"]
            for s in reader.survey().committed.values()
            if "clip_model" in s.curation_models_sha256
        }
    )
    return {
        "clip_model": reader.job["spec"].get("curation", {}).get("clip_model"),
        "sha256": hashes,
    }

"""`sdfleet dedup`: job-wide near-duplicates and evaluation-set contamination, from the CLIP image
embeddings a job saved (`curation.save_embeddings: true`).

    sdfleet dedup OUTPUT [--threshold 0.95] [--against SRC ...] [--out NAME]

Curation already rejects duplicates among one prompt's candidates while the job runs (status
`duplicate`); this is the pass after the job, across every committed shard of the output.

- **Near-duplicates**: images are read in (shard, row) order, the order of `img_emb/` and the tars.
  An image whose cosine similarity to an earlier *kept* image is >= the threshold is a duplicate of
  the earliest such image; every other image is kept. The first image of each group is therefore
  always kept, and the result depends only on the embeddings and the threshold. Similarity is
  computed in float32 from the float16 embeddings (renormalized), block by block, each block only
  against the images kept before it, so memory holds the kept embeddings (float16) and one block's
  similarities, never an n x n matrix.
- **Contamination** (`--against SRC`, repeatable): an image whose highest similarity to any
  embedding of an evaluation set is >= the threshold is contaminated; the match names the set and
  its row (index for a .npy, key for an sdfleet output), with the similarity. SRC is a .npy of
  L2-normalized embeddings (local or s3://, shape (n, width)) or another sdfleet output made with
  save_embeddings (its img_emb/). Embeddings of another width than the output's are refused: they
  come from another CLIP model, and their cosines mean nothing.

Written into OUTPUT/_dedup/ (through Storage, so s3:// works), NAME = `--out` (default `dedup`):

- `NAME.parquet`: one row per flag: key, shard, prompt_id, reason (`duplicate` or `contaminated`),
  match (the kept image's key; or the evaluation row's key, or its index as text), match_source (the
  evaluation set; null for a duplicate), match_index (the evaluation row's index; null for a
  duplicate), similarity. An image both duplicate and contaminated has a row for each.
- `NAME_summary.json`: images read, shards, threshold, counts per reason, the embedding model as
  the job recorded it, the evaluation sets, whether the dataset was complete.

An existing NAME is never replaced: pass another --out. Only shards committed under the job's
fingerprint are read; a partial output is deduplicated as far as it goes and says so.
"""

from __future__ import annotations

import argparse

from sdfleet.schemas import layout
from sdfleet.schemas.errors import EXIT_OK, SpecError

DEFAULT_OUT = "dedup"
DEFAULT_THRESHOLD = 0.95
REASON_DUPLICATE = "duplicate"
REASON_CONTAMINATED = "contaminated"


class DedupError(SpecError):
    """Arguments or inputs that cannot be deduplicated; the CLI prints the message and exits 1."""


def threshold_value(text: str | float) -> float:
    """--threshold: a cosine similarity in (0, 1]. Checked here rather than by argparse, whose
    refusals exit 2, the code that means an incomplete job."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:  # nan fails too
        raise DedupError(
            f"--threshold {text}: give a cosine similarity in (0, 1], e.g. {DEFAULT_THRESHOLD}"
        )
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `sdfleet dedup` arguments (wire with `add_arguments(sub.add_parser("dedup", ...))`)."""
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument(
        "output",
        help="sdfleet output folder or s3:// prefix made with curation.save_embeddings: true "
        "(the flags are written into it), or the job's spec file (then its output.uri and "
        "storage_options)",
    )
    p.add_argument(
        "--threshold",
        default=str(DEFAULT_THRESHOLD),
        metavar="COS",
        help=f"cosine similarity at or above which two images are the same (default "
        f"{DEFAULT_THRESHOLD})",
    )
    p.add_argument(
        "--against",
        action="append",
        default=[],
        metavar="SRC",
        help="an evaluation set: a .npy of L2-normalized embeddings (local or s3://) or another "
        "sdfleet output with img_emb/; repeatable",
    )
    p.add_argument(
        "--out",
        default=DEFAULT_OUT,
        metavar="NAME",
        help=f"base name of the files written: {', '.join(layout.dedup_files('NAME').values())} "
        f"(default: {DEFAULT_OUT}); an existing NAME is refused",
    )


def command(args: argparse.Namespace) -> int:
    """`sdfleet dedup`: flag, write, then print the counts, where they went and how to drop them."""
    from pathlib import Path

    from sdfleet.jobs.dedup.run import run_dedup
    from sdfleet.schemas.loading import absolute_local_path

    here = Path.cwd()
    summary = run_dedup(
        args.output,
        threshold=threshold_value(args.threshold),
        against=[absolute_local_path(src, here) for src in args.against],
        out=args.out,
        storage_options=args.storage_options,
    )
    counts = summary["counts"]
    print(
        f"read          {summary['images_read']} images in {summary['shards_read']} shards"
        f"{'' if summary['dataset_complete'] else ' (dataset incomplete)'}"
    )
    print(
        f"duplicates    {counts[REASON_DUPLICATE]} (cosine >= {summary['threshold']:g}; the "
        "earliest image of each group kept)"
    )
    if summary["against"]:
        sets = ", ".join(s["source"] for s in summary["against"])
        print(f"contaminated  {counts[REASON_CONTAMINATED]} (against {sets})")
    print(f"written       {summary['files']['flags']}, {summary['files']['summary']}")
    print(
        f"to drop them  flagged = set(pd.read_parquet({summary['files']['flags']!r}).key); "
        "rows = rows[~rows.key.isin(flagged)]"
    )
    return EXIT_OK

"""`sdfleet dedup`'s scan at scale: images per second of the exact blockwise search.

    .venv/bin/python bench/dedup.py [--images 100000] [--width 512] [--shard 1000] [--copies 1%]

Random unit embeddings in float16 (as `img_emb/` holds them), in shards of --shard rows, with a
share of them exact copies of earlier images; the scan (`jobs.dedup.run.Scan`, the pass `sdfleet
dedup` runs after reading) must flag exactly those. Reports the scan's wall time and images/s, and
the seconds projected for 10x the images (the scan is exact: time grows as n²).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def planted(images: int, width: int, copies: float, seed: int = 0):
    """(float16 unit rows, the indices that copy an earlier row)."""
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((images, width), dtype=np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    copied = np.sort(rng.choice(np.arange(1, images), int(images * copies), replace=False))
    for i in copied:
        rows[i] = rows[rng.integers(0, i)]
    return rows.astype(np.float16), set(copied.tolist())


def main() -> None:
    from sdfleet.jobs.dedup.run import Embeddings, Scan, inverse_norms

    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--shard", type=int, default=1000)
    parser.add_argument("--copies", type=float, default=0.01, help="share of planted copies")
    args = parser.parse_args()

    raw, copied = planted(args.images, args.width, args.copies)
    keys = [f"{i:09d}" for i in range(args.images)]
    scan = Scan(0.95, [])
    t0 = time.perf_counter()
    for start in range(0, args.images, args.shard):
        part = raw[start : start + args.shard]
        vectors = part.astype(np.float32) * inverse_norms(part)[:, None]
        emb = Embeddings(vectors, part, keys[start : start + args.shard], [None] * len(part))
        scan.add(f"{start // args.shard:05d}", emb)
    scan.finish()
    seconds = time.perf_counter() - t0

    flagged = {int(f["key"]) for f in scan.flags}
    print(
        f"{args.images:,} images x {args.width}: {seconds:.1f} s, "
        f"{args.images / seconds:,.0f} images/s; {len(flagged):,} flagged, {len(copied):,} planted"
    )
    print(
        json.dumps(
            {
                "images": args.images,
                "width": args.width,
                "seconds": round(seconds, 2),
                "images_per_s": round(args.images / seconds),
                "flagged": len(flagged),
                "planted": len(copied),
                "exact": flagged == copied,
                "seconds_10x_projected": round(seconds * 100, 1),
            }
        )
    )


if __name__ == "__main__":
    main()

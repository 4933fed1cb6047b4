"""What an output folder holds, and the files that declare a dataset complete.

`Survey` reads only the small files (stats, failed markers, Parquet footers), so `sdfleet status`
is cheap on a dataset of any size. `Finalizer` writes sizes.json, the dataset card and, last,
_SUCCESS, and only when every planned sample has exactly one row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from actors.storage import Storage
from schemas.samples import shard_name

JOB_FILE = "_job.json"
CARD_SHEET = "preview/card_contact_sheet.png"  # a small sample of the images, shown by the dataset card
SUCCESS_FILE = "_SUCCESS"


@dataclass
class Survey:
    num_shards: int
    num_samples: int
    committed: dict[str, dict[str, Any]] = field(default_factory=dict)  # shard name -> stats
    quarantined: dict[str, dict[str, Any]] = field(default_factory=dict)  # shard name -> failed record
    pending: list[str] = field(default_factory=list)

    @property
    def committed_samples(self) -> int:
        return sum(s["samples"] for s in self.committed.values())

    @property
    def complete(self) -> bool:
        return not self.pending and not self.quarantined and self.committed_samples == self.num_samples

    def totals(self) -> dict[str, Any]:
        keys = ("samples", "ok", "filtered", "failed", "images_in_tar", "quarantined_images", "flagged",
                "gpu_seconds", "gen_seconds")
        out: dict[str, Any] = {k: round(sum(s.get(k, 0) for s in self.committed.values()), 3) for k in keys}
        by_class: dict[str, int] = {}
        for s in self.committed.values():
            for cls, n in s.get("flagged_by_class", {}).items():
                by_class[cls] = by_class.get(cls, 0) + n
        out["flagged_by_class"] = dict(sorted(by_class.items()))
        out["images_per_gpu_hour"] = round(out["ok"] / out["gpu_seconds"] * 3600, 1) if out["gpu_seconds"] else None
        out["dtypes"] = sorted({s["dtype"] for s in self.committed.values() if s.get("dtype")})
        out["safety_model_sha256"] = sorted({s["safety_model_sha256"] for s in self.committed.values()
                                             if s.get("safety_model_sha256")})
        return out


def survey(storage: Storage, job: dict[str, Any]) -> Survey:
    """Classify every planned shard of the job recorded in `_job.json` as committed, quarantined or pending."""
    width = job["key_width"]
    names = [shard_name(i, width) for i in range(job["num_shards"])]
    stats_files = set(storage.list("*_stats.json"))
    failed_files = set(storage.list("*_failed.json"))
    out = Survey(num_shards=job["num_shards"], num_samples=job["num_samples"])
    for name in names:
        if f"{name}_stats.json" in stats_files:
            stats = storage.read_json(f"{name}_stats.json")
            if stats.get("fingerprint") == job["fingerprint"]:
                out.committed[name] = stats
                continue
        if f"{name}_failed.json" in failed_files:
            out.quarantined[name] = storage.read_json(f"{name}_failed.json")
        else:
            out.pending.append(name)
    return out


class Finalizer:
    def __init__(self, storage: Storage, job: dict[str, Any]):
        self.storage = storage
        self.job = job

    def finalize(self, s: Survey) -> bool:
        """Write sizes.json, README.md and _SUCCESS if the dataset is complete. Returns completeness."""
        if not s.complete:
            return False
        # 1. Verify from the Parquet footers themselves: one row per planned sample, no more.
        rows = 0
        for name in s.committed:
            with self.storage.fs.open(self.storage.path(f"{name}.parquet"), "rb") as fh:
                n = pq.ParquetFile(fh).metadata.num_rows
            if n != s.committed[name]["samples"]:
                raise RuntimeError(f"{name}.parquet has {n} rows but its stats say {s.committed[name]['samples']}")
            rows += n
        if rows != s.num_samples:
            raise RuntimeError(f"the shards hold {rows} rows but {s.num_samples} samples were planned")
        # 2. The results join the job record (its spec and fingerprint stay as they were), then
        #    sizes.json, the dataset card, and the marker last.
        t = s.totals()
        self.storage.write_json(JOB_FILE, {**self.job, "results": {
            "samples": t["samples"], "ok": t["ok"], "filtered": t["filtered"], "failed": t["failed"],
            "safety": {"detector": self.job["spec"]["safety"]["detector"], "model_sha256": t["safety_model_sha256"],
                       "flagged": t["flagged"], "flagged_by_class": t["flagged_by_class"],
                       "action": self.job["spec"]["safety"]["action"]},
            "gpu_seconds": t["gpu_seconds"],
        }})
        self.storage.write_json("sizes.json", {f"{n}.tar": st["images_in_tar"] for n, st in sorted(s.committed.items())})
        sheet = None
        if t["images_in_tar"]:
            from jobs.preview import small_contact_sheet

            sheet = CARD_SHEET
            self.storage.write_bytes(sheet, small_contact_sheet(self.storage))
        self.storage.write_bytes("README.md", dataset_card(self.job, s, sheet).encode())
        self.storage.write_bytes(SUCCESS_FILE, b"")
        return True


def dataset_card(job: dict[str, Any], s: Survey, sheet: str | None = None) -> str:
    spec = job["spec"]
    t = s.totals()
    gpu_hours = t["gpu_seconds"] / 3600
    ext = {"jpeg": "jpg"}.get(spec["output"]["image_format"], spec["output"]["image_format"])
    axes = spec["sweep"]["axes"]
    seeds = spec["sweep"]["seeds"]
    gen = spec["generation"]
    sf = spec["safety"]
    if sf["detector"] == "none":
        safety_text = "none (no detector ran; safety columns are null)"
    else:
        per_class = ", ".join(f"{k} {v}" for k, v in t["flagged_by_class"].items()) or "none"
        safety_text = (f"`{sf['detector']}` (weights sha256 {', '.join(h[:12] for h in t['safety_model_sha256'])}), "
                       f"threshold {sf['threshold']}, action `{sf['action']}`; flagged per class: {per_class}")
    base = spec["sweep"]["base_seed"]
    seed_text = seeds if isinstance(seeds, list) else f"{seeds} per prompt, derived from base_seed {base}"
    lines = [
        "---",
        "# Hugging Face dataset card header: the Hub reads the WebDataset tars, not the Parquet metadata.",
        "configs:",
        "- config_name: default",
        "  data_files:",
        "  - split: train",
        '    path: "*.tar"',
        "task_categories:",
        "- text-to-image",
        "tags:",
        "- synthetic",
        "- sdfleet",
        "---",
        "",
        f"# {spec['name']}",
        "",
        f"Synthetic images generated by sdfleet from `{spec['model']['source']}`"
        f"{' @ ' + spec['model']['revision'] if spec['model']['revision'] else ''}.",
        "",
        *([f"![A sample of the images]({sheet})", ""] if sheet else []),
        "## Contents",
        "",
        "| | |",
        "|---|---|",
        f"| samples planned | {s.num_samples} |",
        f"| images (status ok) | {t['ok']} |",
        f"| flagged by safety | {t['flagged']} (action `{spec['safety']['action']}`) |",
        f"| filtered (not in the tars) | {t['filtered']} |",
        f"| kept aside in `quarantine/` | {t['quarantined_images']} |",
        f"| failed | {t['failed']} |",
        f"| shards | {s.num_shards} |",
        f"| GPU-hours | {gpu_hours:.4f} ({t['gpu_seconds']:.1f} GPU-seconds) |",
        f"| images per GPU-hour | {t['images_per_gpu_hour'] if t['images_per_gpu_hour'] is not None else 'n/a (CPU)'} |",
        "",
        "## Generation",
        "",
        f"- scheduler: `{spec['model']['scheduler'] or 'checkpoint default'}`, dtype {', '.join(t['dtypes']) or spec['model']['dtype']}",
        f"- steps {gen['num_inference_steps']}, guidance {gen['guidance_scale']}, {gen['width']}x{gen['height']}",
        f"- seeds: {seed_text}",
        f"- sweep axes: {json.dumps(axes) if axes else 'none'}",
        f"- safety: {safety_text}",
        f"- job fingerprint: `{job['fingerprint']}`",
        "",
        "## Layout",
        "",
        f"- `NNNNN.tar`: WebDataset shards with `{{key}}.{ext}`, `{{key}}.txt` (prompt), `{{key}}.json` (row)",
        "- `NNNNN.parquet`: one row per planned sample (ok, filtered, failed), with seeds and parameters",
        "- `sizes.json`: images per tar; `_job.json`: the resolved spec and package versions",
        "",
        "Every row carries the seed and parameters needed to regenerate its image with plain diffusers.",
    ]
    return "\n".join(lines).rstrip() + "\n"

"""The files that declare a dataset complete: sizes.json, the dataset card and, last, _SUCCESS.

They are written only when every planned sample has exactly one row (`OutputReader.survey` says
which shards are committed; the Parquet footers are counted again here before anything is written).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from sdfleet.jobs.output import OutputReader, Survey
from sdfleet.schemas import layout
from sdfleet.schemas.detectors import NO_DETECTOR
from sdfleet.schemas.errors import UserError
from sdfleet.schemas.layout import JobTotals

log = logging.getLogger("sdfleet")


class IncompleteOutput(UserError):
    """Committed shards that do not add up to the plan, or whose files are not the ones their stats
    describe: an output changed by something other than sdfleet."""


class Finalizer:
    def __init__(self, reader: OutputReader):
        self.reader = reader
        self.storage = reader.storage

    def _check_files(self) -> None:
        problems = self.reader.verify()
        if problems:
            details = "; ".join(
                f"shard {name}: {', '.join(found)}" for name, found in sorted(problems.items())
            )
            raise IncompleteOutput(
                f"{self.storage.url()}: committed shards whose files differ from their stats "
                f"({details}); no _SUCCESS written. Remove those shards' stats files and rerun "
                "to make them again"
            )

    def _check_rows(self, s: Survey) -> None:
        rows = self.reader.parquet_rows(sorted(s.committed))
        for name, stats in s.committed.items():
            n = rows[name]
            if n != stats.samples:
                raise IncompleteOutput(
                    f"{self.storage.url(layout.parquet_file(name))} has {n} rows but its "
                    f"stats say {stats.samples}"
                )

    def _discard_leftovers(self, s: Survey) -> None:
        """Staged files no commit refers to: writers that lost a commit or died before one."""
        referenced = {
            f.upload_id or f.temp for st in s.committed.values() for f in st.files.values()
        }
        discarded = self.storage.discard_leftovers(referenced)
        if discarded:
            log.info("discarded %d staged file(s) that no commit refers to", discarded)

    def finalize(self) -> bool:
        """Write sizes.json, README.md and _SUCCESS if the dataset is complete. Returns completeness."""
        s = self.reader.survey(refresh=True)
        if not s.complete:
            return False
        # 1. Every committed file is its commit's (a commit whose writer died before publishing is
        #    published now), and the Parquet footers hold one row per planned sample (the survey has
        #    checked that the stats add up to the plan).
        self._check_files()
        self._check_rows(s)
        self._discard_leftovers(s)
        # 2. The results join the job record (its spec and fingerprint stay as they were), then
        #    sizes.json, the dataset card, and the marker last.
        job = self.reader.job
        t = s.totals()
        self.storage.write_json(
            layout.JOB_FILE,
            {
                **job,
                "results": {
                    "samples": t.samples,
                    "ok": t.ok,
                    "filtered": t.filtered,
                    "failed": t.failed,
                    **{k: t.count(k) for k in ("rejected", "duplicate", "skipped") if t.count(k)},
                    "safety": {
                        "detector": job["spec"]["safety"]["detector"],
                        "model_sha256": t.safety_model_sha256,
                        "flagged": t.flagged,
                        "flagged_by_class": t.flagged_by_class,
                        "action": job["spec"]["safety"]["action"],
                    },
                    "gpu_seconds": t.gpu_seconds,
                },
            },
        )
        self.storage.write_json(
            layout.SIZES_FILE,
            {layout.tar_file(n): st.images_in_tar for n, st in sorted(s.committed.items())},
        )
        sheet = None
        if t.images_in_tar:
            from sdfleet.jobs.preview import small_contact_sheet

            sheet = layout.CARD_SHEET
            self.storage.write_bytes(sheet, small_contact_sheet(self.reader))
        self.storage.write_bytes(layout.CARD_FILE, dataset_card(job, s, sheet).encode())
        self.storage.write_bytes(layout.SUCCESS_FILE, b"")
        return True


def dataset_card(job: dict[str, Any], s: Survey, sheet: str | None = None) -> str:
    spec = job["spec"]
    t = s.totals()
    ext = layout.IMAGE_EXTENSIONS[spec["output"]["image_format"]]
    axes = spec["sweep"]["axes"]
    seeds = spec["sweep"]["seeds"]
    gen = spec["generation"]

    def swept(key: str) -> str:  # a swept key shows its values, not the default it overrides
        return "/".join(str(v) for v in axes[key]) if key in axes else str(gen[key])

    sf = spec["safety"]
    if sf["detector"] == NO_DETECTOR:
        safety_text = "none (no detector ran; safety columns are null)"
    else:
        per_class = ", ".join(f"{k} {v}" for k, v in t.flagged_by_class.items()) or "none"
        safety_text = (
            f"`{sf['detector']}` (weights sha256 {', '.join(h[:12] for h in t.safety_model_sha256)}), "
            f"threshold {sf['threshold']}, action `{sf['action']}`; flagged per class: {per_class}"
        )
    base = spec["sweep"]["base_seed"]
    seed_text = (
        seeds if isinstance(seeds, list) else f"{seeds} per prompt, derived from base_seed {base}"
    )
    lines = [
        *CARD_HEADER,
        "",
        f"# {spec['name']}",
        "",
        f"Synthetic images generated by sdfleet from `{spec['model']['source']}`"
        f"{' @ ' + spec['model']['revision'] if spec['model']['revision'] else ''}.",
        "",
        *([f"![A sample of the images]({sheet})", ""] if sheet else []),
        *_contents_section(spec, s, t),
        *_curation_section(spec, t),
        "## Generation",
        "",
        f"- scheduler: `{spec['model']['scheduler'] or 'checkpoint default'}`, dtype {', '.join(t.dtypes) or spec['model']['dtype']}",
        f"- steps {swept('num_inference_steps')}, guidance {swept('guidance_scale')}, "
        f"{swept('width')}x{swept('height')}",
        f"- seeds: {seed_text}",
        f"- sweep axes: {json.dumps(axes) if axes else 'none'}",
        f"- safety: {safety_text}",
        f"- job fingerprint: `{job['fingerprint']}`",
        "",
        "## Layout",
        "",
        f"- `NNNNN.tar`: WebDataset shards with `{{key}}.{ext}`, `{{key}}.txt` (prompt), `{{key}}.json` (row)",
        "- `NNNNN.parquet`: one row per planned sample (ok, filtered, failed, and with curation rejected, "
        "duplicate, skipped), with seeds and parameters",
        "- `sizes.json`: images per tar; `_job.json`: the resolved spec and package versions",
        "",
        "Every row carries the seed and parameters needed to regenerate its image with plain diffusers.",
    ]
    return "\n".join(lines).rstrip() + "\n"


# Hugging Face dataset card header: the Hub reads the WebDataset tars, not the Parquet metadata.
CARD_HEADER = (
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
)


def _contents_section(spec: dict[str, Any], s: Survey, t: JobTotals) -> list[str]:
    """What the dataset holds, by status, and what it took."""
    gpu_hours = t.gpu_seconds / 3600
    per_hour = t.images_per_gpu_hour if t.images_per_gpu_hour is not None else "n/a (CPU)"
    return [
        "## Contents",
        "",
        "| | |",
        "|---|---|",
        f"| samples planned | {s.num_samples} |",
        f"| images (status ok) | {t.ok} |",
        f"| flagged by safety | {t.flagged} (action `{spec['safety']['action']}`) |",
        f"| filtered (not in the tars) | {t.filtered} |",
        f"| kept aside in `quarantine/` | {t.quarantined_images} |",
        f"| failed | {t.failed} |",
        *[
            f"| {what} | {t.count(k)} |"
            for k, what in (
                ("rejected", "rejected by a curation gate (not in the tars)"),
                ("duplicate", "near-duplicates of a kept image (not in the tars)"),
                ("skipped", "candidate slots not needed (not generated)"),
            )
            if t.count(k)
        ],
        f"| shards | {s.num_shards} |",
        f"| GPU-hours | {gpu_hours:.4f} ({t.gpu_seconds:.1f} GPU-seconds) |",
        f"| images per GPU-hour | {per_hour} |",
        "",
    ]


def _curation_section(spec: dict[str, Any], t: JobTotals) -> list[str]:
    """How often each gate passed, and per sweep point how many candidates it took to keep the images."""
    cur = spec.get("curation") or {}
    if not cur.get("clip_model"):
        return []
    k = cur.get("images_per_prompt")
    lines = ["## Curation", ""]
    gates = {
        g: cur[g]
        for g in ("min_clip_score", "min_aesthetic", "max_punsafe")
        if cur.get(g) is not None
    }
    if gates:
        lines += [
            f"Gates on the {t.gated} images that passed safety (an image may fail more than one):",
            "",
            "| gate | bound | failed | pass rate |",
            "|---|---|---|---|",
        ]
        for gate, bound in gates.items():
            failed = t.gate_failures.get(gate, 0)
            lines.append(f"| `{gate}` | {bound} | {failed} | {_rate(t.gated - failed, t.gated)} |")
        lines.append("")
    lines += [
        "Per sweep point: the images kept of the candidates generated"
        + (
            f"; best-of-N keeps {k} per prompt of up to {cur.get('max_candidates') or k} candidates."
            if k
            else "."
        ),
        "",
        "| sweep point | generated | kept | acceptance |" + (" prompts short of k |" if k else ""),
        "|---|---|---|---|" + ("---|" if k else ""),
    ]
    for label, p in t.by_sweep_point.items():
        lines.append(
            f"| {label} | {p['generated']} | {p['ok']} | {_rate(p['ok'], p['generated'])} |"
            + (f" {p.get('short', 0)} of {p.get('prompts', 0)} |" if k else "")
        )
    return [*lines, ""]


def _rate(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "n/a"

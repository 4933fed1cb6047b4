"""The model-card plot: FID against mean CLIP score, one point per sweep point, labelled with its guidance scale."""

from __future__ import annotations

import io
import math
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

from sdfleet.jobs.score import format_value


def plot_fid_vs_clip(
    points: list[dict[str, Any]], group_cols: list[str], summary: dict[str, Any]
) -> bytes:
    """The plot as PNG bytes; the summary's notes go onto it (loud and centred when the models are
    tiny or random) and into its metadata."""
    fig = Figure(figsize=(7, 5.2), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    others = group_cols[1:]
    series = _series(points, others)
    for key, pts in series.items():
        label = (
            ", ".join(f"{c}={format_value(v)}" for c, v in zip(others, key))
            or summary.get("job_name")
            or "images"
        )
        _draw_series(ax, pts, label)
    ax.set_xlabel(f"CLIP score ({Path(str(summary['clip_model']['source'])).name})")
    ax.set_ylabel(f"FID ({summary['fid']['reference_images']} reference images)")
    ax.set_title(
        f"{summary.get('job_name')}: FID vs CLIP score, labels = guidance scale", fontsize=10
    )
    ax.grid(True, alpha=0.3)
    if len(series) > 1 or others:
        ax.legend(fontsize=8)
    if summary["notes"]:
        _draw_notes(fig, summary["notes"], loud=not summary["figures_meaningful"])
    buf = io.BytesIO()
    fig.savefig(
        buf,
        format="png",
        metadata={"Description": "\n".join(summary["notes"]), "Software": "sdfleet score"},
    )
    return buf.getvalue()


def _series(points: list[dict[str, Any]], others: list[str]) -> dict[tuple, list[dict[str, Any]]]:
    """Points with a finite FID, one line per value of the sweep axes other than guidance scale."""
    series: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for p in points:
        if p["fid"] is not None and math.isfinite(p["fid"]):
            series[tuple(p[c] for c in others)].append(p)
    for pts in series.values():
        pts.sort(key=lambda p: p["guidance_scale"])
    return series


def _draw_series(ax: Axes, pts: list[dict[str, Any]], label: str) -> None:
    ax.plot([p["clip_score_mean"] for p in pts], [p["fid"] for p in pts], marker="o", label=label)
    for p in pts:
        ax.annotate(
            format_value(p["guidance_scale"]),
            (p["clip_score_mean"], p["fid"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )


def _draw_notes(fig: Figure, notes: list[str], loud: bool) -> None:
    shown = "\n".join(textwrap.fill(n, 70) for n in notes)
    fig.text(
        0.5,
        0.5 if loud else 0.02,
        shown,
        ha="center",
        va="center" if loud else "bottom",
        fontsize=11 if loud else 8,
        color="red" if loud else "black",
        bbox=dict(facecolor="white", alpha=0.85, edgecolor="red" if loud else "gray"),
    )

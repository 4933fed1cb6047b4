"""The README's GPU performance rows from a `bench/gpu_session.sh` folder.

    python3 bench/gpu_report.py OUT      # OUT: the session's $OUT (machine.txt, STEP.log, STEP.json)

Prints one Markdown row per steps x batch of each step that finished, with the GPU's name, the
date, the exact bench/gpu.py command, and the warm-up figures; a step that ran out of time is named
with the last table line it printed, so a cut-short session still reports what it measured.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HEADER = (
    "| GPU | date | command | steps | batch | plain img/s | sdfleet img/s | ratio | MFU plain | "
    "MFU sdfleet | max diff | peak GiB |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def _percent(mfu: float | None) -> str:
    return f"{100 * mfu:.1f}%" if mfu is not None else "n/a"


def _machine(out: Path) -> dict[str, str]:
    """machine.txt's `date ...` line and the GPU's name (nvidia-smi's first field)."""
    lines = (out / "machine.txt").read_text().splitlines()
    date = next((line.split()[1] for line in lines if line.startswith("date ")), "?")
    gpu = next((line.split(",")[0] for line in lines if "," in line), None)
    return {"date": date, "gpu": gpu}


def _command(log: Path) -> str:
    """The step's bench/gpu.py command, from its log's first line (`== NAME (...): bench/gpu.py ARGS`)."""
    first = log.read_text().splitlines()[0]
    return first.split("): ", 1)[1] if "): " in first else first


def report(out: Path) -> str:
    machine = _machine(out)
    lines = [HEADER]
    notes = []
    for log in sorted(out.glob("*.log")):
        figures_file = log.with_suffix(".json")
        command = _command(log)
        if not figures_file.exists() or not figures_file.read_text().strip():
            tail = [line for line in log.read_text().splitlines() if line.strip()][-1:]
            notes.append(f"- {log.stem}: no figures ({' '.join(tail)})")
            continue
        figures = json.loads(figures_file.read_text())
        gpu = machine["gpu"] or figures["device"]
        for row in figures["rows"]:
            peak = row["sdfleet_peak_gib"]
            lines.append(
                f"| {gpu} | {machine['date']} | `{command}` | {row['steps']} | {row['batch']} | "
                f"{row['plain_images_per_s']:.3f} | {row['sdfleet_images_per_s']:.3f} | "
                f"{row['ratio']:.2f} | {_percent(row['mfu_plain'])} | "
                f"{_percent(row['mfu_sdfleet'])} | {row['max_diff']} | "
                f"{peak if peak is not None else 'n/a'} |"
            )
        second = figures.get("second_engine") or {}
        warm_up = (
            f"compile warm-up {figures['warm_up_s']:.0f} s (cache {figures['compile_cache']})"
            if figures["warm_up_s"] is not None
            else "not compiled"
        )
        if second:
            warm_up += (
                f"; a second engine in a fresh process: warm-up {second['warm_up_s'] or 0:.0f} s "
                f"(cache {second['compile_cache']})"
            )
        notes.append(
            f"- {log.stem}: batch `auto` chose {figures['batch_size']}; engine ready in "
            f"{figures['engine_ready_s']} s, {warm_up}"
        )
    return "\n".join(lines + [""] + notes)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "machine.txt").exists():
        sys.exit("usage: python3 bench/gpu_report.py OUT (the folder bench/gpu_session.sh wrote)")
    print(report(Path(sys.argv[1])))

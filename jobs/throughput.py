"""The sustained throughput `sdfleet plan` turns FLOPs into GPU-hours with: jobs/gpu_throughput.yaml,
per GPU type and model.dtype, each figure with its basis (measured or an estimate)."""

from __future__ import annotations

from pathlib import Path

from sdfleet.schemas.errors import SpecError

THROUGHPUT_TABLE = Path(__file__).with_name("gpu_throughput.yaml")


def sustained_tflops(
    gpu_type: str, override: float | None, dtype: str = "float16"
) -> tuple[float, str]:
    """The sustained TFLOP/s for the job's GPU type and model.dtype, and what the figure is:
    the override, or gpu_throughput.yaml's row with its basis (measured or an estimate)."""
    if override is not None:
        return override, "resources.throughput_tflops"
    import yaml

    table = yaml.safe_load(THROUGHPUT_TABLE.read_text())
    if gpu_type not in table:
        raise SpecError(
            f"resources.gpu_type={gpu_type!r} is not in {THROUGHPUT_TABLE.name} "
            f"({', '.join(table)}); add it there or set resources.throughput_tflops"
        )
    row = table[gpu_type]
    if dtype == "bfloat16" and dtype not in row:
        raise SpecError(
            f"model.dtype=bfloat16: {THROUGHPUT_TABLE.name} has no bfloat16 figure for "
            f"resources.gpu_type={gpu_type}; pick a GPU type it has one for "
            f"({', '.join(g for g in table if 'bfloat16' in table[g])}) or set "
            "resources.throughput_tflops"
        )
    used = dtype if dtype in row else "float16"  # float32: the table holds no figure of its own
    figure = row[used]
    note = "" if used == dtype else f", used for {dtype}"
    return float(figure["sustained_tflops"]), (
        f"{THROUGHPUT_TABLE.name}: {gpu_type} {used}, {figure['basis']}{note}"
    )

"""The benchmark scripts run end to end (their figures are printed, never asserted as speeds)."""

import json
import re
import subprocess
import sys

import pytest

from helpers import REPO


def bench(*args: str, timeout: float = 600) -> str:
    out = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_gpu_bench_runs_on_the_tiny_pipeline_and_matches_plain_diffusers():
    out = bench("bench/gpu.py", "--tiny")
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d+\s+[\d.]+", line)]
    assert [(r[0], r[1]) for r in rows] == [("2", "1"), ("2", "2")]
    for r in rows:
        assert float(r[2]) > 0 and float(r[3]) > 0
        assert int(r[7]) <= 2  # the engine's pixels vs plain diffusers'
    assert "engine speed-ups: channels_last, fuse_qkv, uint8_on_device" in out


@pytest.mark.gpu
def test_gpu_bench_full_size():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    out = bench("bench/gpu.py", "--steps", "25", "--batches", "8", timeout=1800)
    assert "MFU" in out


def test_plan_bench_runs_at_small_scale():
    out = bench("bench/plan.py", "--rows", "20000", "--files", "2")
    assert re.search(r"planned 20,000 prompts -> 160,000 samples in 16 shards", out)
    assert "target: under 60 s -> met" in out


def last_json(out: str) -> dict:
    """Each bench's last printed line is one JSON object of its figures."""
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_pipeline_bench_runs_a_whole_job_at_a_synthetic_rate():
    out = bench(
        "bench/pipeline.py",
        "--rates",
        "40",
        "--png-rates",
        "20",
        "--curation-rates",
        "20",
        "--seconds",
        "1.5",
        "--shards",
        "3",
        "--size",
        "64",
        "--batch",
        "4",
        "--tiny-detector",
    )
    figures = last_json(out)
    assert set(figures["rates"]) == {"jpeg 40", "png 20", "jpeg 20 curated"}
    curated = figures["rates"]["jpeg 20 curated"]
    assert (
        "curate" in curated["worker_thread_s_per_image"]
        and 0 < curated["kept_per_s"] < curated["achieved"]
    )
    for r in figures["rates"].values():
        assert r["shards"] == 3 and r["images"] > 0 and r["achieved"] > 0 and r["ratio"] > 0
        assert set(r["cpu_s_per_image"]) == {"worker", "driver", "ray", "moto"}
        assert {"score", "encode", "hash", "write", "upload", "read"} <= set(
            r["worker_thread_s_per_image"]
        )
    assert {"score", "encode_jpeg", "encode_png", "hash", "write", "upload"} == set(
        figures["stage_cpu_s_per_image"]
    )
    assert set(figures["knee"]) == {"last_rate_at_target", "first_rate_below", "cpu_bound_rate"}


@pytest.mark.slow
def test_scale_bench_runs_every_measurement_at_a_small_size():
    out = bench(
        "bench/scale.py",
        "--workers",
        "2",
        "--shards",
        "12",
        "--plan-rows",
        "20000",
        "--outputs",
        "600",
        "--s3-outputs",
        "300",
    )
    figures = last_json(out)
    (driver,) = figures["driver"]
    assert (
        driver["workers"] == 2 and driver["shards"] == 12 and driver["driver_cpu_ms_per_shard"] > 0
    )
    assert driver["driver_cpu_ms_per_s"] > 0
    assert (
        figures["wait_2000_calls_ms"] > 0
        and figures["driver_cpu_ms_per_shard_1000_gpus_projected"] > 0
    )
    assert figures["plan"]["rows"] == 20000 and figures["plan"]["peak_rss_mb"] > 0
    assert set(figures["outputs"]) == {"local 600", "s3 300"}
    for measured in figures["outputs"].values():
        assert set(measured) == {"survey", "finalize", "status"}
        assert all(m["seconds"] > 0 and m["peak_rss_mb"] > 0 for m in measured.values())
    assert figures["status_100k_s3_projected_s"] > 0
    assert set(figures["targets"]) == {
        "driver_cpu_ms_per_shard",
        "plan_100m_peak_gb",
        "status_100k_s",
    }

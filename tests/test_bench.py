"""The benchmark scripts run end to end (their figures are printed, never asserted as speeds)."""

import json
import os
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


# What the GPU machine lacks (issue 18): bench/gpu.py runs with none of them importable. (It has
# yaml: huggingface_hub, which transformers needs, imports it.)
ABSENT_ON_THE_GPU_MACHINE = ("ray", "pydantic", "tensorflow")


def gpu_bench(*args: str) -> str:
    """bench/gpu.py with `args`, in a process where ray, pydantic and tensorflow cannot be
    imported (None in sys.modules: importing one raises ImportError)."""
    blocked = (
        f"import runpy, sys; sys.modules.update(dict.fromkeys({ABSENT_ON_THE_GPU_MACHINE!r})); "
        f"sys.argv = {['bench/gpu.py', *args]!r}; "
        "runpy.run_path('bench/gpu.py', run_name='__main__')"
    )
    return bench("-c", blocked)


@pytest.mark.slow
def test_gpu_bench_runs_on_the_tiny_pipeline_and_matches_plain_diffusers():
    out = gpu_bench("--tiny")
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d+\s+[\d.]+", line)]
    assert [(r[0], r[1]) for r in rows] == [("2", "1"), ("2", "2")]
    for r in rows:
        assert float(r[2]) > 0 and float(r[3]) > 0
        assert int(r[7]) <= 2  # the engine's pixels vs plain diffusers'
    assert "StableDiffusionPipeline" in out and last_json(out)["family"] == "sd2"
    assert "engine speed-ups: channels_last, fuse_qkv, uint8_on_device" in out


@pytest.mark.slow
def test_gpu_bench_runs_the_tiny_sdxl_and_matches_plain_diffusers():
    """--family sdxl measures plain StableDiffusionXLPipeline against the engine, which loads the
    same class from the same folder."""
    out = gpu_bench("--tiny", "--family", "sdxl")
    assert "device: CPU; StableDiffusionXLPipeline; float32; 64x64" in out
    figures = last_json(out)
    assert figures["family"] == "sdxl" and figures["batch_size"] == 2
    assert [(r["steps"], r["batch"]) for r in figures["rows"]] == [(2, 1), (2, 2)]
    for r in figures["rows"]:
        assert r["plain_images_per_s"] > 0 and r["sdfleet_images_per_s"] > 0
        assert r["max_diff"] <= 2  # the engine's pixels vs plain StableDiffusionXLPipeline's
        assert r["mfu_sdfleet"] is None and r["sdfleet_peak_gib"] is None  # no GPU: not guessed


def test_the_sdxl_bench_model_has_sdxl_base_parameter_counts():
    """bench/sdxl_base.py assembles bench/flops.py's configs into stable-diffusion-xl-base-1.0's
    architecture: its published parameter counts (UNet 2,567,463,684; VAE 83,653,863; both text
    encoders 817,720,320 with CLIP's 49,408-token vocabulary), built on the meta device."""
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(REPO / "bench"))
    import sdxl_base
    from sdfleet.jobs.tiny_clip import clip_tokenizer

    tokenizer = clip_tokenizer()
    with torch.device("meta"):
        models = sdxl_base.models(tokenizer)

    def parameters(name: str) -> int:
        return sum(p.numel() for p in models[name].parameters())

    # The bench's encoders embed the local tokenizer's vocabulary instead of CLIP's 49,408 tokens.
    widths = [m.config.hidden_size for m in (models["text_encoder"], models["text_encoder_2"])]
    vocabulary = sum((49408 - len(tokenizer)) * width for width in widths)
    assert parameters("unet") == 2_567_463_684
    assert parameters("vae") == 83_653_863
    assert parameters("text_encoder") + parameters("text_encoder_2") + vocabulary == 817_720_320
    assert type(models["text_encoder_2"]).__name__ == "CLIPTextModelWithProjection"


def gpu_session(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, object]:
    """bench/gpu_session.sh with `args`, as on the GPU machine: a Python where sdfleet is not
    installed (the machine gets a bare checkout) and ray, pydantic and tensorflow cannot be
    imported. Returns the run and its $OUT folder."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        f"sys.modules.update(dict.fromkeys({ABSENT_ON_THE_GPU_MACHINE!r}))\n"
        "sys.meta_path[:] = [f for f in sys.meta_path\n"
        "                    if not getattr(f, '__module__', '').startswith('__editable__')]\n"
        "sys.path[:] = [p for p in sys.path if not p.startswith('__editable__')]\n"
    )
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(site)}
    env["OUT"] = str(tmp_path / "out")
    probe = subprocess.run([sys.executable, "-c", "import sdfleet"], env=env, capture_output=True)
    assert probe.returncode != 0, (
        "sdfleet is still importable: the run would not be a bare checkout"
    )
    run = subprocess.run(
        ["bash", "bench/gpu_session.sh", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run, tmp_path / "out"


def gpu_report(out) -> str:
    return bench("bench/gpu_report.py", str(out))


@pytest.mark.slow
def test_the_gpu_session_runs_each_step_on_a_bare_checkout_and_reports_its_rows(tmp_path):
    """Issue 18's one device run, on the tiny models: SD2 at the short and the long step count
    (the second on the first's model and compile cache), then SDXL; gpu_report.py makes the
    README's rows from its folder, with the command each row came from."""
    _, out = gpu_session(tmp_path, "--tiny", "500")
    figures = {step: json.loads((out / f"{step}.json").read_text()) for step in STEPS}
    assert [figures[step]["family"] for step in STEPS] == ["sd2", "sd2", "sdxl"]
    steps = {step: {r["steps"] for r in figures[step]["rows"]} for step in STEPS}
    assert steps == {"sd2-25-steps": {2}, "sd2-50-steps": {3}, "sdxl-25-steps": {2}}
    auto = figures["sd2-25-steps"]["batch_size"]
    assert [r["batch"] for r in figures["sd2-25-steps"]["rows"]] == sorted({1, 2, auto})
    rows = [r for step in STEPS for r in figures[step]["rows"]]
    assert all(r["max_diff"] <= 2 for r in rows)  # the engine's pixels vs plain diffusers'
    assert "built" not in (out / "sd2-50-steps.log").read_text()  # step 1's model, loaded

    report = gpu_report(out)
    table = [line for line in report.splitlines() if line.startswith("| CPU |")]
    assert len(table) == len(rows)
    assert (
        table[0].split(" | ")[2]
        == "`bench/gpu.py --tiny --steps 2 --batches 1 2 auto --model WORK/sd2`"
    )
    assert f"- sd2-25-steps: batch `auto` chose {auto}" in report


def test_the_gpu_session_skips_the_steps_its_budget_cannot_hold_and_says_so(tmp_path):
    run, out = gpu_session(tmp_path, "--tiny", "5")
    assert run.stdout.count("skipped ") == len(STEPS)
    assert not list(out.glob("*.json"))
    report = gpu_report(out)
    assert [line.split(":")[0] for line in report.splitlines() if "no figures" in line] == [
        f"- {step}" for step in sorted(STEPS)
    ]


STEPS = ("sd2-25-steps", "sd2-50-steps", "sdxl-25-steps")


@pytest.mark.gpu
def test_gpu_bench_full_size():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    out = bench("bench/gpu.py", "--steps", "25", "--batches", "8", timeout=1800)
    assert "MFU" in out


def test_dedup_bench_flags_exactly_its_planted_copies_across_blocks():
    """Small shards and more images than one block (4096): the planted copies, and only they."""
    figures = last_json(bench("bench/dedup.py", "--images", "9000", "--shard", "700"))
    assert figures["exact"] and figures["flagged"] == figures["planted"] == 90


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


# Published sizes (model cards; diffusers' docs): SD3.5 Medium 2.5B and Large 8.1B parameters,
# each with its stored position-embedding table; FLUX.1 12B (diffusers counts 11.9B); T5-XXL's
# encoder 4.76B; CLIP ViT-L's text tower with projection 123.65M, OpenCLIP bigG's 694.66M (the
# SDXL test's two, 817,720,320 less ViT-L's 123,060,480 without projection).
DIT_SIZES = {
    ("sd3", "medium"): 2_243_171_520,
    ("sd3", "large"): 8_056_627_520,
    ("flux", "dev"): 11_901_408_320,
    ("flux", "schnell"): 11_891_178_560,  # no guidance embedder
}


@pytest.mark.parametrize("family, variant", list(DIT_SIZES))
def test_the_sd3_and_flux_bench_models_have_the_published_parameter_counts(family, variant):
    """bench/dit_base.py assembles bench/flops_dit.py's configs into the published architectures,
    built on the meta device."""
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(REPO / "bench"))
    import dit_base
    from sdfleet.jobs.tiny_clip import clip_tokenizer
    from sdfleet.jobs.tiny_t5 import t5_tokenizer

    clip, t5 = clip_tokenizer(), t5_tokenizer()
    with torch.device("meta"):
        models = dit_base.models(family, variant, clip, t5)

    def parameters(name: str, vocabulary: int = 0, tokenizer=None) -> int:
        """Its parameters, with the published vocabulary's embedding in place of the local one."""
        model = models[name]
        extra = (vocabulary - len(tokenizer)) * model.config.hidden_size if vocabulary else 0
        return sum(p.numel() for p in model.parameters()) + extra

    transformer = parameters("transformer")
    assert transformer == DIT_SIZES[(family, variant)]
    t5_name = "text_encoder_3" if family == "sd3" else "text_encoder_2"
    assert parameters(t5_name, 32128, t5) == pytest.approx(4.76e9, rel=1e-3)
    assert parameters("vae") == pytest.approx(83.8e6, rel=1e-3)
    if family == "sd3":
        # The model cards count the position-embedding table the checkpoint stores (a buffer).
        table = models["transformer"].pos_embed.pos_embed.numel()
        published = {"medium": 2.5e9, "large": 8.1e9}[variant]
        assert transformer + table == pytest.approx(published, rel=0.02)
        assert parameters("text_encoder", 49408, clip) == 123_650_304
        assert parameters("text_encoder_2", 49408, clip) == 694_659_840
    else:
        assert transformer == pytest.approx(11.9e9, rel=1e-3)
        assert parameters("text_encoder", 49408, clip) == 123_060_480  # no projection: pooled


def _family_row(name: str) -> bool:
    from sdfleet.schemas.families import FAMILIES

    return name in FAMILIES


@pytest.mark.slow
@pytest.mark.skipif(not _family_row("sd3"), reason="the SD3.5 row lands from the sd3 branch")
def test_gpu_bench_runs_the_tiny_sd3_and_matches_plain_diffusers():
    out = gpu_bench("--tiny", "--family", "sd3")
    assert "device: CPU; StableDiffusion3Pipeline medium; float32; 64x64" in out
    figures = last_json(out)
    assert figures["family"] == "sd3" and figures["variant"] == "medium"
    assert [(r["steps"], r["batch"]) for r in figures["rows"]] == [(2, 1), (2, 2)]
    for r in figures["rows"]:
        assert r["plain_images_per_s"] > 0 and r["sdfleet_images_per_s"] > 0
        assert r["max_diff"] <= 2  # the engine's pixels vs plain StableDiffusion3Pipeline's


@pytest.mark.slow
@pytest.mark.skipif(not _family_row("flux"), reason="the FLUX.1 row lands from the flux branch")
@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_gpu_bench_runs_the_tiny_flux_and_matches_plain_diffusers(variant):
    out = gpu_bench("--tiny", "--family", "flux", "--variant", variant)
    assert f"device: CPU; FluxPipeline {variant}; float32; 64x64" in out
    figures = last_json(out)
    assert figures["family"] == "flux" and figures["variant"] == variant
    for r in figures["rows"]:
        assert r["plain_images_per_s"] > 0 and r["sdfleet_images_per_s"] > 0
        assert r["max_diff"] <= 2  # the engine's pixels vs plain FluxPipeline's


@pytest.mark.parametrize("family, variant", [("sd3", "large"), ("flux", "schnell")])
def test_the_full_size_builder_writes_a_pipeline_diffusers_loads_and_runs(
    tmp_path, monkeypatch, family, variant
):
    """bench/dit_base.py's assembly (components, tokenizers, scheduler), with its configs shrunk:
    the GPU run builds the same at full size."""
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(REPO / "bench"))
    import diffusers

    import dit_base

    # SD3.5 joins its two CLIPs' 32 channels each (pooled: their projections) and pads them to
    # T5's width; FLUX.1 reads CLIP's pooled 32 and T5's states.
    width = 64 if family == "sd3" else 32
    small = {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16}
    small.update(joint_attention_dim=width, pooled_projection_dim=width)
    if family == "flux":
        small.update(num_single_layers=1, axes_dims_rope=[4, 6, 6])
    else:
        small.update(caption_projection_dim=32, pos_embed_max_size=16)
    key = (family, variant)
    monkeypatch.setitem(dit_base.TRANSFORMERS, key, dict(dit_base.TRANSFORMERS[key], **small))
    clip = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1}
    clip.update(num_attention_heads=2)
    monkeypatch.setattr(dit_base, "CLIP_L", dict(dit_base.CLIP_L, **clip, projection_dim=32))
    monkeypatch.setattr(
        dit_base, "CLIP_BIG_G", dict(dit_base.CLIP_BIG_G, **clip, projection_dim=32)
    )
    t5 = {"d_model": width, "d_ff": 37, "d_kv": 8, "num_heads": 4, "num_layers": 1}
    monkeypatch.setattr(dit_base, "T5_XXL", dict(dit_base.T5_XXL, **t5))
    vae = {"block_out_channels": (8, 8, 8, 8), "norm_num_groups": 4}
    monkeypatch.setattr(dit_base, "SD3_VAE", dict(dit_base.SD3_VAE, **vae))
    monkeypatch.setattr(dit_base, "FLUX_VAE", dict(dit_base.FLUX_VAE, **vae))

    folder = dit_base.build_pipeline(tmp_path / "model", family, variant)
    cls = diffusers.StableDiffusion3Pipeline if family == "sd3" else diffusers.FluxPipeline
    from safetensors import safe_open

    for part in ("transformer", "text_encoder_2"):  # written in bf16, as diffusers' docs run it
        with safe_open(next((folder / part).glob("*.safetensors")), "pt") as weights:
            assert weights.get_tensor(next(iter(weights.keys()))).dtype == torch.bfloat16
    pipe = cls.from_pretrained(folder, torch_dtype=torch.float32)  # the CPU's
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.transformer.config.num_layers == 1
    out = pipe("a cat", num_inference_steps=1, height=32, width=32, output_type="np")
    assert out.images.shape == (1, 32, 32, 3)

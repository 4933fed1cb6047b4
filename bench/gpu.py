"""sdfleet's engine vs plain diffusers on one GPU: a family's full-size architecture, random
weights, fp16 (SD2, SDXL) or bf16 (SD3.5, FLUX.1).

    python3 bench/gpu.py                 # SD2-base, 512x512, 50 and 25 steps, batch 1/8/16/32/auto
    python3 bench/gpu.py --family sdxl   # SDXL-base, 1024x1024, 50 and 25 steps, batch 1/4/8/auto
    python3 bench/gpu.py --family sd3 --variant medium   # 1024x1024, 40 steps CFG 4.5, 1/2/4/auto
    python3 bench/gpu.py --family sd3 --variant large    # 1024x1024, 28 steps CFG 3.5
    python3 bench/gpu.py --family flux --variant dev     # 1024x1024, 28 steps, guidance 3.5, 1/2/auto
    python3 bench/gpu.py --family flux --variant schnell # 1024x1024, 4 steps
    python3 bench/gpu.py --tiny          # the tiny pipeline on the CPU: checks the script end to end
    python3 bench/gpu.py --tiny --family sdxl   # (and sd3, flux)

FLUX.1-dev's row at batch 1 is the setting of the published H100 figures (huggingface/flux-fast:
1024x1024, 28 steps, bf16): its "plain" column is their baseline, and the engine's speed-ups
(torch.compile, fused QKV, channels_last) their lossless part (not FA3's or torchao's float8).
Plain and engine both hold the pipeline on the GPU: FLUX.1's two copies take about 67 GB in
bf16, so its default batches are 1, 2 and auto.

Needs torch, transformers and diffusers only (no pydantic, ray or tensorflow), so on a GPU machine
that has torch and transformers it runs with just the diffusers wheel carried. The engine is built
as a worker builds it: batch size "auto" measured on the GPU, then torch.compile's warm-up of the
shapes it will see (its time is printed; with compile on, a second engine in a fresh process then
loads the compiled graphs from engine.compile_cache, as an autoscaled worker would, and its
warm-up is printed too). For each steps x batch it times the family's plain diffusers pipeline
(`StableDiffusionPipeline`, `StableDiffusionXLPipeline`) and `actors.engine.Engine.generate` on
the same prompts and seeds (after one untimed call each), and prints images/s, the ratio, MFU
against the FLOPs of one image in schemas/families.py and schemas/family_flops.py (SD2: 83 TFLOP
at 50 steps, 512x512 with CFG; SDXL: 686.8 at 50 steps, 1024x1024; the variant's for SD3.5 and
FLUX.1, README's bench section lists them), the largest pixel difference between the two and the
engine's peak GPU memory (the plain pipeline's weights, resident meanwhile, left out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
try:
    import sdfleet.actors  # noqa: F401  (installed, e.g. `pip install -e .`)
except ImportError:
    # A bare checkout (the GPU machine has torch, transformers and the diffusers wheel, nothing
    # else): the repo root is the `sdfleet` package, as pyproject's package-dir maps it.
    import types

    sys.modules["sdfleet"] = types.ModuleType("sdfleet")
    sys.modules["sdfleet"].__path__ = [str(REPO)]

# Dense fp16 tensor-core peaks (TFLOP/s) by device name; MFU is reported against these.
PEAKS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def build_sd2(folder: Path, variant: str) -> None:
    from sd2_base import build_pipeline

    build_pipeline(folder)


def build_sdxl(folder: Path, variant: str) -> None:
    from sdxl_base import build_pipeline

    build_pipeline(folder)


def build_sd3(folder: Path, variant: str) -> None:
    from dit_base import build_pipeline

    build_pipeline(folder, "sd3", variant)


def build_flux(folder: Path, variant: str) -> None:
    from dit_base import build_pipeline

    build_pipeline(folder, "flux", variant)


def tiny_sd2(folder: Path, variant: str) -> None:
    from sdfleet.jobs.tiny import write_tiny_pipeline

    write_tiny_pipeline(folder)


def tiny_sdxl(folder: Path, variant: str) -> None:
    from sdfleet.jobs.tiny_sdxl import write_tiny_sdxl

    write_tiny_sdxl(folder)


def tiny_sd3(folder: Path, variant: str) -> None:
    from sdfleet.jobs.tiny_sd3 import write_tiny_sd3  # one tiny SD3: its variants differ in size

    write_tiny_sd3(folder)


def tiny_flux(folder: Path, variant: str) -> None:
    from sdfleet.jobs.tiny_flux import write_tiny_flux

    write_tiny_flux(folder, variant)


@dataclass(frozen=True)
class BenchFamily:
    """How the bench builds one family's models. The rest is the family's row in
    schemas/families.py: the plain pipeline class, the native size and the FLOPs per image."""

    name: str
    # The full-size architecture with random weights, and the tiny pipeline the CPU run
    # measures, of a variant (`variants`; "" for a family without).
    build: Callable[[Path, str], None]
    tiny: Callable[[Path, str], None]
    batches: tuple[str, ...]  # the full-size batch sizes measured by default
    variants: tuple[str, ...] = ("",)  # the first is the default
    dtype: str = "float16"  # on the GPU (the CPU runs float32)
    # The full-size steps by variant ("" for all), and the guidance scale by variant: SD3.5 with
    # its model cards' CFG; FLUX.1-dev's embedded guidance, schnell's none (0).
    steps: dict[str, tuple[int, ...]] = field(default_factory=lambda: {"": (50, 25)})
    guidance: dict[str, float] = field(default_factory=lambda: {"": 7.5})
    # The checkpoint's own scheduler (flow matching) for both contenders, not Euler's.
    own_scheduler: bool = False
    negative_prompt: bool = True  # the pipeline takes one (FLUX.1's only with true CFG)

    def of(self, table: dict, variant: str):
        return table.get(variant, table.get(""))


BENCH_FAMILIES = {
    family.name: family
    for family in (
        BenchFamily("sd2", build_sd2, tiny_sd2, ("1", "8", "16", "32", "auto")),
        # 1024x1024 holds four times SD2's latent pixels per image: smaller batches fill the GPU.
        BenchFamily("sdxl", build_sdxl, tiny_sdxl, ("1", "4", "8", "auto")),
        # The model cards' steps and guidance (Medium 40 at 4.5, Large 28 at 3.5), in bf16.
        BenchFamily(
            "sd3",
            build_sd3,
            tiny_sd3,
            ("1", "2", "4", "auto"),
            variants=("medium", "large"),
            dtype="bfloat16",
            steps={"medium": (40,), "large": (28,)},
            guidance={"medium": 4.5, "large": 3.5},
            own_scheduler=True,
        ),
        # FLUX.1-dev at diffusers' default 28 steps (the published H100 figures' setting: 1024^2,
        # batch 1), schnell at its 4; bf16 (its activations overflow fp16). Batches up to 2: plain
        # diffusers' copy of the 12B pipeline stays resident beside the engine's.
        BenchFamily(
            "flux",
            build_flux,
            tiny_flux,
            ("1", "2", "auto"),
            variants=("dev", "schnell"),
            dtype="bfloat16",
            steps={"dev": (28,), "schnell": (4,)},
            guidance={"dev": 3.5, "schnell": 0.0},
            own_scheduler=True,
            negative_prompt=False,
        ),
    )
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", default="sd2", choices=sorted(BENCH_FAMILIES))
    parser.add_argument(
        "--variant", help="sd3: medium (default) or large; flux: dev (default) or schnell"
    )
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, nargs="+")
    parser.add_argument(
        "--batches", nargs="+", help="batch sizes, or auto (the engine's own choice)"
    )
    parser.add_argument("--size", type=int)
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    parser.add_argument(
        "--model",
        help="a diffusers folder: loaded where it holds model_index.json, else the model is built "
        "there (so a later run can load it instead of building it again)",
    )
    parser.add_argument(
        "--compile-cache", help="engine.compile_cache for both engines (default: a new folder)"
    )
    parser.add_argument(
        "--no-second-engine",
        action="store_true",
        help="skip the second engine's fresh-process warm-up (a third copy of the pipeline on the "
        "GPU: FLUX.1's does not fit an 80 GB H100 beside the other two)",
    )
    parser.add_argument(
        "--engine-only",
        action="store_true",
        help="build the engine, print its warm-up as JSON and stop (the second engine's process)",
    )
    return parser.parse_args()


@dataclass
class Timing:
    images_per_s: float
    images: np.ndarray  # uint8, batch x H x W x 3
    warm_up_s: float  # the untimed first call
    # The GPU memory allocated at the timed call's peak, less `others` (None on the CPU).
    peak_gib: float | None


def timed(fn: Callable[[], np.ndarray], batch: int, cuda: bool, others: int = 0) -> Timing:
    """One untimed call (compile, autotune, allocator), then the timed one. others: bytes that
    the other pipeline holds on the GPU meanwhile, left out of the peak."""
    import torch

    t0 = time.perf_counter()
    fn()
    warm = time.perf_counter() - t0
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    images = fn()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - others) / 2**30 if cuda else None
    return Timing(batch / seconds, images, warm, peak)


def second_engine(args, folder: Path, compile_cache: str, size: int, steps: int, batch: int):
    """What an autoscaled worker pays: a fresh process, an empty Inductor cache, this cache. Its
    figures as a dict, or None where it failed (the reason is printed)."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="inductor-")}
    cmd = [
        sys.executable,
        __file__,
        "--engine-only",
        "--family",
        args.family,
        "--variant",
        args.variant,
        "--model",
        str(folder),
        "--compile-cache",
        compile_cache,
        "--compile",
        args.compile,
        "--size",
        str(size),
        "--steps",
        str(steps),
        "--batches",
        str(batch),
    ]  # the same batch, so the same graphs and key
    second = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if second.returncode != 0:
        print(f"second engine failed: {second.stderr[-2000:]}", flush=True)
        return None
    r = json.loads(second.stdout.strip().splitlines()[-1])
    print(
        f"second engine (fresh process, compile cache {r['compile_cache']}): ready in {r['ready_s']:.0f}s, "
        f"compile warm-up {r['warm_up_s'] or 0:.0f}s",
        flush=True,
    )
    return r


@dataclass(frozen=True)
class Contenders:
    """Plain diffusers and the engine, loaded, and what a row of the table needs besides."""

    plain: object  # the family's diffusers pipeline
    engine: object  # sdfleet.actors.engine.Engine
    plain_bytes: int  # the plain pipeline's weights on the GPU, left out of the engine's peak
    # Its row of sdfleet.schemas.families.FAMILIES, costed as the checkpoint's variant: the
    # FLOPs per image.
    family: object
    size: int
    cuda: bool
    peak_tflops: float | None  # the device's dense fp16 (= bf16) peak; None: MFU not reported
    guidance: float
    negative_prompt: bool  # plain diffusers is passed the rows' negative prompt


def measure(c: Contenders, n_steps: int, batch: int) -> dict:
    """One row of the table: plain diffusers, then the engine, on the same prompts and seeds;
    printed, and returned for the JSON line."""
    import torch

    from sdfleet.schemas.samples import GenerationParams

    prompts = [f"a photograph of landscape number {i}, detailed" for i in range(batch)]
    seeds = list(range(1000, 1000 + batch))
    params = [
        GenerationParams(p, "", s, n_steps, c.guidance, c.size, c.size, None)
        for p, s in zip(prompts, seeds)
    ]
    # The engine passes the rows' negative prompt (""), so plain does too: SDXL's
    # force_zeros_for_empty_prompt zeroes the negative embedding only where none is given (SD2
    # encodes "" either way). FLUX.1 takes one only for true CFG, which the bench does not run.
    negative = {"negative_prompt": [p.negative_prompt for p in params]} if c.negative_prompt else {}

    def run_plain():
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        out = c.plain(
            [p.prompt for p in params],
            **negative,
            num_inference_steps=n_steps,
            guidance_scale=c.guidance,
            width=c.size,
            height=c.size,
            generator=gens,
            output_type="np",
        ).images
        return (out * 255).round().astype(np.uint8)

    def run_engine():
        return np.stack(next(iter(c.engine.generate(params, batch)))[1])

    p = timed(run_plain, batch, c.cuda)
    e = timed(run_engine, batch, c.cuda, others=c.plain_bytes)
    flops = c.family.tflop_per_image(c.size, c.size, n_steps, guidance_scale=c.guidance)
    mfu_plain, mfu_engine = (
        (ips * flops / c.peak_tflops if c.peak_tflops else None)
        for ips in (p.images_per_s, e.images_per_s)
    )

    def percent(mfu):
        return f"{100 * mfu:8.1f}%" if mfu is not None else "     n/a"

    diff = int(np.abs(p.images.astype(int) - e.images.astype(int)).max())
    ratio = e.images_per_s / p.images_per_s
    memory = f"{e.peak_gib:8.1f}" if e.peak_gib is not None else "     n/a"
    print(
        f"{n_steps:5d} {batch:5d} {p.images_per_s:11.3f} {e.images_per_s:13.3f} {ratio:6.2f} "
        f"{percent(mfu_plain):>9} {percent(mfu_engine):>11} {diff:8d} {e.warm_up_s:9.1f} "
        f"{memory:>8}",
        flush=True,
    )
    return {
        "steps": n_steps,
        "batch": batch,
        "plain_images_per_s": round(p.images_per_s, 4),
        "sdfleet_images_per_s": round(e.images_per_s, 4),
        "ratio": round(ratio, 4),
        "mfu_plain": round(mfu_plain, 4) if mfu_plain is not None else None,
        "mfu_sdfleet": round(mfu_engine, 4) if mfu_engine is not None else None,
        "max_diff": diff,
        "sdfleet_peak_gib": round(e.peak_gib, 2) if e.peak_gib is not None else None,
    }


def main() -> None:
    args = parse_args()
    bench_family = BENCH_FAMILIES[args.family]
    variant = args.variant or bench_family.variants[0]
    if variant not in bench_family.variants:
        sys.exit(f"--variant {variant}: {args.family} has {', '.join(bench_family.variants)}")
    args.variant = variant  # the second engine's process builds the same
    steps = args.steps or ([2] if args.tiny else list(bench_family.of(bench_family.steps, variant)))
    guidance = bench_family.of(bench_family.guidance, variant)
    batches = args.batches or (["1", "2"] if args.tiny else list(bench_family.batches))

    import diffusers
    import torch

    from sdfleet.actors.engine import Engine
    from sdfleet.schemas.families import FAMILIES
    from sdfleet.schemas.samples import GenerationParams
    from sdfleet.schemas.tasks import TEXT_TO_IMAGE

    family = FAMILIES[args.family]
    size = args.size or (64 if args.tiny else family.fallback_size)
    cuda = torch.cuda.is_available() and not args.tiny
    device, dtype = ("cuda", bench_family.dtype) if cuda else ("cpu", "float32")
    name = torch.cuda.get_device_name() if cuda else "CPU"
    peak = next((v for k, v in PEAKS.items() if k in name), None)

    # 1. The model: the family's full-size architecture with random weights (same FLOPs), or its
    #    tiny one.
    folder = (
        Path(args.model)
        if args.model
        else Path(tempfile.mkdtemp(prefix="sdfleet-bench-")) / "model"
    )
    if not (folder / "model_index.json").exists():
        t0 = time.perf_counter()
        (bench_family.tiny if args.tiny else bench_family.build)(folder, variant)
        print(f"built {folder} in {time.perf_counter() - t0:.0f}s", flush=True)

    # 2. Plain diffusers, as a user would call it: the family's own pipeline class.
    if not args.engine_only:
        plain_class = getattr(diffusers, family.pipeline(TEXT_TO_IMAGE))
        plain = plain_class.from_pretrained(
            folder, dtype=getattr(torch, dtype), use_safetensors=True
        )
        if not bench_family.own_scheduler:
            plain.scheduler = diffusers.EulerDiscreteScheduler.from_config(plain.scheduler.config)
        plain = plain.to(device)
        plain.set_progress_bar_config(disable=True)
        # Left out of the engine's peak memory: a worker holds the engine's pipeline alone.
        plain_bytes = sum(
            p.numel() * p.element_size()
            for part in plain.components.values()
            if isinstance(part, torch.nn.Module)
            for p in part.parameters()
        )

    # 3. The sdfleet engine as a worker builds it: speed-ups, batch size, compile warm-up
    #    (duck-typed options: no pydantic needed).
    model = SimpleNamespace(
        source=str(folder),
        revision=None,
        dtype=dtype,
        scheduler=None if bench_family.own_scheduler else "EulerDiscreteScheduler",
        scheduler_config={},
        storage_options={},
    )
    compile_cache = args.compile_cache or str(folder.parent / "compile-cache")
    options = SimpleNamespace(
        channels_last=True,
        fuse_qkv=True,
        compile=args.compile,
        uint8_on_device=True,
        compile_cache=compile_cache,
    )
    shape = GenerationParams("", "", 0, steps[0], guidance, size, size, None)
    requested = "auto" if "auto" in batches else max(int(b) for b in batches)
    t0 = time.perf_counter()
    engine = Engine(model, device=device, options=options, batch_size=requested, warm_up=[shape])
    ready = time.perf_counter() - t0
    if args.engine_only:
        print(
            json.dumps(
                {
                    "ready_s": ready,
                    "warm_up_s": engine.warm_up_seconds,
                    "compile_cache": engine.compile_cache,
                    "batch_size": engine.batch_size,
                }
            )
        )
        return
    if engine.family is not family:
        sys.exit(f"the engine loaded {folder} as {engine.family.name}, not {family.name}")
    batches = sorted({engine.batch_size if b == "auto" else int(b) for b in batches})

    print(
        f"device: {name}; {type(engine.pipe).__name__}{' ' + variant if variant else ''}; "
        f"{dtype}; {size}x{size}; "
        f"engine speed-ups: {', '.join(engine.applied)}"
    )
    print(
        f"engine ready in {ready:.0f}s (load, batch size {requested} -> {engine.batch_size}, compile warm-up "
        f"{engine.warm_up_seconds or 0:.0f}s, compile cache {engine.compile_cache or 'not used'})"
    )
    # 4. Each steps x batch: plain diffusers, then the engine, on the same prompts and seeds.
    print(
        f"{'steps':>5} {'batch':>5} {'plain img/s':>11} {'sdfleet img/s':>13} {'ratio':>6} {'MFU plain':>9} "
        f"{'MFU sdfleet':>11} {'max diff':>8} {'warm-up s':>9} {'peak GiB':>8}"
    )
    costed = family.costed(json.loads((folder / family.denoiser / "config.json").read_text()))
    bench = Contenders(
        plain, engine, plain_bytes, costed, size, cuda, peak, guidance, bench_family.negative_prompt
    )
    rows = [measure(bench, n_steps, batch) for n_steps in steps for batch in batches]

    # 5. What an autoscaled worker pays to start: after the table, which is worth more when the
    #    GPU time runs out first.
    second = None
    if engine.compile_cache == "miss" and not args.no_second_engine:
        second = second_engine(args, folder, compile_cache, size, steps[0], engine.batch_size)
    print(
        json.dumps(
            {
                "device": name,
                "family": family.name,
                "variant": variant or None,
                "engine_ready_s": round(ready, 1),
                "warm_up_s": engine.warm_up_seconds,
                "compile_cache": engine.compile_cache,
                "second_engine": second,
                "batch_size": engine.batch_size,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()

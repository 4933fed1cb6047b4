"""sdfleet's engine vs plain diffusers on one GPU: SD2-base architecture, random weights, fp16.

    python3 bench/gpu.py                 # full size, 512x512, 50 and 25 steps, batch 1/8/16/32/auto
    python3 bench/gpu.py --tiny          # the tiny pipeline on the CPU: checks the script end to end

Needs torch, transformers and diffusers only (no pydantic, ray or tensorflow), so on a GPU machine
that has torch and transformers it runs with just the diffusers wheel carried. The engine is built
as a worker builds it: batch size "auto" measured on the GPU, then torch.compile's warm-up of the
shapes it will see (its time is printed; with compile on, a second engine in a fresh process then
loads the compiled graphs from engine.compile_cache, as an autoscaled worker would, and its
warm-up is printed too). For each steps x batch it times plain
`StableDiffusionPipeline.__call__` and `actors.engine.Engine.generate` on the same prompts and
seeds (after one untimed call each), and prints images/s, the ratio, MFU against the FLOPs of one
image (83 TFLOP at 50 steps, 512x512 with CFG) and the largest pixel difference between the two.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, nargs="+")
    parser.add_argument(
        "--batches", nargs="+", help="batch sizes, or auto (the engine's own choice)"
    )
    parser.add_argument("--size", type=int)
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--model", help="an existing diffusers folder (skips building one)")
    parser.add_argument(
        "--compile-cache", help="engine.compile_cache for both engines (default: a new folder)"
    )
    parser.add_argument(
        "--engine-only",
        action="store_true",
        help="build the engine, print its warm-up as JSON and stop (the second engine's process)",
    )
    args = parser.parse_args()
    steps = args.steps or ([2] if args.tiny else [50, 25])
    batches = args.batches or (["1", "2"] if args.tiny else ["1", "8", "16", "32", "auto"])
    size = args.size or (64 if args.tiny else 512)

    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from sdfleet.actors.engine import Engine
    from sdfleet.schemas.families import SD2
    from sdfleet.schemas.samples import GenerationParams

    cuda = torch.cuda.is_available() and not args.tiny
    device, dtype = ("cuda", "float16") if cuda else ("cpu", "float32")
    name = torch.cuda.get_device_name() if cuda else "CPU"
    peak = next((v for k, v in PEAKS.items() if k in name), None)

    # 1. The model: SD2-base's architecture with random weights (same FLOPs), or the tiny one.
    folder = (
        Path(args.model)
        if args.model
        else Path(tempfile.mkdtemp(prefix="sdfleet-bench-")) / "model"
    )
    if not args.model:
        t0 = time.perf_counter()
        if args.tiny:
            from sdfleet.jobs.tiny import write_tiny_pipeline

            write_tiny_pipeline(folder)
        else:
            from sd2_base import build_pipeline

            build_pipeline(folder)
        print(f"built {folder} in {time.perf_counter() - t0:.0f}s", flush=True)

    # 2. Plain diffusers, as a user would call it.
    if not args.engine_only:
        plain = StableDiffusionPipeline.from_pretrained(
            folder, dtype=getattr(torch, dtype), use_safetensors=True
        )
        plain.scheduler = EulerDiscreteScheduler.from_config(plain.scheduler.config)
        plain = plain.to(device)
        plain.set_progress_bar_config(disable=True)

    # 3. The sdfleet engine as a worker builds it: speed-ups, batch size, compile warm-up
    #    (duck-typed options: no pydantic needed).
    model = SimpleNamespace(
        source=str(folder),
        revision=None,
        dtype=dtype,
        scheduler="EulerDiscreteScheduler",
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
    shape = GenerationParams("", "", 0, steps[0], 7.5, size, size, None)
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
    batches = sorted({engine.batch_size if b == "auto" else int(b) for b in batches})

    print(f"device: {name}; {dtype}; {size}x{size}; engine speed-ups: {', '.join(engine.applied)}")
    print(
        f"engine ready in {ready:.0f}s (load, batch size {requested} -> {engine.batch_size}, compile warm-up "
        f"{engine.warm_up_seconds or 0:.0f}s, compile cache {engine.compile_cache or 'not used'})"
    )
    second_engine = None
    if engine.compile_cache == "miss":
        # What an autoscaled worker pays: a fresh process, an empty Inductor cache, this cache.
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="inductor-")}
        cmd = [
            sys.executable,
            __file__,
            "--engine-only",
            "--model",
            str(folder),
            "--compile-cache",
            compile_cache,
            "--compile",
            args.compile,
            "--size",
            str(size),
            "--steps",
            str(steps[0]),
            "--batches",
            str(engine.batch_size),
        ]  # the same batch, so the same graphs and key
        second = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if second.returncode == 0:
            r = second_engine = json.loads(second.stdout.strip().splitlines()[-1])
            print(
                f"second engine (fresh process, compile cache {r['compile_cache']}): ready in {r['ready_s']:.0f}s, "
                f"compile warm-up {r['warm_up_s'] or 0:.0f}s",
                flush=True,
            )
        else:
            print(f"second engine failed: {second.stderr[-2000:]}", flush=True)
    rows = []
    print(
        f"{'steps':>5} {'batch':>5} {'plain img/s':>11} {'sdfleet img/s':>13} {'ratio':>6} {'MFU plain':>9} "
        f"{'MFU sdfleet':>11} {'max diff':>8} {'warm-up s':>9}"
    )
    for n_steps in steps:
        for batch in batches:
            prompts = [f"a photograph of landscape number {i}, detailed" for i in range(batch)]
            seeds = list(range(1000, 1000 + batch))
            params = [
                GenerationParams(p, "", s, n_steps, 7.5, size, size, None)
                for p, s in zip(prompts, seeds)
            ]

            def run_plain(seeds=seeds, prompts=prompts, n_steps=n_steps):
                gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
                out = plain(
                    prompts,
                    num_inference_steps=n_steps,
                    guidance_scale=7.5,
                    width=size,
                    height=size,
                    generator=gens,
                    output_type="np",
                ).images
                return (out * 255).round().astype(np.uint8)

            def run_engine(params=params, batch=batch):
                return np.stack(next(iter(engine.generate(params, batch)))[1])

            timings = {}
            for label, fn in (("plain", run_plain), ("engine", run_engine)):
                t0 = time.perf_counter()
                fn()  # warm-up (compile, autotune, allocator)
                warm = time.perf_counter() - t0
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                images = fn()
                if cuda:
                    torch.cuda.synchronize()
                timings[label] = (batch / (time.perf_counter() - t0), images, warm)
            (p_ips, p_img, _), (e_ips, e_img, e_warm) = timings["plain"], timings["engine"]
            flops = SD2.tflop_per_image(size, size, n_steps, guidance_scale=7.5)

            def mfu(ips, flops=flops):
                return f"{100 * ips * flops / peak:8.1f}%" if peak else "     n/a"

            diff = int(np.abs(p_img.astype(int) - e_img.astype(int)).max())
            print(
                f"{n_steps:5d} {batch:5d} {p_ips:11.3f} {e_ips:13.3f} {e_ips / p_ips:6.2f} {mfu(p_ips):>9} "
                f"{mfu(e_ips):>11} {diff:8d} {e_warm:9.1f}",
                flush=True,
            )
            rows.append(
                {
                    "steps": n_steps,
                    "batch": batch,
                    "plain_images_per_s": round(p_ips, 4),
                    "sdfleet_images_per_s": round(e_ips, 4),
                    "ratio": round(e_ips / p_ips, 4),
                    "mfu_plain": round(p_ips * flops / peak, 4) if peak else None,
                    "mfu_sdfleet": round(e_ips * flops / peak, 4) if peak else None,
                    "max_diff": diff,
                }
            )
    print(
        json.dumps(
            {
                "device": name,
                "engine_ready_s": round(ready, 1),
                "warm_up_s": engine.warm_up_seconds,
                "compile_cache": engine.compile_cache,
                "second_engine": second_engine,
                "batch_size": engine.batch_size,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
